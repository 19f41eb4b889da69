"""int8 weights: the quantizer's bound, both int8 products against independent computations, the
int8 checkpoint (convert --quantize int8) against quantizing while loading, logits against HF's
float32 ones, hooks / sampler / chat / gradients unchanged on a quantized model, and the quality
of the default model in int8 over held-out Python text."""

from __future__ import annotations

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax import checkpoint, cli, default, interp, quant
from gemma_jax.errors import GenerationError
from gemma_jax.model import weight_in_axis
from hf_oracle import hf_logits, hf_model, save, with_real_tokenizer

MODES = quant.MODES
# Stated tolerance on tiny random HF models: max |int8 logit - float32 logit| <= 10% of the float32
# logits' standard deviation, and top-1 agreement >= 90%. (Each weight is off by <= half a step of
# 1/127 of its channel's largest value, each activation likewise in the dynamic mode; on a model
# this small, with weights this large, that compounds over 3 layers to 6-8% of a standard deviation.)
TINY_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF model (longer sequences than its window), converted float and int8."""
    root = tmp_path_factory.mktemp("quant")
    hf = hf_model(seed=3)
    save(hf, root / "hf")
    gemma_jax.convert(root / "hf", root / "float")
    gemma_jax.convert(root / "hf", root / "int8", quantize="int8")
    return hf, root


# ----------------------------------------------------------------------------------- quantizer
def test_every_weight_within_half_a_step(tiny):
    """convert --quantize int8 against HF's own tensors: int8 values stored in HF's [out, in]
    layout (gate and up stacked), |w - values * scale| <= scale / 2 for every weight of every
    matrix (float64 arithmetic), the scale being max|w| / 127 of its output channel; the norms
    are stored unchanged."""
    from flax import nnx

    from gemma_jax.convert import name_table
    hf, root = tiny
    theirs = {k: v.detach().numpy().astype(np.float64) for k, v in hf.state_dict().items()}
    config = checkpoint.read_meta(root / "int8")[0]
    model = gemma_jax.load(root / "int8", int8_mode="weight-only")
    ours = checkpoint.flatten(jax.device_get(nnx.to_pure_dict(model.state)))
    checked = 0
    for name, (sources, _) in name_table(config).items():
        w = np.stack([theirs[s] for s in sources]).reshape(-1, theirs[sources[0]].shape[-1])  # [out, in]
        if weight_in_axis(name) is None:
            np.testing.assert_array_equal(ours[name], w[0].astype(np.float32))
            continue
        values, scale = ours[f"{name}/values"], ours[f"{name}/scale"]
        assert values.dtype == np.int8 and np.abs(values).max() <= 127 and scale.shape == (*values.shape[:-1], 1)
        values, scale = values.reshape(w.shape).astype(np.float64), scale.reshape(-1, 1).astype(np.float64)
        np.testing.assert_array_equal(scale[:, 0], np.abs(w).max(1).astype(np.float32) / np.float32(127))
        err = np.abs(w - values * scale)
        assert (err <= scale / 2).all(), (name, float((err / scale).max()))
        checked += w.size
    assert checked == sum(v.size for k, v in theirs.items() if "norm" not in k and k != "lm_head.weight")


def test_quantize_rows_edge_cases():
    rows = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [-3.0, 1e-9, 2.9999]], np.float32)
    values, scale = quant.quantize_rows(rows)
    np.testing.assert_array_equal(values[0], [0, 0, 0])          # an all-zero channel: scale 0, no NaN
    np.testing.assert_array_equal(values[1], [127, -127, 64])     # 0.5 * 127 = 63.5 rounds to even
    assert scale[0] == 0 and values[2, 0] == -127 and values[2, 1] == 0
    q = quant.quantize(rows.T, in_axis=0)                          # the same channels as columns
    np.testing.assert_array_equal(q.values, values)                # stored [out, in] either way
    assert q.scale.shape == (3, 1) and q.shape == (3, 3) and q.in_axis == 0
    np.testing.assert_array_equal(np.asarray(q), values.astype(np.float32).T * scale[None, :])


# ------------------------------------------------------------------------------- the products
def _reference(x, w: quant.QArray, mode):
    """An independent computation in float64/int64 numpy from the float weight's view."""
    values = np.asarray(w.values, np.int64)
    wt = values.reshape(-1, values.shape[-1]).T                         # [I, O]
    scale = np.asarray(w.scale, np.float64).reshape(1, -1)
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    if mode == "weight-only":
        y = flat @ wt * scale
    else:
        xs = np.abs(flat).max(1, keepdims=True).astype(np.float32).astype(np.float64) / 127
        xq = np.rint(flat / np.where(xs > 0, xs, 1))
        y = (xq.astype(np.int64) @ wt).astype(np.float64) * xs * scale
    return y.reshape(*x.shape[:-1], *values.shape[:-1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,in_axis", [((48, 40), 0), ((40, 48), 1), ((48, 2, 20), 0)])
@pytest.mark.parametrize("rows", [1, 3])
def test_dense_matches_an_independent_computation(mode, shape, in_axis, rows):
    rng = np.random.default_rng(rows)
    w = quant.quantize(rng.standard_normal(shape).astype(np.float32), in_axis, mode)
    w = jax.device_put(w)
    x = rng.standard_normal((rows, 2, shape[in_axis])).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, w: quant.dense(x, w, in_axis=in_axis))(x, w))
    np.testing.assert_allclose(got, _reference(x, w, mode), rtol=2e-5, atol=2e-5)
    # the float weight it stands for gives the same shape of output, through the same function
    assert quant.dense(jnp.asarray(x), w.dequantize(), in_axis=in_axis).shape == got.shape
    # gradients in x: straight through the rounding (those of x @ dequantized w) in both modes
    grad = jax.grad(lambda x: jnp.sum(quant.dense(x, w, in_axis=in_axis) ** 2))(jnp.asarray(x))
    deq = w.dequantize()
    plain = jax.grad(lambda x: jnp.sum(quant.dense(x, deq, in_axis=in_axis) * jax.lax.stop_gradient(
        2 * quant.dense(jnp.asarray(x), w, in_axis=in_axis))))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(plain), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------- checkpoint and loading
