"""The serving engine without HTTP, against references: `generate_ids` on each prompt alone and HF
`generate` (greedy), the no-cache forward pass (logprobs, top alternatives, penalties), the engine
itself alone vs under load, and the compile budget.

The engine here has 4 slots, 256 positions, prefill chunks of 32 tokens (so longer prompts are
prefilled in pieces between decode calls) and 4 tokens per decode call.
"""

import dataclasses
import queue
import threading

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma_jax
from gemma_jax import default
from gemma_jax.api import TextStream
from gemma_jax.errors import GenerationError, QueueFullError, UnavailableError
from gemma_jax.sampler import Sampling
from gemma_jax.serving import steps
from gemma_jax.serving.engine import Engine, EngineConfig
from gemma_jax.serving.types import Completion, Request
from hf_oracle import TINY_REAL_VOCAB, hf_generate, hf_model, save, with_real_tokenizer

CONFIG = EngineConfig(max_batch=4, max_length=256, max_queue=16, prefill_chunk=32, decode_steps=4)
TEXTS = ["class Parser:", "def read_config(path):", "import os\nimport sys\n", "x = 1\n" * 15]
NEW = 100   # with the longest prompt (76 tokens) past the sliding window (128)


@pytest.fixture(scope="module")
def model():
    return gemma_jax.load(default.checkpoint_dir(), dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, CONFIG).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def prompts(model):
    return [model.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """generate_ids on each prompt alone: (tokens, logprobs)."""
    out = []
    for p in prompts:
        (ids,), (lps,) = model.generate_ids([p], NEW, stop_ids=[], return_logprobs=True)
        out.append((ids, lps))
    return out


def run_all(engine, requests, timeout=300, together=False):
    """Submit every request at once (in order: the lowest free slot goes to the earliest) and
    collect each one's Completion; also returns the slot each was admitted to. together: with
    submit_many, so the loop sees them all at once (the same prefill groups each time)."""
    queues = [queue.Queue() for _ in requests]
    if together:
        handles = engine.submit_many([(r, q.put) for r, q in zip(requests, queues)])
    else:
        handles = [engine.submit(r, q.put) for r, q in zip(requests, queues)]
    results = []
    for q in queues:
        outputs = [q.get(timeout=timeout)]
        while outputs[-1].finish_reason is None:
            outputs.append(q.get(timeout=timeout))
        results.append(Completion.collect(outputs))
    return results, [h.slot for h in handles]


def lp(c: Completion) -> list[float]:
    return [x.logprob for x in c.logprobs]


# ------------------------------------------------------------------------------ determinism
def test_greedy_equals_generate_ids_in_every_slot_and_mix(engine, prompts, reference, report):
    """Each prompt alone, then in every slot beside the others while sampled requests take the
    slots that free up (the batch changes under it): the same tokens as generate_ids on the prompt
    alone, and logprobs within 1e-5 of alone (a decode over 4 rows is a different XLA program from
    one over 2: the last bits may differ, see docs/serving.md)."""
    assert max(map(len, prompts)) > CONFIG.prefill_chunk            # one prompt is prefilled in chunks
    assert max(map(len, prompts)) + NEW > engine.model.config.sliding_window
    alone = [run_all(engine, [Request(p, NEW, logprobs=0)])[0][0] for p in prompts]
    worst = 0.0
    for c, (ids, lps), p in zip(alone, reference, prompts):
        assert c.token_ids == ids and c.finish_reason == "length" and c.completion_tokens == NEW
        worst = max(worst, float(np.abs(np.asarray(lp(c)) - lps).max()))
        if len(p) <= CONFIG.prefill_chunk:   # one prefill call, the same program shape: the same bits
            assert lp(c)[0] == np.float32(lps[0])
    assert worst < 1e-4
    report("engine vs generate_ids alone, max |d logprob| (default model)", worst)
    seen = set()
    fillers = [Request(prompts[j], 60, Sampling(temperature=0.8, top_p=0.9, presence_penalty=0.3), seed=j, logprobs=2)
               for j in range(2)]
    for k in range(CONFIG.max_batch):
        order = [(k + j) % 4 for j in range(4)]
        lengths = [NEW - 15 * j for j in range(4)]   # rows finish at different steps; fillers take their slots
        out, slots = run_all(engine, [Request(prompts[i], n, logprobs=0) for i, n in zip(order, lengths)] + fillers)
        for c, i, n, slot in zip(out, order, lengths, slots):
            seen.add((i, slot))
            assert c.token_ids == reference[i][0][:n]
            np.testing.assert_allclose(lp(c), lp(alone[i])[:n], rtol=0, atol=1e-5)
        assert all(c.finish_reason == "length" for c in out[4:])
    assert seen == {(i, s) for i in range(4) for s in range(CONFIG.max_batch)}


def test_short_prompts_admitted_together_share_one_prefill_call(engine, prompts, reference):
    """Three short prompts submitted together (generate_many): one prefill call of [4, 16] (a
    padding row) fills three slots, and each request's tokens equal generate_ids on its prompt alone."""
    short = [i for i, p in enumerate(prompts) if len(p) <= 16]
    assert len(short) == 3
    before = engine.prefill_calls
    done = engine.generate_many([Request(prompts[i], 40) for i in short], timeout=300)
    assert [c.token_ids for c in done] == [reference[i][0][:40] for i in short]
    assert engine.prefill_calls - before == 1


def test_decode_calls_last_about_decode_call_ms(model, prompts, reference):
    """Each decode call makes as many steps as fit in decode_call_ms by the measured step time, up
    to decode_steps: one a call for a tiny target, the cap for a huge one (after a first call of
    one step that measures it); no call is queued once the device has finished every row."""
    calls = {}
    for ms in (1e-3, 1e6):
        engine = Engine(model, dataclasses.replace(CONFIG, decode_steps=16, decode_call_ms=ms)).start(warmup="none")
        try:
            before = engine.decode_calls
            c = engine.generate(Request(prompts[0], 34), timeout=300)
            calls[ms] = engine.decode_calls - before
        finally:
            engine.stop()
        assert c.token_ids == reference[0][0][:34]
    assert calls == {1e-3: 33, 1e6: 3}   # the first token comes from the prefill; then 1 + 16 + 16


def test_greedy_equals_hf_generate_on_tiny_random_models(tmp_path_factory):
    """On a tiny random HF model (MQA, window 3: every ring wraps), in a batch that mixes greedy
    and sampled rows: HF's greedy tokens."""
    for seed, overrides in ((4, dict(num_key_value_heads=1, sliding_window=3, num_hidden_layers=4)),):
        root = tmp_path_factory.mktemp(f"tiny{seed}")
        hf = hf_model(seed=seed, embed_std=0.1, vocab_size=128, **overrides)
        save(hf, root / "hf")
        gemma_jax.convert(root / "hf", root / "ckpt")
        ours = gemma_jax.load(root / "ckpt")
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(3, 128, n).tolist() for n in (13, 1, 6, 20, 9)]
        engine = Engine(ours, EngineConfig(max_batch=3, max_length=64, prefill_chunk=16, decode_steps=3)).start()
        try:
            requests = [Request(p, 18, stop_ids=()) for p in prompts]
            requests.insert(2, Request(prompts[0], 30, Sampling(temperature=1.0), seed=5))
            out, _ = run_all(engine, requests)
        finally:
            engine.stop()
        del out[2]
        for p, c in zip(prompts, out):
            assert c.token_ids == hf_generate(hf, p, 18), f"prompt of length {len(p)}"
        assert len({t for c in out for t in c.token_ids}) > 2


