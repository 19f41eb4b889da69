"""The sampler and KV cache against references: HF `generate` (greedy), the no-cache forward pass
(logits at every step), independently computed sampling distributions, and the compile budget.

Models are tiny random HF Gemma 2 models converted through the real path (save -> convert -> load),
with small embeddings (embed_std=0.1) so greedy outputs are not one repeated token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_jax
from gemma_jax import GenerationError, gemma2_2b, sampler
from gemma_jax import cache as kv
from hf_oracle import hf_generate, hf_model, save

# name -> hf_model arguments. Windows are a few tokens; every run generates >= 3x the window.
MODELS = {
    "tiny": dict(seed=1),  # 3 layers: sliding, full, sliding; window 4; GQA 4/2
    # MQA, a window (3) that does not divide the cache length, an explicit non-alternating layer order.
    "mqa_w3_layer_types": dict(seed=4, num_key_value_heads=1, sliding_window=3, num_hidden_layers=4,
                               layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"]),
    # A window larger than the cache: the ring of a sliding layer is clamped to the cache length.
    "window_over_cache": dict(seed=5, sliding_window=80),
    # Long prompts for the compilation budget.
    "long": dict(seed=2, max_position_embeddings=256),
}
NEW = 18  # new tokens: >= 3x every window above, so the ring buffers wrap several times


def _prompts():
    rng = np.random.default_rng(0)
    # longer than the window, a single token, between, and one whose prompt + NEW tokens does not
    # fit the shortest cache (32); ids >= 3 (no pad/eos/bos in prompts)
    return [rng.integers(3, 128, n).tolist() for n in (13, 1, 6, 20)]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """converted(name) -> (HF model, our loaded Gemma), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            hf = hf_model(embed_std=0.1, vocab_size=128, **MODELS[name])
            save(hf, root / "hf")
            gemma_jax.convert(root / "hf", root / "ckpt")
            built[name] = hf, gemma_jax.load(root / "ckpt")
        return built[name]

    return get


@pytest.fixture(scope="module")
def tiny(converted):
    return converted("tiny")


@pytest.fixture(scope="module")
def greedy_nostop(tiny):
    """Our greedy outputs for PROMPTS with no stop ids (checked against HF in test 1)."""
    return tiny[1].generate_ids(PROMPTS, NEW, stop_ids=[])


def _padded_logits(ours, rows):
    """No-cache forward logits of each row, in one right-padded batch (one compilation)."""
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return [x[:len(r)] for x, r in zip(ours.logits(ids, attention_mask=mask), rows)]


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


# ----------------------------------------------------------------------------- 1. greedy vs HF
@pytest.mark.parametrize("name", ["tiny", "mqa_w3_layer_types", "window_over_cache"])
def test_greedy_matches_hf_generate(converted, name):
    hf, ours = converted(name)
    c = ours.config
    cache_len = sampler.bucket(max(map(len, PROMPTS)) + NEW, 32)
    if name == "window_over_cache":  # the ring really is clamped to the cache length here
        assert c.sliding_window > cache_len and kv.layer_slots(c, 0, cache_len) == cache_len
    else:  # the ring wraps several times, and one prompt alone is longer than the window
        assert NEW >= 3 * c.sliding_window and max(map(len, PROMPTS)) > c.sliding_window
    out = ours.generate_ids(PROMPTS, NEW, stop_ids=[])
    for prompt, row in zip(PROMPTS, out):
        assert row == hf_generate(hf, prompt, NEW), f"prompt of length {len(prompt)}"
    assert [len(r) for r in out] == [NEW] * len(PROMPTS)
    assert len({t for r in out for t in r}) > 2, "degenerate outputs: the comparison would be vacuous"


# ----------------------------------------------------------------------------- 2. eos like HF
def test_default_stop_is_eos_like_hf(tiny):
    hf, ours = tiny
    assert ours.config.eos_token_ids == (1,)
    out = ours.generate_ids(PROMPTS, NEW)  # default stop ids: the config's eos
    stopped = 0
    for prompt, row in zip(PROMPTS, out):
        ref = hf_generate(hf, prompt, NEW, eos=1)
        if ref[-1:] == [1]:
            stopped += 1
            ref = ref[:-1]
        assert row == ref, f"prompt of length {len(prompt)}"
    # meaningful only if eos ends some rows early and not others
    assert 0 < stopped < len(PROMPTS)
    assert min(map(len, out)) < NEW - 1 and max(map(len, out)) == NEW