def test_int8_checkpoint_format_and_size(tiny):
    _, root = tiny
    meta = json.loads((root / "int8" / "gemma_config.json").read_text())
    assert meta["format"] == checkpoint.QUANT_FORMAT and meta["quantization"] == "int8"
    assert json.loads((root / "float" / "gemma_config.json").read_text())["format"] == checkpoint.FORMAT
    info = checkpoint.read_info(root / "int8")
    assert info.quantization == "int8" and info.param_dtype == "float32"
    model = gemma_jax.load(root / "int8")
    leaves = jax.tree.leaves(model.state, is_leaf=lambda x: isinstance(x, quant.QArray))
    kinds = {type(x).__name__ if isinstance(x, quant.QArray) else str(x.dtype) for x in leaves}
    assert kinds == {"QArray", "float32"}
    assert {x.mode for x in leaves if isinstance(x, quant.QArray)} == {quant.default_mode()} == {"dynamic"}


@pytest.mark.parametrize("mode", MODES)
def test_quantizing_while_loading_equals_the_int8_checkpoint(tiny, mode):
    _, root = tiny
    a = jax.device_get(gemma_jax.load(root / "int8", int8_mode=mode).state)
    b = jax.device_get(gemma_jax.load(root / "float", quantize="int8", int8_mode=mode).state)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", MODES)
def test_int8_logits_close_to_hf_float32(tiny, mode, report):
    hf, root = tiny
    ids = np.random.default_rng(1).integers(0, 128, (2, 40))  # 10x the sliding window
    ref = hf_logits(hf, ids)
    model = gemma_jax.load(root / "int8", int8_mode=mode)
    got = model.logits(ids)
    worst = float(np.abs(got - ref).max() / ref.std())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    report(f"tiny HF model int8 {mode}: max|dlogit| / std(logits)", worst)
    report(f"tiny HF model int8 {mode}: top-1 agreement", agree)
    assert worst <= TINY_TOLERANCE
    assert agree >= 0.9


