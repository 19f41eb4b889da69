"""The core of Gemma 2 attention behind one signature: scores, soft-cap, mask, softmax, values.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim. Queries
and keys arrive rotated (RoPE applied); positions say which key each query may see (-1 = padding).
Every implementation computes, per query head h using kv head h // G:
    s = (q . k) * scale;  s = softcap(s) BEFORE the mask;  mask (0 <= k <= q, q - k < window);
    p = softmax(s) in float32;  z = p @ v.

Implementations (`AttentionConfig.impl`):
    "xla"        dense: the [B, N, T, S] scores are materialized (the only one hooks can read).
    "blockwise"  pure JAX, online softmax over key blocks in float32; a key block no query of a
                 query block can see (causality, the sliding window, padding, empty cache slots)
                 is skipped, not masked. Memory O(T x block) per layer. Any backend.
    "splash"     jax's Pallas TPU splash attention (soft-cap and a local mask in the kernel) for
                 self-attention over one chunk; see attention_tpu.py. TPU only (or interpret mode).
    "auto"       "xla" for queries shorter than `blockwise_from` (512: decode, short prompts), else
                 "blockwise". The threshold comes from measurements, see docs/performance.md.
A hook that may touch `hook_attn_scores` / `hook_pattern` always gets the dense path, whatever
the choice: those sites never disappear.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from gemma_jax.errors import ConfigError
from gemma_jax.layers import softcap as apply_softcap

MASKED = -2.3819763e38  # finite "minus infinity": a query with no visible key stays NaN-free
IMPLS = ("auto", "xla", "blockwise", "splash")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How attention is computed (never what): a static part of the model, so a change recompiles.

    blockwise_from: with impl="auto", query lengths from this one up use "blockwise".
    block_q, block_kv: blockwise tile sizes (queries, keys).
    splash_block: splash's block size (a multiple of 128); interpret: run Pallas kernels in
    TPU interpret mode (tests on CPU).
    """

    impl: str = "auto"
    blockwise_from: int = 512
    block_q: int = 256
    block_kv: int = 256
    splash_block: int = 512
    interpret: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ConfigError(f"attention implementation {self.impl!r} is unknown; choose one of {', '.join(IMPLS)}")
        for name in ("blockwise_from", "block_q", "block_kv", "splash_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"attention option {name} must be a positive integer, got {value!r}")
        if self.splash_block % 128:
            raise ConfigError(f"attention option splash_block must be a multiple of 128, got {self.splash_block}")


ENV = "GEMMA_JAX_ATTENTION"  # e.g. "blockwise" or "blockwise,block_q=4,block_kv=8": the default


def attention_config(value: str | AttentionConfig | None) -> AttentionConfig:
    """An AttentionConfig from a config, a spec string ('blockwise' or 'blockwise,block_q=64,...')
    or None (the spec in $GEMMA_JAX_ATTENTION, else 'auto')."""
    if isinstance(value, AttentionConfig):
        return value
    if value is None:
        value = os.environ.get(ENV) or "auto"
    if not isinstance(value, str):
        raise ConfigError(f"attention must be one of {', '.join(IMPLS)} or an AttentionConfig, got {value!r}")
    impl, *options = value.split(",")
    fields = {f.name: f.type for f in dataclasses.fields(AttentionConfig)}
    kwargs = {}
    for option in options:
        key, _, text = option.partition("=")
        if key not in fields or key == "impl" or not text:
            raise ConfigError(f"attention option {option!r} is not one of "
                              f"{', '.join(k + '=...' for k in fields if k != 'impl')}")
        kwargs[key] = text.lower() in ("1", "true") if key == "interpret" else _int(key, text)
    return AttentionConfig(impl=impl.strip(), **kwargs)


def _int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"attention option {key} must be an integer, got {text!r}") from None


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: key visible to query iff 0 <= k <= q (and q - W < k on sliding layers).

    Positions of -1 mark padding (never visible as keys).
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def hook_reads_scores(hook, name: str) -> bool:
    """Whether `hook` may read or edit this layer's scores or pattern. A hook that lists its sites
    (`hook.sites`, as hooks.Hooks does) is taken at its word; any other callable may touch any site."""
    if hook is None:
        return False
    sites = getattr(hook, "sites", None)
    return sites is None or f"{name}.hook_attn_scores" in sites or f"{name}.hook_pattern" in sites