# ----------------------------------------------------------------------------- 3. cache vs no cache
@functools.partial(jax.jit, static_argnames=("graphdef", "attend"))
def _step(graphdef, state, tokens, positions, cache, attend):
    m = nnx.merge(graphdef, state)
    hidden, cache = m(tokens, positions, cache, attend_cache=attend)
    return m.logits(hidden), cache


def _drive(ours, rows, schedule, max_length):
    """Feed `rows` through the model with a KV cache, chunk by chunk.

    schedule: list of (sizes per row, attend_cache). Single tokens go in as [B, 1] (a finished row
    as padding, position -1), like the decode loop; longer chunks right-padded to 8.
    Returns {(row, position): logits} and checks cache.end after every call.
    """
    cache = kv.init_cache(ours.config, len(rows), max_length, ours.dtype)
    done = [0] * len(rows)
    got = {}
    for sizes, attend in schedule:
        t = 1 if max(sizes) == 1 else 8
        tokens = np.zeros((len(rows), t), np.int32)
        positions = np.full((len(rows), t), -1, np.int32)
        for i, n in enumerate(sizes):
            tokens[i, :n] = rows[i][done[i]:done[i] + n]
            positions[i, :n] = np.arange(done[i], done[i] + n)
        logits, cache = _step(ours.graphdef, ours.state, jnp.asarray(tokens), jnp.asarray(positions), cache,
                              attend=attend)
        logits = np.asarray(logits)
        for i, n in enumerate(sizes):
            for j in range(n):
                got[i, done[i] + j] = logits[i, j]
            done[i] += n
        np.testing.assert_array_equal(np.asarray(cache.end), done)
    assert done == [len(r) for r in rows]
    return got


@pytest.mark.parametrize("name", ["tiny", "mqa_w3_layer_types"])
def test_cached_logits_equal_forward_at_every_step(converted, name, report):
    _, ours = converted(name)
    w = ours.config.sliding_window
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, ours.config.vocab_size, n).tolist() for n in (22, 14)]
    assert min(map(len, rows)) >= 3 * w
    schedule = ([((7, 3), False)]            # prefill into an empty cache (prompt > window)
                + [((1, 1), True)] * 3       # one token at a time
                + [((6, 5), True)]           # a chunk longer than the window appended (chat turn)
                + [((1, 1), True)] * 2
                + [((2, 0), True)]           # row 1 gets only padding in this chunk
                + [((1, 1), True)]
                + [((1, 0), True)])          # row 1 is finished: padding only
    assert [sum(s[i] for s, _ in schedule) for i in range(2)] == [22, 14]
    got = _drive(ours, rows, schedule, max_length=32)
    worst = 0.0
    for i, (row, ref) in enumerate(zip(rows, _padded_logits(ours, rows))):
        for p in range(len(row)):
            np.testing.assert_allclose(got[i, p], ref[p], atol=1e-5, rtol=0, err_msg=f"row {i} position {p}")
            worst = max(worst, float(np.abs(got[i, p] - ref[p]).max()))
    report(f"cached vs forward max|dlogit| {name}", worst)


def test_cache_ring_slots(tiny):
    """The ring buffer of a sliding layer holds exactly the last W positions after a wrap."""
    c = tiny[1].config
    w = c.sliding_window
    end = jnp.asarray([0, 3, w, 2 * w + 1], jnp.int32)
    held = np.asarray(kv.slot_positions(end, w))
    for e, slots in zip([0, 3, w, 2 * w + 1], held):
        assert sorted(p for p in slots if p >= 0) == list(range(max(0, e - w), e))
        for s, p in enumerate(slots):
            assert p < 0 or p % w == s