def test_seeded_sampling_is_the_same_alone_and_under_load(engine, prompts):
    s = Sampling(temperature=0.9, top_p=0.95, top_k=100, frequency_penalty=0.2)
    alone = run_all(engine, [Request(prompts[0], 40, s, seed=123, logprobs=0)])[0][0]
    again = run_all(engine, [Request(prompts[0], 40, s, seed=123, logprobs=0)])[0][0]
    loaded = run_all(engine, [Request(prompts[1], 50, Sampling(temperature=1.0), seed=1), Request(prompts[2], 50),
                              Request(prompts[0], 40, s, seed=123, logprobs=0)])[0][2]
    assert alone.token_ids == again.token_ids == loaded.token_ids
    assert lp(alone) == lp(again)   # the same programs: the same bits
    np.testing.assert_allclose(lp(loaded), lp(alone), rtol=0, atol=1e-5)
    other = run_all(engine, [Request(prompts[0], 40, s, seed=124)])[0][0]
    greedy = run_all(engine, [Request(prompts[0], 40)])[0][0]
    assert other.token_ids != alone.token_ids and greedy.token_ids != alone.token_ids
    # without penalties, the engine's seeded stream is generate_ids' row 0 with that seed
    plain = Sampling(temperature=0.9, top_p=0.95, top_k=100)
    mine = run_all(engine, [Request(prompts[0], NEW, plain, seed=7)])[0][0]
    assert mine.token_ids == engine.model.generate_ids([prompts[0]], NEW, temperature=0.9, top_p=0.95, top_k=100,
                                                       seed=7, stop_ids=[])[0]