def choose(config: AttentionConfig, t: int, self_attention: bool, hook=None, name: str = "") -> str:
    """The implementation that runs for T queries: 'xla', 'blockwise' or 'splash'."""
    if hook_reads_scores(hook, name):
        return "xla"
    if config.impl == "auto":
        return "blockwise" if t >= config.blockwise_from else "xla"
    if config.impl == "splash" and not (self_attention and t > 1):
        return "xla" if t == 1 else "blockwise"  # decode / a chunk over a cache: not splash's shape
    return config.impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
           scale: float, softcap: float | None, window: int | None, hook=None, name: str = "",
           config: AttentionConfig | None = None) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], q_pos [B, T], k_pos [B, S] -> z [B, T, N, H].

    `config` chooses the implementation (see the module docstring); when `k_pos is q_pos` the keys
    are the queries' own (self-attention over one chunk: splash can run). Hook sites
    `{name}.hook_attn_scores` / `{name}.hook_pattern` ([B, N, T, S]) exist on the dense path,
    which runs whenever `hook` may read them.
    """
    config = config or attention_config(None)
    impl = choose(config, q.shape[1], k_pos is q_pos, hook, name)
    kwargs = dict(scale=scale, softcap=softcap, window=window)
    if impl == "blockwise":
        return blockwise(q, k, v, q_pos, k_pos, **kwargs, block_q=config.block_q, block_kv=config.block_kv)
    if impl == "splash":
        from gemma_jax.attention_tpu import splash
        return splash(q, k, v, q_pos, **kwargs, block=config.splash_block, interpret=config.interpret,
                      fallback=lambda: blockwise(q, k, v, q_pos, k_pos, **kwargs, block_q=config.block_q,
                                                 block_kv=config.block_kv))
    return dense(q, k, v, q_pos, k_pos, **kwargs, hook=hook, name=name)


def dense(q, k, v, q_pos, k_pos, *, scale, softcap, window, hook=None, name=""):
    """The dense XLA path: the [B, N, T, S] scores are materialized, so `hook` sees
    `{name}.hook_attn_scores` and `{name}.hook_pattern` ([B, N, T, S])."""
    b, t, n, h = q.shape
    kv_heads, dt = k.shape[2], q.dtype
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = _scores(q, k, scale, softcap)
    mask = attention_mask(q_pos, k_pos, window)[:, None, None]
    scores = jnp.where(mask, scores, MASKED)
    if hook is not None:  # sites see [B, N, T, S]
        scores = hook(f"{name}.hook_attn_scores", scores.reshape(b, n, t, -1)).reshape(scores.shape)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    if hook is not None:
        probs = hook(f"{name}.hook_pattern", probs.reshape(b, n, t, -1)).reshape(probs.shape)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


def _scores(q, k, scale, softcap):
    """q [B, T, K, G, H], k [B, S, K, H] -> scaled, soft-capped float32 scores [B, K, G, T, S]
    (the product rounded to the compute dtype before the scale, as HF)."""
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32).astype(q.dtype) * scale
    return apply_softcap(scores.astype(jnp.float32), softcap)  # soft-cap before the mask


# --------------------------------------------------------------------------------- blockwise
def _pad_to(x: jax.Array, axis: int, size: int, value) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def blockwise(q, k, v, q_pos, k_pos, *, scale, softcap, window, block_q: int = 256, block_kv: int = 256):
    """Online-softmax attention over key blocks (float32 statistics), query blocks one at a time.

    A key block is visited only if some query of the block may see some key of it (by position:
    k <= q, q - k < W, k >= 0), decided per (query block, key block) from each block's smallest and
    largest position; a skipped block costs a branch, no arithmetic. Exact up to float rounding:
    inside a visited block the mask is the dense path's. GQA without repeating k/v.
    Memory: [B, K, G, block_q, block_kv] scores at a time, plus O(T) for inputs and outputs.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g, dt = n // kv_heads, q.dtype
    bq, bk = min(block_q, t), min(block_kv, s)
    nq, nk = -(-t // bq), -(-s // bk)
    q = _pad_to(q, 1, nq * bq, 0).reshape(b, nq, bq, kv_heads, g, h).swapaxes(0, 1)
    q_pos = _pad_to(q_pos, 1, nq * bq, -1).reshape(b, nq, bq).swapaxes(0, 1)          # [nq, B, bq]
    k = _pad_to(k, 1, nk * bk, 0).reshape(b, nk, bk, kv_heads, h).swapaxes(0, 1)       # [nk, B, bk, K, H]
    v = _pad_to(v, 1, nk * bk, 0).reshape(b, nk, bk, kv_heads, h).swapaxes(0, 1)
    k_pos = _pad_to(k_pos, 1, nk * bk, -1).reshape(b, nk, bk).swapaxes(0, 1)          # [nk, B, bk]
    big = jnp.iinfo(jnp.int32).max
    k_lo = jnp.min(jnp.where(k_pos >= 0, k_pos, big), axis=-1)                          # [nk, B]
    k_hi = jnp.max(k_pos, axis=-1)                                                       # -1: empty

    def query_block(qb, qp):                                                             # [B, bq, K, G, H], [B, bq]
        q_hi = jnp.max(qp, axis=-1)                                                      # [B]
        q_lo = jnp.min(jnp.where(qp >= 0, qp, big), axis=-1)
        needed = (k_hi >= 0) & (k_lo <= q_hi)                                            # [nk, B]
        if window is not None:
            needed &= k_hi > q_lo - window
        needed = jnp.any(needed, axis=-1)                                                # [nk]

        def visit(carry, kb, vb, kp):
            m, l, acc = carry
            scores = _scores(qb, kb, scale, softcap)                                     # [B, K, G, bq, bk]
            mask = attention_mask(qp, kp, window)[:, None, None]
            scores = jnp.where(mask, scores, MASKED)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            p = jnp.exp(scores - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(dt), vb, preferred_element_type=jnp.float32)
            return m_new, l, acc * correction[..., None] + pv

        def step(carry, xs):
            kb, vb, kp, need = xs
            return jax.lax.cond(need, lambda c: visit(c, kb, vb, kp), lambda c: c, carry), None

        init = (jnp.full((b, kv_heads, g, bq), MASKED, jnp.float32), jnp.zeros((b, kv_heads, g, bq), jnp.float32),
                jnp.zeros((b, kv_heads, g, bq, h), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (k, v, k_pos, needed))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]                                  # no visible key: 0
        return jnp.moveaxis(out, 3, 1).astype(dt)                                        # [B, bq, K, G, H]

    # Each query block's output replaces its queries in the same buffer (a block is read before it
    # is written, later blocks are untouched): no output buffer exists apart from the queries',
    # which XLA would otherwise allocate (and fill with zeros) at the start of the whole program.
    def step_q(i, blocks):
        return blocks.at[i].set(query_block(blocks[i], q_pos[i]))

    out = jax.lax.fori_loop(0, nq, step_q, q)                                            # [nq, B, bq, K, G, H]
    return out.swapaxes(0, 1).reshape(b, nq * bq, n, h)[:, :t]

