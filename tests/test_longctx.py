"""Long context through the real path (HF -> convert -> load): blockwise attention and chunked
prefill against HF eager, on tiny models with short windows and on a narrow model with the real
window (4,096) at 8,192 tokens."""

import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax import cache as kv
from gemma_jax import sampler
from gemma_jax.attention import ENV, AttentionConfig
from hf_oracle import hf_generate, hf_logits, hf_model, save

SMALL_BLOCKS = AttentionConfig(impl="blockwise", block_q=4, block_kv=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer model, window 4, GQA 4/2; HF and ours."""
    root = tmp_path_factory.mktemp("tiny")
    hf = hf_model(seed=11, embed_std=0.1, max_position_embeddings=128)
    save(hf, root / "hf")
    gemma_jax.convert(root / "hf", root / "ckpt")
    return hf, gemma_jax.load(root / "ckpt")


def test_blockwise_forced_logits_equal_hf(tiny, report):
    hf, ours = tiny
    ids = np.random.default_rng(0).integers(0, 128, (2, 45))
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # left padding
    got = ours.with_attention(SMALL_BLOCKS).logits(ids, attention_mask=mask)
    dense = ours.with_attention("xla").logits(ids, attention_mask=mask)
    ref = hf_logits(hf, ids[:1])
    diff = float(np.abs(got[0] - ref[0]).max())
    report("blockwise (blocks 4/8) vs HF eager max|dlogit|", diff)
    assert diff <= 2e-4
    np.testing.assert_allclose(got[1, 7:], dense[1, 7:], atol=2e-5, rtol=0)


def test_chunked_prefill_generates_like_hf(tiny):
    """Prompts of different lengths prefilled 8 tokens at a time (the ring of 4 wraps inside every
    chunk), then decoded: HF greedy, and the same as one unchunked prefill."""
    hf, ours = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in (37, 5, 16)]
    new = 10
    cache_len = sampler.bucket(max(map(len, prompts)) + new, 32)
    outs = {}
    for chunk in (8, sampler.PREFILL_CHUNK):
        cache = ours.new_cache(len(prompts), cache_len)
        result, _ = sampler.run(ours.graphdef, ours.state, cache, prompts, [0] * 3, new, sampler.Sampling(), 0,
                                [], 0, fresh=True, chunk_size=chunk)
        outs[chunk] = result.tokens
    assert outs[8] == outs[sampler.PREFILL_CHUNK]
    for prompt, row in zip(prompts, outs[8]):
        assert row == hf_generate(hf, prompt, new)


def test_prefill_chunk_logits_and_cache(tiny):
    """The engine-facing call: chunk after chunk into one cache, logits of each chunk's last token
    equal the no-cache forward at that position; cache.end advances per row."""
    _, ours = tiny
    rng = np.random.default_rng(2)
    rows = [rng.integers(3, 128, 29).tolist(), rng.integers(3, 128, 13).tolist()]
    forward = [ours.logits([r])[0] for r in rows]
    cache = kv.init_cache(ours.config, 2, 32)
    done = [0, 0]
    for sizes in ((9, 13), (12, 0), (8, 0)):
        pieces = [r[d:d + n] for r, d, n in zip(rows, done, sizes)]
        tokens, positions = sampler.pad_chunk(pieces, done, 16, 0)
        cache, logits = sampler.prefill_chunk(ours.graphdef, ours.state, cache, jnp.asarray(tokens),
                                              jnp.asarray(positions), fresh=done == [0, 0])
        for i, n in enumerate(sizes):
            done[i] += n
            if n:
                np.testing.assert_allclose(np.asarray(logits[i]), forward[i][done[i] - 1], atol=2e-5, rtol=0)
        assert np.asarray(cache.end).tolist() == done


def test_split_prompts_aligns_last_pieces():
    calls = sampler.split_prompts([list(range(10)), [7, 8, 9]], [0, 5], 4)
    assert calls == [([[0, 1, 2, 3], []], [0, 5]), ([[4, 5, 6, 7], []], [4, 5]), ([[8, 9], [7, 8, 9]], [8, 5])]


# ----------------------------------------------------------------------- 8,192 tokens, real window
LONG = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4096,
            max_position_embeddings=8192)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    root = tmp_path_factory.mktemp("narrow")
    hf = hf_model(seed=5, embed_std=0.1, **LONG)
    save(hf, root / "hf")
    gemma_jax.convert(root / "hf", root / "ckpt")
    with pytest.MonkeyPatch.context() as env:  # the library's default, whatever the caller's environment
        env.delenv(ENV, raising=False)
        ours = gemma_jax.load(root / "ckpt")
    assert ours.config.sliding_window == 4096 and ours.config.max_position_embeddings == 8192
    return hf, ours


def test_8192_token_logits_equal_hf(narrow, report):
    hf, ours = narrow
    ids = np.random.default_rng(3).integers(3, 128, (1, 8192))
    ref = hf_logits(hf, ids)[0]
    got = ours.logits(ids)[0]                                    # auto: blockwise at this length
    assert ours.attention.impl == "auto"
    diff = np.abs(got - ref).max(axis=-1)
    scale = float(np.abs(ref).max())
    report("8192 tokens (window 4096) max|dlogit| before / past the window",
           f"{diff[:4096].max():.2e} / {diff[4096:].max():.2e} (logit scale {scale:.1f})")
    assert diff.max() <= 1e-4 * scale
    # the comparison can tell a wrong window apart: without it, logits move past position 4096 only
    mutant = ours.model
    for block in mutant.blocks:
        block.attn.window = None
    wrong = np.abs(gemma_jax.Gemma(mutant).logits(ids)[0] - ref).max(axis=-1)
    report("8192 tokens, window ignored: max|dlogit| before / past the window",
           f"{wrong[:4096].max():.2e} / {wrong[4096:].max():.2e}")
    assert wrong[:4096].max() <= 1e-4 * scale < wrong[4096:].max() / 10

def test_greedy_decode_past_8000_equals_hf(narrow):
    hf, ours = narrow
    prompt = np.random.default_rng(4).integers(3, 128, 8100).tolist()
    new = 12
    got = ours.generate_ids([prompt], new, stop_ids=[])[0]       # chunked prefill (1,024) + decode
    assert len(prompt) > 3 * sampler.PREFILL_CHUNK
    assert got == hf_generate(hf, prompt, new)
    assert len(set(got)) > 1
