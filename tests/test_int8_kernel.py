"""gemma_jax's int8 x int8 -> int32 CPU kernel (kernels/int8.py) against XLA's dot_general: bit
for bit, on every instruction set this CPU runs, odd shapes, 1-8 rows, the threaded split, vmap;
decoding through it equals decoding through XLA's product; and the fallbacks (switched off, no
compiler) give XLA's product with one warning."""

from __future__ import annotations

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax import quant
from gemma_jax.errors import GemmaError, GemmaWarning
from gemma_jax.kernels import build
from gemma_jax.kernels import int8 as kernel
from hf_oracle import hf_model, save

try:
    build.find_compiler()
except build.BuildError as e:  # the fallback tests below still run
    needs_compiler = pytest.mark.skip(reason=str(e))
else:
    needs_compiler = pytest.mark.skipif(False, reason="a C++ compiler is present")


def xla(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), ((), ())), preferred_element_type=jnp.int32)


def operands(rng, m, k, n, batch=()):
    """int8 operands in [-127, 127] (what quant produces), the extremes included."""
    x = rng.integers(-127, 128, (*batch, m, k), dtype=np.int8)
    w = rng.integers(-127, 128, (*batch, n, k), dtype=np.int8)
    x.flat[:: 7] = -127
    w.flat[:: 5] = 127
    return x, w


@needs_compiler
def test_the_kernel_compiles_here():
    """Where a compiler exists, the kernel builds (no warning) and picks the best ISA it has."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GemmaWarning)
        assert kernel.available()
    assert "scalar" in kernel.supported_isas() and kernel.best_isa() in kernel.supported_isas()


# (K, N): K below, at and past a vector (32 / 64 bytes) and not a multiple of 64; N not a multiple
# of the 4-row weight tile; the last two are large enough to be split over the intra-op threads.
SHAPES = [(1, 1), (31, 3), (64, 4), (65, 5), (127, 9), (200, 33), (1000, 700), (2304, 130)]


@needs_compiler
@pytest.mark.parametrize("isa", list(kernel.ISAS))
def test_bit_equal_to_xla_on_every_isa(isa):
    if isa not in kernel.supported_isas():
        pytest.skip(f"this CPU does not run {isa}")
    rng = np.random.default_rng(kernel.ISAS[isa])
    product = jax.jit(lambda x, w: kernel.matmul(x, w, isa=isa))
    for m in range(1, 9):
        for k, n in SHAPES:
            x, w = operands(rng, m, k, n)
            np.testing.assert_array_equal(np.asarray(product(x, w)), np.asarray(xla(x, w)), err_msg=f"{isa} {m}x{k}x{n}")
    x, w = operands(rng, 19, 300, 21)  # more rows than the 4-row tile, with a remainder
    np.testing.assert_array_equal(np.asarray(product(x, w)), np.asarray(xla(x, w)))


@needs_compiler
def test_vmap_and_refusals():
    rng = np.random.default_rng(0)
    x, w = operands(rng, 3, 70, 9, batch=(4,))
    product = jax.jit(jax.vmap(kernel.matmul))                          # both batched
    np.testing.assert_array_equal(np.asarray(product(x, w)), np.asarray(jnp.einsum(
        "bmk,bnk->bmn", x, w, preferred_element_type=jnp.int32)))
    shared = jax.jit(jax.vmap(kernel.matmul, in_axes=(0, None)))       # one weight for every entry
    np.testing.assert_array_equal(np.asarray(shared(x, w[1])), np.asarray(xla(x, w[1])))
    with pytest.raises(GemmaError, match="isa='sse9': choose one of"):
        kernel.matmul(x[0], w[0], isa="sse9")
    with pytest.raises(ValueError, match="both int8"):
        kernel.matmul(x[0].astype(np.int32), w[0])


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """A tiny random HF model (a prompt longer than its window), converted to int8."""
    root = tmp_path_factory.mktemp("int8_kernel")
    save(hf_model(seed=5), root / "hf")
    gemma_jax.convert(root / "hf", root / "int8", quantize="int8")
    return root / "int8"


def _decode(ckpt):
    """Logits of a no-cache forward and 10 greedy tokens with the KV cache, traced afresh."""
    jax.clear_caches()
    model = gemma_jax.load(ckpt, int8_mode="dynamic")
    prompt = [2] + [int(t) for t in np.random.default_rng(1).integers(3, model.config.vocab_size, 11)]
    assert len(prompt) > model.config.sliding_window
    return np.asarray(model.logits([prompt])), model.generate_ids([prompt], 10, stop_ids=[])[0]


@needs_compiler
def test_decoding_equals_xla_s_product(tiny_int8, monkeypatch):
    """The int32 products are bit-equal, so greedy tokens and logits are equal, not merely close."""
    assert kernel.usable(1)
    logits, tokens = _decode(tiny_int8)
    monkeypatch.setenv(kernel.ENV_SWITCH, "0")
    assert not kernel.usable(1)
    reference_logits, reference_tokens = _decode(tiny_int8)
    assert tokens == reference_tokens
    np.testing.assert_array_equal(logits, reference_logits)


def test_no_compiler_falls_back_with_one_warning(tiny_int8, monkeypatch, tmp_path):
    """CXX naming no compiler: one GemmaWarning, and the product is XLA's (the same values)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 40)).astype(np.float32)
    w = jax.device_put(quant.quantize(rng.standard_normal((24, 40)).astype(np.float32), 1, "dynamic"))
    monkeypatch.setenv(kernel.ENV_SWITCH, "0")
    reference = np.asarray(jax.jit(lambda x, w: quant.dense(x, w, in_axis=1))(x, w))
    monkeypatch.delenv(kernel.ENV_SWITCH)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel._library.cache_clear()
    jax.clear_caches()
    try:
        with pytest.warns(GemmaWarning, match="int8 CPU kernel is unavailable.*no C.. compiler found") as caught:
            got = np.asarray(jax.jit(lambda x, w: quant.dense(x, w, in_axis=1))(x, w))
            assert not kernel.available()
        assert sum(issubclass(c.category, GemmaWarning) for c in caught) == 1
        np.testing.assert_array_equal(got, reference)
        assert not list(tmp_path.rglob("*.so"))
    finally:
        kernel._library.cache_clear()  # later tests build (or find) the real kernel again