# ------------------------------------------------------------------------------ against the forward pass
def forward(model, ids):
    """No-cache float64 logits [T, V] of one sequence (padded to 32: one compilation for both tests)."""
    padded = np.zeros((1, 32), np.int32)
    padded[0, :len(ids)] = ids
    mask = (np.arange(32) < len(ids))[None].astype(np.int32)
    return model.logits(padded, attention_mask=mask)[0, :len(ids)].astype(np.float64)


def test_logprobs_and_alternatives_match_the_forward(engine, model, prompts):
    c = run_all(engine, [Request(prompts[1], 12, logprobs=5)])[0][0]
    logits = forward(model, prompts[1] + c.token_ids)
    for j, entry in enumerate(c.logprobs):
        at = logits[len(prompts[1]) - 1 + j]
        ref = at - at.max() - np.log(np.exp(at - at.max()).sum())
        assert entry.id == int(np.argmax(at)) == entry.top[0][0]
        np.testing.assert_allclose(entry.logprob, ref[entry.id], atol=1e-4)
        assert [t for t, _ in entry.top] == np.argsort(-ref)[:5].tolist()
        np.testing.assert_allclose([v for _, v in entry.top], np.sort(ref)[::-1][:5], atol=1e-4)


def test_penalties_match_an_independent_computation(engine, model, prompts):
    """Greedy with presence/frequency penalties: each token is the argmax of the forward's logits
    minus the penalties of the tokens generated so far."""
    presence, frequency = 0.7, 0.9
    c = run_all(engine, [Request(prompts[2], 16, Sampling(presence_penalty=presence, frequency_penalty=frequency))])[0][0]
    plain = run_all(engine, [Request(prompts[2], 16)])[0][0]
    assert c.token_ids != plain.token_ids, "the penalties changed nothing: the test would be vacuous"
    logits = forward(model, prompts[2] + c.token_ids)
    counts = np.zeros(model.config.vocab_size)
    for j, token in enumerate(c.token_ids):
        adjusted = logits[len(prompts[2]) - 1 + j] - frequency * counts - presence * (counts > 0)
        assert token == int(np.argmax(adjusted)), f"token {j}"
        counts[token] += 1


# ------------------------------------------------------------------------------ ends of a request
def test_stop_ids_stop_strings_and_length(engine, model, prompts, reference):
    ids = reference[0][0]
    text = model.tokenizer.decode(ids)
    stop_id = next(t for t in ids[3:] if t not in ids[:3])
    c = run_all(engine, [Request(prompts[0], NEW, stop_ids=[stop_id])])[0][0]
    cut = ids.index(stop_id)
    assert c.finish_reason == "stop" and c.token_ids == ids[:cut] and c.completion_tokens == cut + 1
    assert c.text == model.tokenizer.decode(ids[:cut])
    stop = text[20:24]
    c = run_all(engine, [Request(prompts[0], NEW, stop_strings=[stop, "never appears"])])[0][0]
    assert c.finish_reason == "stop" and c.text == text[:text.find(stop)]
    assert model.tokenizer.decode(ids[:c.completion_tokens]).find(stop) >= 0      # the completing token
    assert model.tokenizer.decode(ids[:c.completion_tokens - 1]).find(stop) < 0   # ... and no later one
    c = run_all(engine, [Request(prompts[0], 7)])[0][0]
    assert c.finish_reason == "length" and c.token_ids == ids[:7] and c.text == model.tokenizer.decode(ids[:7])


def test_refusals(engine):
    vocab = engine.model.config.vocab_size
    cases = [(Request([], 4), "empty"), (Request([2, vocab], 4), "vocabulary"), (Request([2], 0), "max_tokens"),
             (Request([2] * 200, 57), "max length 256"), (Request([2], 4, stop_ids=list(range(9))), "stop ids"),
             (Request([2], 4, logprobs=6), "logprobs"), (Request([2], 4, seed=1.5), "seed")]
    for request, words in cases:
        with pytest.raises(GenerationError, match=words):
            engine.submit(request, lambda _: None)
    calls = engine.prefill_calls
    with pytest.raises(GenerationError, match="^request 1: prompt token"):   # all or none
        engine.submit_many([(Request([2], 4), lambda _: None), (Request([2, vocab], 4), lambda _: None)])
    assert engine.wait_idle(60) and engine.prefill_calls == calls
    assert run_all(engine, [Request([2] * 200, 56)])[0][0].completion_tokens == 56   # exactly the limit


