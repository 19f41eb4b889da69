"""Attention implementations against the dense XLA path (itself checked against HF in
test_parity): blockwise (block skipping, O(T) memory, hooks), splash in Pallas TPU interpret mode,
and the implementation choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import attention as att
from gemma_jax.attention_tpu import contiguous_rows
from gemma_jax.errors import ConfigError
from gemma_jax.hooks import Hooks

B, H = 2, 16


def _inputs(t, s=None, n=4, k=2, seed=0, dtype=jnp.float32, scale=1.0):
    s = t if s is None else s
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((B, t, n, H)) * scale, dtype)
    kk = jnp.asarray(r.standard_normal((B, s, k, H)) * scale, dtype)
    v = jnp.asarray(r.standard_normal((B, s, k, H)), dtype)
    return q, kk, v


def _fresh_positions(t, pad_left=(0, 0), pad_right=(0, 0)):
    """[B, T] positions 0.. with `pad_left[b]` leading and `pad_right[b]` trailing -1s."""
    pos = np.full((B, t), -1, np.int32)
    for b in range(B):
        n = t - pad_left[b] - pad_right[b]
        pos[b, pad_left[b]:pad_left[b] + n] = np.arange(n)
    return jnp.asarray(pos)


def _jit(fn):
    """fn(q, k, v, q_pos, k_pos, **static) compiled once per set of static options."""
    @functools.lru_cache(maxsize=None)
    def compiled(items):
        return jax.jit(functools.partial(fn, **dict(items)))
    return lambda *args, **kw: compiled(tuple(sorted(kw.items())))(*args)


dense, blockwise = _jit(att.dense), _jit(att.blockwise)
KW = dict(scale=0.25, softcap=5.0)  # a small cap: the soft-cap's place (before the mask) matters


def _compare(out, ref, q_pos, tol=2e-6):
    real = np.asarray(q_pos) >= 0  # padding queries' outputs are unused
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=tol, rtol=0)
    assert np.isfinite(np.asarray(out)).all()


# ------------------------------------------------------------------------------------ blockwise
@pytest.mark.parametrize("t,window,bq,bk,n,k", [
    (37, None, 8, 8, 4, 2),     # odd length, causal, GQA 2
    (37, 5, 8, 16, 4, 2),       # window smaller than a key block
    (64, 20, 16, 8, 4, 1),      # MQA, window spanning blocks
    (50, 3, 64, 64, 2, 2),      # one block each side (blocks clamped to T)
    (33, 40, 8, 4, 4, 4),       # window larger than the sequence
])
def test_blockwise_equals_dense_fresh(t, window, bq, bk, n, k):
    q, kk, v = _inputs(t, n=n, k=k, scale=3.0)
    pos = _fresh_positions(t, pad_left=(0, 4), pad_right=(3, 0))
    ref = dense(q, kk, v, pos, pos, window=window, **KW)
    out = blockwise(q, kk, v, pos, pos, window=window, block_q=bq, block_kv=bk, **KW)
    _compare(out, ref, pos)


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_blockwise_chunk_over_a_ring_buffer(softcap):
    """A chunk attending over [old ring buffer (slots in ring order, some empty), the chunk itself]
    as model.Attention builds it, the chunk longer than the ring."""
    w, start, c = 6, 9, 11
    slots = np.arange(w)
    held = (start - 1) - np.mod(start - 1 - slots, w)                       # cache.slot_positions
    k_pos = np.stack([np.concatenate([held, np.arange(start, start + c)]),
                      np.concatenate([np.full(w, -1), np.arange(0, c)])])  # row 1: empty cache
    q_pos = k_pos[:, w:]
    q, kk, v = _inputs(c, w + c, seed=1, scale=2.0)
    q_pos, k_pos = jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)
    ref = dense(q, kk, v, q_pos, k_pos, scale=0.25, softcap=softcap, window=w)
    out = blockwise(q, kk, v, q_pos, k_pos, scale=0.25, softcap=softcap, window=w, block_q=4, block_kv=4)
    _compare(out, ref, q_pos)


def test_blockwise_skips_blocks_rather_than_masking_them():
    """Keys and values outside every query's reach are NaN: masking them would poison the output
    (NaN * 0 = NaN), skipping them does not."""
    t, w, blk = 64, 8, 8
    q, kk, v = _inputs(t)
    pos = _fresh_positions(t)
    ref = dense(q, kk, v, pos, pos, window=w, **KW)
    # queries 48..63 (the last two query blocks) see keys >= 41 only: key blocks 0-4 are invisible
    out = blockwise(q[:, 48:], kk.at[:, :40].set(jnp.nan), v.at[:, :40].set(jnp.nan), pos[:, 48:], pos,
                        window=w, block_q=blk, block_kv=blk, **KW)
    _compare(out, ref[:, 48:], pos[:, 48:])
    # causal: a query block never visits key blocks after it
    out = blockwise(q[:, :16], kk.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan), pos[:, :16], pos,
                        window=None, block_q=blk, block_kv=blk, **KW)
    _compare(out, dense(q, kk, v, pos, pos, window=None, **KW)[:, :16], pos[:, :16])


def test_blockwise_bfloat16_close_to_dense():
    q, kk, v = _inputs(40, dtype=jnp.bfloat16)
    pos = _fresh_positions(40)
    ref = dense(q, kk, v, pos, pos, window=7, **KW).astype(jnp.float32)
    out = blockwise(q, kk, v, pos, pos, window=7, block_q=16, block_kv=8, **KW).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) < 2e-2


def test_blockwise_temporaries_grow_linearly(report):
    """Compiled temporary memory of one layer's attention (2B's heads, head_dim 256): the dense path
    grows as T^2, blockwise as T."""
    def temp(fn, t):
        q = jax.ShapeDtypeStruct((1, t, 8, 256), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 4, 256), jnp.float32)
        p = jax.ShapeDtypeStruct((1, t), jnp.int32)
        f = jax.jit(lambda q, k, v, p: fn(q, k, v, p, p, scale=1 / 16, softcap=50.0, window=None))
        return f.lower(q, k, k, p).compile().memory_analysis().temp_size_in_bytes

    lengths = (1024, 2048, 4096)
    dense = [temp(att.dense, t) for t in lengths]
    block = [temp(att.blockwise, t) for t in lengths]
    for t, d, b in zip(lengths, dense, block):
        report(f"attention temp bytes T={t}: dense / blockwise", f"{d / 2**20:.0f} MiB / {b / 2**20:.1f} MiB")
    assert dense[2] / dense[1] > 3.5 and dense[1] / dense[0] > 3.5          # quadratic
    assert block[2] / block[1] < 2.2 and block[1] / block[0] < 2.2          # linear
    assert block[2] < 4 * 4096 * 8 * 256 * 4                                # a few [T, N, H] arrays


# ------------------------------------------------------------------------------ hooks and choice
def test_hooked_scores_force_the_dense_path():
    """With impl="blockwise", a hook on the pattern still sees [B, N, T, S] and its edit takes
    effect; hooks elsewhere leave blockwise on."""
    config = att.AttentionConfig(impl="blockwise", block_q=8, block_kv=8)
    q, kk, v = _inputs(20)
    pos = _fresh_positions(20)
    seen = {}

    def uniform(p):
        seen["shape"] = p.shape
        return jnp.where(p > 0, 1.0, 0.0) / jnp.sum(p > 0, axis=-1, keepdims=True)

    hooks = Hooks((("blocks.0.attn.hook_pattern", uniform),))
    out = att.attend(q, kk, v, pos, pos, window=None, hook=hooks, name="blocks.0.attn", config=config, **KW)
    assert seen["shape"] == (B, 4, 20, 20)
    # uniform attention over the visible keys: the running mean of v
    mean = np.cumsum(np.asarray(v), axis=1) / np.arange(1, 21)[None, :, None, None]
    np.testing.assert_allclose(np.asarray(out).reshape(B, 20, 2, 2, H),
                               np.broadcast_to(mean[:, :, :, None], (B, 20, 2, 2, H)), atol=1e-5)
    assert att.choose(config, 20, True, hooks, "blocks.0.attn") == "xla"
    assert att.choose(config, 20, True, hooks, "blocks.1.attn") == "blockwise"
    assert att.choose(config, 20, True, lambda name, x: x, "blocks.1.attn") == "xla"  # unknown sites


def test_default_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(att.ENV, raising=False)
    assert att.attention_config(None) == att.AttentionConfig()
    monkeypatch.setenv(att.ENV, "blockwise,block_q=4")
    assert att.attention_config(None) == att.AttentionConfig(impl="blockwise", block_q=4)


def test_choice_and_config():
    auto = att.AttentionConfig(blockwise_from=1024)
    assert att.choose(auto, 1, False) == "xla" and att.choose(auto, 1023, True) == "xla"
    assert att.choose(auto, 1024, True) == "blockwise"
    splash = att.AttentionConfig(impl="splash")
    assert att.choose(splash, 300, True) == "splash"
    assert att.choose(splash, 300, False) == "blockwise" and att.choose(splash, 1, False) == "xla"
    assert att.attention_config("blockwise,block_q=4,block_kv=8,interpret=1") == att.AttentionConfig(
        impl="blockwise", block_q=4, block_kv=8, interpret=True)
    for bad, words in (("flash", "'flash' is unknown"), ("blockwise,block_q=0", "block_q must be a positive"),
                       ("blockwise,blk=4", "'blk=4' is not one of"), ("auto,block_q=x", "must be an integer"),
                       ("splash,splash_block=100", "multiple of 128")):
        with pytest.raises(ConfigError, match=words):
            att.attention_config(bad)


# ----------------------------------------------------------------------- splash (TPU interpret)
def _splash(q, kk, v, pos, window, softcap=5.0, block=128):
    cfg = att.AttentionConfig(impl="splash", splash_block=block, interpret=True)
    return jax.jit(lambda q, kk, v, pos: att.attend(q, kk, v, pos, pos, scale=0.25, softcap=softcap,
                                                    window=window, config=cfg))(q, kk, v, pos)


@pytest.mark.parametrize("t,window,n,k,softcap", [
    (77, 5, 4, 2, 5.0),      # odd length, window far smaller than a block, GQA
    (200, 150, 4, 1, 50.0),  # MQA, two blocks, window across the block edge
    (130, None, 2, 2, None), # causal, no soft-cap, one block plus two rows
])
def test_splash_interpret_equals_dense(t, window, n, k, softcap):
    q, kk, v = _inputs(t, n=n, k=k, scale=3.0)
    pos = _fresh_positions(t, pad_left=(0, 6), pad_right=(9, 0))  # padding on either end
    ref = dense(q, kk, v, pos, pos, scale=0.25, softcap=softcap, window=window)
    _compare(_splash(q, kk, v, pos, window, softcap), ref, pos, tol=1e-5)


def test_splash_falls_back_where_positions_are_not_contiguous():
    """Padding in the middle of a row: index distance != position distance, so splash's index
    masks would be wrong at the window's edge; the blockwise path runs instead."""
    t, w = 40, 6
    q, kk, v = _inputs(t, scale=3.0)
    pos = np.array(_fresh_positions(t))
    pos[1] = np.where(np.arange(t) < 10, np.arange(t), np.where(np.arange(t) < 13, -1, np.arange(t) - 3))
    pos = jnp.asarray(pos)
    assert not bool(contiguous_rows(pos)) and bool(contiguous_rows(_fresh_positions(t, (0, 3), (2, 0))))
    ref = dense(q, kk, v, pos, pos, window=w, **KW)
    _compare(_splash(q, kk, v, pos, w), ref, pos, tol=1e-5)


def test_cli_refuses_an_unknown_attention(capsys):
    from gemma_jax import cli
    assert cli.main(["--no-compile-cache", "generate", "--attention", "flash", "--prompt", "x"]) == 2
    assert "attention implementation 'flash' is unknown" in capsys.readouterr().err