# ----------------------------------------------------------------------------- 4. logprobs
def test_greedy_logprobs_equal_log_softmax_of_forward(tiny, greedy_nostop):
    _, ours = tiny
    ids, logprobs = ours.generate_ids(PROMPTS, NEW, stop_ids=[], return_logprobs=True)
    assert ids == greedy_nostop
    full = [p + r for p, r in zip(PROMPTS, ids)]
    all_logits = _padded_logits(ours, full)
    for prompt, row, lp, logits in zip(PROMPTS, ids, logprobs, all_logits):
        assert len(lp) == len(row) == NEW
        for j, tok in enumerate(row):
            at = logits[len(prompt) - 1 + j]
            assert tok == int(np.argmax(at))
            np.testing.assert_allclose(lp[j], log_softmax(at)[tok], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 5. sampling runs
def test_sampling_seeds_top_k1_and_batch_independence(tiny, greedy_nostop):
    _, ours = tiny
    gen = lambda prompts, **kw: ours.generate_ids(prompts, NEW, stop_ids=[], **kw)  # noqa: E731
    assert gen(PROMPTS, temperature=1.0, top_k=1, seed=3) == greedy_nostop
    a = gen(PROMPTS, temperature=1.0, seed=3)
    assert a != greedy_nostop, "sampling at temperature 1 returned the greedy output"
    assert gen(PROMPTS, temperature=1.0, seed=3) == a
    # the tiny model's next-token distributions are nearly flat, so temperature 1 is already "hot"
    assert gen(PROMPTS, temperature=1.0, seed=4) != a
    # a row's output does not depend on the other rows of the batch (keys are per row)
    assert gen(PROMPTS[:1], temperature=1.0, seed=3) == a[:1]
    other = [PROMPTS[0], list(range(3, 12)), PROMPTS[2]]  # a different row in the middle
    b = gen(other, temperature=1.0, seed=3)
    assert b[0] == a[0] and b[2] == a[2] and b[1] != a[1]


# ----------------------------------------------------------------------------- 6. distributions
def expected_distribution(logits, temperature, top_k=None, top_p=None):
    """HF semantics, in NumPy: temperature, then top-k, then top-p (the smallest set of best tokens
    whose cumulative probability >= p), renormalised."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    order = np.argsort(-z, kind="stable")
    if top_k is not None:
        keep[order[top_k:]] = False
    if top_p is not None:
        probs = np.where(keep, np.exp(z - z.max()), 0.0)
        probs /= probs.sum()
        cum = np.cumsum(probs[order])
        n = int(np.searchsorted(cum, top_p) + 1)  # first prefix with cumulative mass >= p
        keep[order[n:]] = False
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


LOGITS8 = np.array([1.2, 2.0, -0.3, 0.9, 0.1, 1.6, -1.5, 0.4], np.float32)  # no ties
DIST_CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.3, top_k=3),
    "top_p": dict(temperature=1.5, top_p=0.8),
    "top_k_top_p": dict(temperature=2.0, top_k=6, top_p=0.65),
}


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_pick_distribution(case):
    kw = DIST_CASES[case]
    expected = expected_distribution(LOGITS8, **kw)
    # the case must tell the right order of operations from the wrong one (top-p before temperature)
    if "top_p" in kw:
        wrong = expected_distribution(LOGITS8, 1.0, kw.get("top_k"), kw["top_p"])
        assert ((wrong > 0) != (expected > 0)).any()
    sampling = sampler.Sampling(**kw)
    one = sampler.Rows.build([sampling], sampler.row_keys(0, 1))
    filtered = np.asarray(sampler.filter_rows(jnp.asarray(LOGITS8[None]), one))[0]
    np.testing.assert_array_equal(np.isfinite(filtered), expected > 0)
    n = 20000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS8), (n, LOGITS8.size))  # identical rows, per-row keys
    rows = sampler.Rows.build([sampling] * n, sampler.row_keys(0, n))
    tokens, logprobs = sampler.sample(logits, rows, jnp.int32(5))
    tokens = np.asarray(tokens)
    np.testing.assert_allclose(np.asarray(logprobs), log_softmax(LOGITS8)[tokens], atol=1e-5)
    freq = np.bincount(tokens, minlength=LOGITS8.size) / n
    assert (freq[expected == 0] == 0).all(), f"removed tokens were sampled: {freq}"
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert (np.abs(freq - expected) <= 5 * sigma + 1e-12).all(), f"{freq} vs {expected}"
    chi2 = float((((freq - expected) * n) ** 2 / np.where(expected > 0, expected * n, 1)).sum())
    dof = int((expected > 0).sum()) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof) + 5, f"chi-square {chi2:.1f} with {dof} dof"


def test_first_token_distribution_end_to_end(tiny):
    _, ours = tiny
    prompt, t, n = PROMPTS[2], 0.5, 4096
    expected = softmax(ours.logits([prompt])[0, -1].astype(np.float64) / t)
    out = ours.generate_ids([prompt] * n, 1, temperature=t, seed=1, stop_ids=[])
    freq = np.bincount([r[0] for r in out], minlength=expected.size) / n
    bound = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12
    assert (np.abs(freq - expected) <= bound).all()
    # ... and that bound would catch a sampler ignoring the temperature
    untempered = softmax(ours.logits([prompt])[0, -1].astype(np.float64))
    assert (np.abs(untempered - expected) > bound).any()


# ----------------------------------------------------------------------------- 7. stops and stream
def _stop_token(nostop):
    """A token that ends row 0 early (not at its first position) but does not occur in row 1."""
    for tok in nostop[0][1:]:
        if tok not in nostop[1]:
            return tok
    raise AssertionError(f"no usable stop token in {nostop}")


def _cut(row, stop):
    return row[:row.index(stop)] if stop in row else row


def test_stop_ids_end_rows_independently(tiny, greedy_nostop):
    _, ours = tiny
    stop = _stop_token(greedy_nostop)
    expected = [_cut(r, stop) for r in greedy_nostop]
    assert 0 < len(expected[0]) < NEW and len(expected[1]) == NEW
    assert ours.generate_ids(PROMPTS, NEW, stop_ids=[stop]) == expected


def test_stream_delivers_exactly_the_returned_tokens(tiny, greedy_nostop):
    _, ours = tiny
    stop = _stop_token(greedy_nostop)
    streamed = [[] for _ in PROMPTS]
    calls = []

    def on_tokens(new_per_row):
        calls.append([len(n) for n in new_per_row])
        for acc, new in zip(streamed, new_per_row):
            acc.extend(new)

    decode_programs = sampler.decode._cache_size()
    out = ours.generate_ids(PROMPTS, NEW, stop_ids=[stop], stream=on_tokens)
    assert out == [_cut(r, stop) for r in greedy_nostop]
    # streaming reuses the non-streaming decode program (already compiled for these shapes)
    assert sampler.decode._cache_size() == decode_programs
    assert streamed == out
    assert len(calls) > 1 and all(max(c) <= 1 for c in calls)  # tokens arrive as they are made


def test_stream_can_stop_a_row(tiny, greedy_nostop):
    _, ours = tiny
    streamed = [[] for _ in PROMPTS]

    def on_tokens(new_per_row):
        for acc, new in zip(streamed, new_per_row):
            acc.extend(new)
        return [0] if len(streamed[0]) >= 5 else []

    out = ours.generate_ids(PROMPTS, NEW, stop_ids=[], stream=on_tokens)
    assert streamed == out
    assert out[0] == greedy_nostop[0][:5]
    assert out[1:] == greedy_nostop[1:]


@pytest.mark.parametrize("early_stop", [False, True])
def test_continuing_from_the_returned_cache(tiny, greedy_nostop, early_stop):
    """Chat-style: each row continues from the cache `run` returned, at its own position, with the
    rest of its history plus a new turn, and must equal a fresh run on the whole history."""
    _, ours = tiny
    stop_ids = [_stop_token(greedy_nostop)] if early_stop else []
    pad = ours.config.pad_token_id
    cache = kv.init_cache(ours.config, len(PROMPTS), sampler.bucket(max(map(len, PROMPTS)) + NEW, 32))
    greedy = sampler.Sampling()
    first, cache = sampler.run(ours.graphdef, ours.state, cache, PROMPTS, [0] * len(PROMPTS), NEW, greedy,
                               0, stop_ids, pad, fresh=True)
    assert first.tokens == [_cut(r, stop_ids[0]) if stop_ids else r for r in greedy_nostop]
    assert any(first.stopped) == early_stop
    # the cache should hold each prompt and every generated token but the last one generated (the
    # stop token of a stopped row, the last kept token of the others): a continuation feeds it first
    ends = np.asarray(cache.end).tolist()
    history = [p + t + stop_ids[:s] for p, t, s in zip(PROMPTS, first.tokens, first.stopped)]
    assert ends == [len(h) - 1 for h in history]
    turn = [[7, 8, 9], [10], [11, 12], [13, 14, 15, 16]]
    chunks = [h[e:] + u for h, e, u in zip(history, ends, turn)]
    second, _ = sampler.run(ours.graphdef, ours.state, cache, chunks, ends, NEW, greedy, 0, [], pad, fresh=False)
    assert second.tokens == ours.generate_ids([h + u for h, u in zip(history, turn)], NEW, stop_ids=[])


# ----------------------------------------------------------------------------- 8. compilations
def test_compilations_bounded_by_buckets(converted, report):
    hf, ours = converted("long")
    new = 4
    lengths = np.random.default_rng(0).integers(1, 201, 20).tolist()
    # the rules of the sampler's docstring: prompt -> pow2 >= 16, cache -> pow2 of prompt + new >= 32,
    # output buffer -> pow2 of new; start per (prompt, cache, buffer), decode per (cache, buffer)
    p2 = lambda n, lo: max(lo, 1 << (n - 1).bit_length())  # noqa: E731
    start_keys = {(p2(n, 16), p2(n + new, 32), p2(new, 1)) for n in lengths}
    decode_keys = {(p2(n + new, 32), p2(new, 1)) for n in lengths}
    before = sampler.start._cache_size(), sampler.decode._cache_size()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in lengths]
    outs = [ours.generate_ids([p], new, stop_ids=[])[0] for p in prompts]
    # the number of stop ids is no compile key either
    ours.generate_ids([prompts[0]], new, stop_ids=[1, 2, 3])
    ours.generate_ids([prompts[0]], new, stop_ids=[])
    starts = sampler.start._cache_size() - before[0]
    decodes = sampler.decode._cache_size() - before[1]
    report("compilations for 20 prompt lengths",
           f"start={starts} (bound {len(start_keys)}), decode={decodes} (bound {len(decode_keys)})")
    assert 0 < starts <= len(start_keys)
    assert 0 < decodes <= len(decode_keys)
    for p, out in zip(prompts, outs):  # every bucket size also generates correctly
        assert out == hf_generate(hf, p, new), f"prompt of length {len(p)}"


def test_position_limit_is_inclusive(converted):
    """prompt + max_new_tokens == max_position_embeddings is allowed, one more is refused.
    (After the compilation test, whose programs this reuses.)"""
    _, ours = converted("long")
    limit = ours.config.max_position_embeddings
    assert len(ours.generate_ids([[5] * (limit - 4)], 4, stop_ids=[])[0]) == 4
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        ours.generate_ids([[5] * (limit - 3)], 4, stop_ids=[])


# ----------------------------------------------------------------------------- 9. cache size
def test_cache_bytes_gemma2_2b(report):
    c = gemma2_2b()
    got = kv.cache_bytes(c, 1, 8192, jnp.bfloat16)
    slot = 2 * 4 * 256 * 2  # (k, v) x 4 kv heads x head_dim 256 x 2 bytes
    assert got["sliding"] == 13 * 4096 * slot
    assert got["full"] == 13 * 8192 * slot
    assert got["total"] == (13 * 4096 + 13 * 8192) * slot
    assert got["all_full"] == 26 * 8192 * slot
    assert got["total"] < got["all_full"]
    mib = 2 ** 20
    report("KV cache 2B, 8192 positions, bf16 (MiB)",
           f"ring-buffered {got['total'] / mib:.0f}, all-full {got['all_full'] / mib:.0f}")


def test_init_cache_shapes_match_cache_bytes(tiny):
    c = tiny[1].config
    cache = kv.init_cache(c, 2, 32, jnp.float32)
    for i, layer in enumerate(cache.layers):
        slots = 4 if c.is_sliding(i) else 32
        assert layer.k.shape == layer.v.shape == (2, slots, c.num_key_value_heads, c.head_dim)
    total = sum(x.nbytes for layer in cache.layers for x in layer)
    assert total == kv.cache_bytes(c, 2, 32, jnp.float32)["total"]
    grown = kv.grow(cache, c, 64)
    assert [layer.k.shape[1] for layer in grown.layers] == [4, 64, 4]


# ----------------------------------------------------------------------------- 10. refusals
REFUSALS = {
    "temperature<0": (dict(temperature=-0.5), "temperature"),
    "temperature nan": (dict(temperature=float("nan")), "temperature"),
    "top_p 0": (dict(temperature=1.0, top_p=0.0), "top_p"),
    "top_p 1.5": (dict(temperature=1.0, top_p=1.5), "top_p"),
    "top_k 0": (dict(temperature=1.0, top_k=0), "top_k"),
    "max_new_tokens -1": (dict(max_new_tokens=-1), "max_new_tokens"),
    "empty batch": (dict(prompts=[]), "empty"),
    "empty prompt": (dict(prompts=[[5, 6], []]), "prompt 1"),
    "out of vocab": (dict(prompts=[[5, 128]]), "vocabulary"),
    "negative id": (dict(prompts=[[-1, 5]]), "vocabulary"),
    "too long": (dict(prompts=[list(range(3, 63))], max_new_tokens=5), "max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(tiny, case):
    _, ours = tiny
    kw, word = REFUSALS[case]
    kw = {"prompts": [[5, 6, 7]], "max_new_tokens": 4, **kw}
    with pytest.raises(GenerationError, match=word):
        ours.generate_ids(**kw)


def test_top_k_top_p_from_the_best_candidates_equal_the_whole_sort():
    """filter_rows cuts from each row's best `candidates` tokens when they hold the cut and sorts the
    whole row otherwise: every row keeps the same tokens as the whole sort and the NumPy reference,
    and the same alone as next to rows that need the other path."""
    rng = np.random.default_rng(0)
    v, candidates = 512, 16
    peaked = rng.normal(size=(6, v)) + np.where(np.arange(v) < 8, 12.0, 0.0)   # mass in a few tokens
    flat = rng.normal(size=(6, v))                                                # mass spread over many
    logits = np.concatenate([peaked, flat]).astype(np.float32)
    settings = [dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_k=300),
                dict(temperature=1.0, top_k=12, top_p=0.5), dict(temperature=2.0, top_p=0.99), dict(temperature=0.8)]
    samplings = [sampler.Sampling(**kw) for kw in settings * 2]
    kwargs = settings * 2

    def kept(rows_logits, rows_samplings, n):
        rows = sampler.Rows.build(rows_samplings, sampler.row_keys(0, len(rows_samplings)))
        return np.isfinite(np.asarray(sampler.filter_rows(jnp.asarray(rows_logits), rows, candidates=n)))

    together = kept(logits, samplings, candidates)
    whole = kept(logits, samplings, v)
    for i, kw in enumerate(kwargs):
        alone = kept(logits[i:i + 1], samplings[i:i + 1], candidates)[0]
        reference = expected_distribution(logits[i], kw["temperature"], kw.get("top_k"), kw.get("top_p")) > 0
        np.testing.assert_array_equal(alone, reference, err_msg=f"row {i}: {kw}")
        np.testing.assert_array_equal(together[i], alone, err_msg=f"row {i}: {kw}")
        np.testing.assert_array_equal(whole[i], alone, err_msg=f"row {i}: {kw}")
    # the best 16 hold a row's cut exactly when it keeps at most 16 tokens (or has no cut)
    rows = sampler.Rows.build(samplings, sampler.row_keys(0, len(samplings)))
    z = jnp.asarray(logits) / rows.temperature[:, None]
    top_k = jnp.where(rows.top_k > 0, rows.top_k, v)
    _, holds = sampler.cuts_from_best(z, top_k, rows.top_p, candidates)
    sizes = together.sum(axis=1)
    assert list(np.asarray(holds[:, 0])) == [s <= candidates or kw == dict(temperature=0.8) or
                                             ("top_p" not in kw and kw["top_k"] <= candidates)
                                             for s, kw in zip(sizes, kwargs)]
    assert 0 < np.asarray(holds).sum() < len(kwargs)   # both paths in one batch