# ------------------------------------------------------------------------------ slots, queue, failures
def test_cancel_frees_the_slot_at_the_next_boundary(engine, prompts):
    outputs, first = queue.Queue(), threading.Event()
    handle = engine.submit(Request(prompts[0], 200), lambda o: (outputs.put(o), first.set()))
    assert first.wait(60)
    calls = engine.decode_calls
    handle.cancel()
    assert engine.wait_idle(60)
    assert engine.decode_calls - calls <= 1   # the call in flight, if any, and no other
    got = []
    while not outputs.empty():
        got.append(outputs.get())
    assert got[-1].finish_reason == "abort" and got[-1].completion_tokens < 200


def test_queue_bound_and_drain(model, prompts):
    engine = Engine(model, dataclasses.replace(CONFIG, max_queue=2)).start(warmup="none")   # compiled already
    try:
        results = [queue.Queue() for _ in range(CONFIG.max_batch + 2)]
        for q in results[:CONFIG.max_batch]:   # one at a time, each admitted before the next (queue of 2)
            handle = engine.submit(Request(prompts[0], 60), q.put)
            while handle.slot is None:
                threading.Event().wait(0.01)
        with pytest.raises(QueueFullError, match="3 submitted together"):   # all or none
            engine.submit_many([(Request(prompts[0], 60), lambda _: None)] * 3)
        for q in results[CONFIG.max_batch:]:
            engine.submit(Request(prompts[0], 60), q.put)   # every slot runs, two wait
        with pytest.raises(QueueFullError, match="queue is full"):
            engine.submit(Request(prompts[0], 4), lambda _: None)
        engine.drain()
        with pytest.raises(UnavailableError, match="draining"):
            engine.submit(Request(prompts[0], 4), lambda _: None)
        assert engine.wait_idle(120)
        for q in results:   # every accepted request ran to the end
            outs = [q.get_nowait() for _ in range(q.qsize())]
            assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 60
        m = engine.metrics.render()
        assert 'reason="queue_full"} 4.0' in m and 'reason="draining"} 1.0' in m
    finally:
        engine.stop()


def test_a_failing_loop_fails_its_requests_and_reports_unhealthy(model, prompts, monkeypatch):
    engine = Engine(model, CONFIG).start(warmup="none")
    assert engine.health() == (True, "ready")

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(steps, "decode", broken)
    c = run_all(engine, [Request(prompts[0], 20)])[0][0]
    assert c.finish_reason == "error" and "device lost" in c.error
    healthy, state = engine.health()
    assert not healthy and "device lost" in state
    with pytest.raises(UnavailableError, match="failed"):
        engine.submit(Request(prompts[0], 4), lambda _: None)


def test_compiled_programs_are_bounded_by_the_shapes(model, report):
    """Prefill compiles per (prompt bucket, request bucket, fresh or continued), decode per row
    bucket: a new mix of sampling settings, logprobs, stops and penalties compiles nothing."""
    before = steps.prefill._cache_size(), steps.decode._cache_size()
    engine = Engine(model, EngineConfig(max_batch=4, max_length=96, prefill_chunk=32, decode_steps=2)).start()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 4096, n).tolist() for n in (3, 17, 30, 45, 70)]   # buckets 16, 32; chunked
    try:
        mixes = [dict(), dict(sampling=Sampling(temperature=0.7, top_k=5), seed=1, logprobs=3),
                 dict(sampling=Sampling(temperature=1.2, top_p=0.8, presence_penalty=1.0), stop_strings=["\n"]),
                 dict(sampling=Sampling(frequency_penalty=-0.5), stop_ids=[5, 6, 7])]
        run_all(engine, [Request(p, 20, **mixes[i % 4]) for i, p in enumerate(prompts)], together=True)
        counts = steps.prefill._cache_size() - before[0], steps.decode._cache_size() - before[1]
        run_all(engine, [Request(p, 20, **mixes[(i + 1) % 4]) for i, p in enumerate(prompts)], together=True)
        again = steps.prefill._cache_size() - before[0], steps.decode._cache_size() - before[1]
    finally:
        engine.stop()
    report("engine programs (prefill, decode) for 5 prompt lengths x 4 sampling mixes", f"{again}")
    assert counts == again
    # prefill: (16 | 32) x (1 | 2 | 4 requests) fresh, and (16 | 32) x 1 for a long prompt's later pieces
    assert 0 < again[1] <= len(engine.buckets) == 3 and 0 < again[0] <= 2 * 3 + 2


