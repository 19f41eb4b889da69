"""The int8 x int8 -> int32 product for few rows on XLA:CPU, as an FFI custom call.

XLA:CPU's own integer dot streams an int8 weight at 7-14 GB/s on an AVX-512 VNNI Xeon, about half
the memory bandwidth, and its one-row form is a scalar loop; batch-1 decode, which reads every
weight once per token, is then bound by compute rather than memory. int8_matmul.cc streams the
weight ([out, in], as quant.QArray stores it) through vpdpbusd / vpmaddubsw on XLA's intra-op
threads, choosing the instruction set at run time (docs/quantization.md).

`matmul(x, w)` is exact: it equals `lax.dot_general(x, w, contract the last axes,
preferred_element_type=int32)` bit for bit for operands in [-127, 127]. The library is compiled on
first use (kernels/build.py); where that is impossible, `available()` is False after one
GemmaWarning and callers use XLA's product.

Environment:
  GEMMA_JAX_INT8_KERNEL=0   never use the kernel (XLA's integer dot instead)
  GEMMA_JAX_INT8_ISA=NAME   force one instruction set (one of ISAS), e.g. to test or measure it
Both are read when a product is traced (set them before the first call).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.errors import GemmaError, GemmaWarning
from gemma_jax.kernels import build

TARGET = "gemma_jax_int8_matmul"
ENV_SWITCH = "GEMMA_JAX_INT8_KERNEL"
ENV_ISA = "GEMMA_JAX_INT8_ISA"
# Instruction sets by name, numbered as in int8_matmul.cc (0 = the best this CPU has).
ISAS = {"scalar": 1, "avx2": 2, "avx-vnni": 3, "avx512": 4, "avx512-vnni": 5}
SOURCES = [Path(__file__).with_name("int8_matmul.cc"), Path(__file__).with_name("int8_matmul_simd.inc")]
_OFF = ("0", "off", "false", "no")
MAX_ROWS = None  # products of more rows use XLA's dot (None: the kernel for any number of rows)


def switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, registered with XLA (once per process); None, after one
    GemmaWarning, when it cannot be built or loaded here."""
    from gemma_jax.default import cache_root
    try:
        lib = ctypes.CDLL(str(build.library("int8_matmul", SOURCES, cache_root() / "kernels")))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GemmaJaxInt8Matmul), platform="cpu")
    except (build.BuildError, OSError, AttributeError) as e:
        warnings.warn(GemmaWarning(
            f"the int8 CPU kernel is unavailable ({e}); int8 products use XLA's integer dot, about half as "
            f"fast at batch-1 decode (docs/quantization.md; {ENV_SWITCH}=0 silences this)"), stacklevel=4)
        return None
    lib.GemmaJaxInt8BestIsa.restype = ctypes.c_int32
    lib.GemmaJaxInt8Supported.restype = ctypes.c_int32
    lib.GemmaJaxInt8Supported.argtypes = [ctypes.c_int32]
    return lib


def available() -> bool:
    """Whether int8 products on CPU go through the kernel: not switched off, and it compiled."""
    return not switched_off() and _library() is not None


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run (empty when the kernel is unavailable)."""
    lib = _library()
    return [name for name, code in ISAS.items() if lib is not None and lib.GemmaJaxInt8Supported(code)]


def best_isa() -> str | None:
    """The instruction set the kernel picks on this CPU."""
    lib = _library()
    code = lib.GemmaJaxInt8BestIsa() if lib is not None else None
    return next((name for name, c in ISAS.items() if c == code), None)


def _isa_code(isa: str | None) -> int:
    source = "isa" if isa else ENV_ISA
    isa = isa or os.environ.get(ENV_ISA, "").strip().lower() or None
    if isa is None:
        return 0
    if isa not in ISAS:
        raise GemmaError(f"{source}={isa!r}: choose one of {', '.join(ISAS)}")
    if isa not in supported_isas():
        raise GemmaError(f"{source}={isa!r}: this CPU runs only {', '.join(supported_isas())}")
    return ISAS[isa]


def matmul(x: jax.Array, w: jax.Array, isa: str | None = None) -> jax.Array:
    """x [M, I] int8 times w [O, I] int8, contracted over I -> [M, O] int32, exactly. isa forces
    an instruction set (default: $GEMMA_JAX_INT8_ISA, else the best this CPU has). Call only when
    available() is True. Under vmap, x and w may carry a batch axis (w's may be 1)."""
    if x.dtype != jnp.int8 or w.dtype != jnp.int8 or x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"int8 matmul: x [M, I] and w [O, I], both int8; got {x.dtype}{list(x.shape)}, "
                         f"{w.dtype}{list(w.shape)}")
    code = _isa_code(isa)
    if _library() is None:
        raise RuntimeError("the int8 CPU kernel is unavailable; check available() first")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="expand_dims")(x, w, isa=np.int32(code))


def usable(rows: int | None = None) -> bool:
    """Whether an int8 product of `rows` rows, traced now, goes through the kernel: not switched
    off, XLA's default backend is the CPU, rows <= MAX_ROWS, the process has one device, and the
    kernel compiled. With several devices (a mesh, e.g. virtual CPU devices) XLA's dot is kept:
    the custom call has no partitioning rule, so XLA would gather a sharded weight onto every
    device to run it (and a jitted tracer does not say whether its array is sharded)."""
    if switched_off() or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    if rows is not None and MAX_ROWS is not None and rows > MAX_ROWS:
        return False
    return _library() is not None