def test_refusals(tiny):
    _, root = tiny
    with pytest.raises(GenerationError, match="quantize 'int4' is not supported"):
        gemma_jax.load(root / "float", quantize="int4")
    with pytest.raises(GenerationError, match="int8_mode 'dynamic'.*for int8 weights"):
        gemma_jax.load(root / "float", int8_mode="dynamic")
    with pytest.raises(GenerationError, match="int8_mode 'fast'"):
        gemma_jax.load(root / "int8", int8_mode="fast")


# ------------------------------------------------------------- everything else works unchanged
@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """A tiny model with the real Gemma 2 vocabulary, float32 and int8 (dynamic)."""
    ckpt = with_real_tokenizer(tmp_path_factory.mktemp("quant_chat"), seed=2, embed_std=0.1, hidden_size=32,
                               intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                               query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=256)
    return gemma_jax.load(ckpt), gemma_jax.load(ckpt, quantize="int8"), ckpt


def test_sampler_equals_forward_on_int8(chat_models):
    """Greedy generation with the KV cache picks, at every step, the argmax of the no-cache forward
    over the tokens so far (prompt longer than the window), with per-token activation scales."""
    _, q, _ = chat_models
    prompt = q.tokenizer.encode("def parse(text):\n    return text.split()")
    assert len(prompt) > q.config.sliding_window
    new = q.generate_ids([prompt], 12, stop_ids=[])[0]
    logits = q.logits([prompt + new])[0]
    assert new == [int(t) for t in logits[len(prompt) - 1:-1].argmax(-1)]


def test_hooks_and_steering_on_int8(chat_models):
    f, q, _ = chat_models
    ids = np.asarray([q.tokenizer.encode("The capital of Japan is")])
    logits, cache = interp.run_with_cache(q, ids, names="blocks.*.hook_resid_post")
    np.testing.assert_allclose(logits, q.logits(ids), atol=1e-5)
    assert set(cache) == {f"blocks.{i}.hook_resid_post" for i in range(q.config.num_hidden_layers)}
    # zeroing the last residual stream before the final norm: every position predicts the same
    site = f"blocks.{q.config.num_hidden_layers - 1}.hook_resid_post"
    out = interp.run_with_hooks(q, ids, {site: lambda v: jnp.zeros_like(v)})
    out = out[0] if isinstance(out, tuple) else out
    assert np.allclose(out[0], out[0, :1], atol=1e-5)
    steered = q.generate_ids([ids[0].tolist()], 6, stop_ids=[], hooks={site: lambda v: jnp.zeros_like(v)})[0]
    assert len(set(steered)) == 1  # zeroed residual -> the same token every step


def test_chat_on_int8(chat_models):
    from gemma_jax.chat import ChatSession
    _, q, _ = chat_models
    session = ChatSession(q, max_new_tokens=8)
    first = session.send("Hello!")
    history = list(session.history)
    session.send("More.")
    turn = q.tokenizer.encode_chat([{"role": "user", "content": "More."}])[1:]
    expected = q.generate_ids([history + turn], 8, stop_ids=list(q.chat_stop_ids()))[0]
    assert session.history[len(history) + len(turn):][:len(expected)] == expected and isinstance(first, str)


def test_cli_convert_and_generate_int8(tiny, chat_models, tmp_path, capsys):
    _, root = tiny
    _, _, ckpt = chat_models
    out = tmp_path / "i8"
    assert cli.main(["--no-compile-cache", "convert", str(root / "hf"), str(out), "--quantize", "int8"]) == 0
    assert checkpoint.read_info(out).quantization == "int8"
    assert cli.main(["--no-compile-cache", "generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "4",
                     "--quantize", "int8", "--int8-mode", "weight-only"]) == 0
    assert capsys.readouterr().out.startswith("Hi")
    assert cli.main(["generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--int8-mode", "dynamic"]) == 2
    assert "for int8 weights" in capsys.readouterr().err