def test_warmup_all_compiles_every_program_before_serving(model, report):
    """warmup='all' compiles every prefill program the engine can run (each prompt bucket, fresh
    for each request bucket, continued for one) and every decode program: requests of every kind
    afterwards, alone and together, compile nothing."""
    config = EngineConfig(max_batch=3, max_length=80, prefill_chunk=32, decode_steps=2)   # shapes no other test has
    before = steps.prefill._cache_size(), steps.decode._cache_size()
    engine = Engine(model, config).start(warmup="all")
    warmed = steps.prefill._cache_size() - before[0], steps.decode._cache_size() - before[1]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 4096, n).tolist() for n in (2, 9, 16, 17, 31, 32, 40, 63)]   # buckets 16, 32; chunked
    try:
        run_all(engine, [Request(p, 6) for p in prompts], together=True)
        run_all(engine, [Request(p, 6, Sampling(temperature=0.9, top_p=0.5), seed=2) for p in prompts])
        for p in prompts[:4]:
            engine.generate(Request(p, 3), timeout=60)
        after = steps.prefill._cache_size() - before[0], steps.decode._cache_size() - before[1]
    finally:
        engine.stop()
    report("programs compiled by warmup='all' (prefill, decode), 3 slots, prefill chunk 32", f"{warmed}")
    # prefill: (16 | 32) x (1 | 2 | 4 requests, 4 capped at 3 slots) fresh + (16 | 32) continued; decode: 1, 2, 3 rows
    assert warmed == (2 * 3 + 2, 3) and after == warmed
    with pytest.raises(GenerationError, match="^warmup must be one of all, decode, none, got 'some'$"):
        Engine(model, config).start(warmup="some")


# ------------------------------------------------------------------------------ UTF-8 streaming
@pytest.fixture(scope="module")
def real_vocab_model(tmp_path_factory):
    ckpt = with_real_tokenizer(tmp_path_factory.mktemp("real"), seed=3, max_position_embeddings=512, **TINY_REAL_VOCAB)
    return gemma_jax.load(ckpt)


def test_streamed_text_is_utf8_safe_with_the_real_vocabulary(real_vocab_model):
    """Japanese prompts, sampled over the 256000-piece vocabulary: every delivery is whole
    characters (the decoded tokens so far, minus an incomplete tail), and they add up to the
    decoded tokens."""
    tok = real_vocab_model.tokenizer
    engine = Engine(real_vocab_model, EngineConfig(max_batch=2, max_length=256, prefill_chunk=32,
                                                   decode_steps=4)).start(warmup="none")
    try:
        outputs = []
        for seed in range(3):
            q = queue.Queue()
            engine.submit(Request(tok.encode("日本の首都は東京です。富士山は"), 64, Sampling(temperature=1.0), seed=seed),
                          q.put)
            outs = [q.get(timeout=120)]
            while outs[-1].finish_reason is None:
                outs.append(q.get(timeout=120))
            outputs.append(outs)
    finally:
        engine.stop()
    multibyte = 0
    for outs in outputs:
        ids, text = [], ""
        for o in outs[:-1]:
            ids += o.token_ids
            text += o.text
            assert text == tok.decode(ids).rstrip("\ufffd")
        ids += outs[-1].token_ids
        text += outs[-1].text
        assert text == tok.decode(ids)
        multibyte += sum(len(ch.encode()) > 1 for ch in text)
    assert multibyte > 10, "no multi-byte characters: the test would be vacuous"


JAPANESE = "日本語のテキスト、絵文字🇯🇵😀、かな漢字カナ。Ünïcödé ok"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_text_stream_delivers_whole_characters(real_vocab_model, data):
    """Byte-fallback pieces of Japanese and emoji, one token at a time, with stop strings: the
    pieces are whole characters, never taken back, and add up to the decoded text cut at the
    first stop string."""
    tok = real_vocab_model.tokenizer
    pieces = [tok.token_id(f"<0x{b:02X}>") for b in JAPANESE.encode()]
    words = tok.encode(JAPANESE, add_bos=False)
    ids = data.draw(st.lists(st.sampled_from(pieces + words), min_size=1, max_size=40))
    stops = data.draw(st.lists(st.sampled_from(["本語", "😀", "カナ。", "zz"]), max_size=2))
    stream = TextStream(tok, stops)
    full = tok.decode(ids)
    cuts = [full.find(s) for s in stops if s in full]
    expected = full[:min(cuts)] if cuts else full
    out = ""
    for i in range(len(ids)):
        out += stream.add([ids[i]])
        assert expected.startswith(out)   # never taken back
        if not stops:
            assert out == tok.decode(ids[:i + 1]).rstrip("\ufffd")   # all but an incomplete tail
        if stream.stopped:
            break
    out += stream.flush()
    assert out == expected