# ------------------------------------------------------------------- quality on the default model
def held_out_python(tokenizer, rows: int, length: int) -> np.ndarray:
    """[rows, length] token windows (each starting with BOS) of Python that is not the default
    model's training corpus (the standard library): pytest's own _pytest/python.py and
    _pytest/fixtures.py (pytest is in the test extra, so this text exists wherever tests run)."""
    import _pytest.fixtures
    import _pytest.python
    text = "".join(inspect.getsource(m) for m in (_pytest.python, _pytest.fixtures))
    ids = tokenizer.encode(text)
    need = rows * (length - 1)
    assert len(ids) >= need, (len(ids), need)
    body = np.asarray(ids[:need]).reshape(rows, length - 1)
    return np.concatenate([np.full((rows, 1), tokenizer.bos_id if hasattr(tokenizer, "bos_id") else 2), body], 1)


def quality(reference: np.ndarray, logits: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """Perplexity of ids under logits (next-token), mean KL(reference || logits), top-1 agreement."""
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, ref = log_softmax(logits[:, :-1]), log_softmax(reference[:, :-1])
    targets = ids[:, 1:, None]
    nll = -np.take_along_axis(lp, targets, -1).mean()
    kl = (np.exp(ref) * (ref - lp)).sum(-1).mean()
    return {"ppl": float(np.exp(nll)), "kl": float(kl), "top1": float((lp.argmax(-1) == ref.argmax(-1)).mean())}


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield default.checkpoint_dir()
    mp.undo()


TARGETS = {"weight-only": (0.005, 0.98), "dynamic": (0.01, 0.96)}  # perplexity increase, top-1 agreement


def test_quality_on_the_default_model(default_ckpt, report):
    """16 windows of 512 tokens of held-out Python: perplexity within +0.5% / +1% of float32 and
    top-1 agreement >= 98% / 96% for weight-only / dynamic int8 (the issue's targets)."""
    model = gemma_jax.load(default_ckpt, dtype="float32")
    ids = held_out_python(model.tokenizer, 16, 512)
    ref = np.concatenate([model.logits(ids[i:i + 4]) for i in range(0, len(ids), 4)])
    base = quality(ref, ref, ids)
    report("default model float32 perplexity on held-out pytest source", base["ppl"])
    for mode, (ppl_rise, top1) in TARGETS.items():
        q = gemma_jax.load(default_ckpt, dtype="float32", quantize="int8", int8_mode=mode)
        got = quality(ref, np.concatenate([q.logits(ids[i:i + 4]) for i in range(0, len(ids), 4)]), ids)
        rise = got["ppl"] / base["ppl"] - 1
        report(f"default model int8 {mode}: perplexity", f"{got['ppl']:.4f} ({100 * rise:+.2f}%)")
        report(f"default model int8 {mode}: mean KL to float32", f"{got['kl']:.5f}")
        report(f"default model int8 {mode}: top-1 agreement", f"{100 * got['top1']:.2f}%")
        assert rise <= ppl_rise and got["top1"] >= top1


def test_bench_int8_vs_float_prints_the_cpu(tmp_path, capsys):
    """The harness end to end on a tiny config: int8 and float sides, the CPU line (timings are
    never asserted)."""
    assert cli.main(["--no-compile-cache", "bench", "--preset", "tiny", "--quantize", "int8", "--vs-float",
                     "--prompt-len", "20", "--gen-len", "4", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "AVX2" in out and "AMX" in out
    assert "gemma_jax on cpu (int8 (dynamic))" in out and "int8 (dynamic) is" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["float"]["weights"] == "float32" and result["int8_ratios"][0]["decode_speedup"] > 0
    # a step reads int8 weights: about a quarter of the float side's bytes
    ratio = result["gemma_jax"]["runs"][0]["bytes_per_step"]["weights"] / result["float"]["runs"][0]["bytes_per_step"]["weights"]
    assert 0.25 <= ratio < 0.35
