"""int8 weights: one array type (QArray: int8 values + a float32 scale per output channel) and one
product (`dense`) through which every weight product of the model goes, float or int8.

Quantization is symmetric, per output channel: scale = max|w| / 127 over the input axis, values =
round(w / scale) in [-127, 127], so |w - values * scale| <= scale / 2 for every weight.

A QArray stands for a float weight of the model (same logical shape; `in_axis` says where that
weight's input axis is) but stores its values [out..., in], the input axis last, whatever the float
layout: XLA:CPU's int8 x int8 product streams [out, in] 2-3x faster than [in, out] for every
decode-step shape (docs/quantization.md), while its float32 product prefers [in, out] for wide
outputs. The scale is [out..., 1], so that it shards like its values.

Two ways to compute `x @ w` with an int8 w, chosen per QArray (a static pytree field, so changing
it recompiles and nothing else changes):
- "weight-only": the int8 weight is converted to x's dtype inside the product and the result is
  scaled per output channel. XLA fuses the conversion into the matmul on TPU and GPU; on XLA:CPU
  the converted weight is materialized (slow: see docs/quantization.md).
- "dynamic": x is quantized per token (its own symmetric int8 scale per row), the product is
  int8 x int8 -> int32, then scaled by both scales. On CPU the integer product is our own kernel
  (kernels/int8.py: VNNI, 2x XLA's at batch-1 decode, bit-equal to it); where the kernel is off,
  cannot be compiled, or the process has several devices (a mesh), it is XLA's dot_general, which
  runs fast only with at least MIN_ROWS rows, so fewer rows are padded with zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("weight-only", "dynamic")
METHODS = ("int8",)        # what `quantize=` and `--quantize` accept
MIN_ROWS = 2               # the int8 product of fewer rows is a slow loop on XLA:CPU
_BLOCK_ELEMENTS = 1 << 20  # host quantization works on blocks of this many weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """An int8 weight: `values` [out..., in] (int8) times `scale` [out..., 1] (float32), standing
    for a float weight whose input axis is `in_axis` (0: [in, out...], or its last axis)."""

    values: jax.Array
    scale: jax.Array
    in_axis: int = dataclasses.field(default=0, metadata=dict(static=True))
    mode: str = dataclasses.field(default="dynamic", metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape."""
        out = tuple(self.values.shape)
        return out if self.in_axis else (out[-1], *out[:-1])

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    def __getitem__(self, key):
        """`w[...]` is w itself (as for an nnx.Param's value); nothing else is indexable."""
        if key is Ellipsis:
            return self
        raise TypeError("a QArray supports only [...]; use dequantize() for values")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight it stands for, in its layout."""
        return jnp.moveaxis(self.values.astype(jnp.float32) * self.scale, -1, self.in_axis).astype(dtype)

    def __array__(self, dtype=None, copy=None):
        """np.asarray(w): the dequantized float32 weight, in the float layout."""
        out = np.moveaxis(np.asarray(self.values, np.float32) * np.asarray(self.scale, np.float32), -1, self.in_axis)
        return out if dtype is None else out.astype(dtype)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"int8 mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def default_mode(backend: str | None = None) -> str:
    """The int8 product to use on a backend: weight-only where XLA fuses the dequantization into
    the matmul (TPU, GPU), dynamic int8 activations on CPU."""
    backend = backend or jax.default_backend()
    return "dynamic" if backend == "cpu" else "weight-only"


# ----------------------------------------------------------------------------- quantizing (host)
def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float [R, I] (each row one output channel) -> int8 [R, I] values and float32 [R] scales.

    |w - values * scale| <= scale / 2 holds for every weight: the quotient w / scale is computed in
    float32 (off by at most 127 * 2**-24 from the true one), and the few quotients within 1e-4 of
    a half, where that error could round to the wrong side, are recomputed in float64.
    """
    rows = np.asarray(rows, np.float32)
    absmax = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(len(rows), np.float32)
    scale = absmax / np.float32(127)
    divisor = np.where(scale > 0, scale, np.float32(1))
    quotient = rows / divisor[:, None]          # |quotient| <= 127 (+ rounding), so no clipping
    values = np.rint(quotient)
    np.subtract(quotient, values, out=quotient)
    near = np.nonzero(np.abs(quotient, out=quotient) > np.float32(0.5 - 1e-4))
    if near[0].size:
        values[near] = np.rint(rows[near].astype(np.float64) / divisor[near[0]].astype(np.float64))
    return values.astype(np.int8), scale


def quantize(w, in_axis: int, mode: str = "dynamic") -> QArray:
    """A float weight (host or device array) contracted over `in_axis` (0 or its last axis) -> a
    QArray of host arrays, made in blocks of output channels (never a float32 copy of it all)."""
    check_mode(mode)
    w = np.asarray(w)
    in_axis = _check_in_axis(w.shape, in_axis)
    d_in = w.shape[in_axis]
    out_shape = w.shape[1:] if in_axis == 0 else w.shape[:-1]
    flat = w.reshape(d_in, -1) if in_axis == 0 else w.reshape(-1, d_in)  # views, no copy
    channels = math.prod(out_shape)
    values = np.empty((channels, d_in), np.int8)
    scale = np.empty((channels, 1), np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, d_in))
    for start in range(0, channels, step):
        stop = min(channels, start + step)
        rows = flat[:, start:stop].T if in_axis == 0 else flat[start:stop]
        values[start:stop], scale[start:stop, 0] = quantize_rows(rows)
    return QArray(values.reshape(*out_shape, d_in), scale.reshape(*out_shape, 1), in_axis, mode)


def _check_in_axis(shape: tuple[int, ...], in_axis: int) -> int:
    if in_axis % len(shape) not in (0, len(shape) - 1):
        raise ValueError(f"the input axis of a weight must be its first or last, got {in_axis} of {shape}")
    return in_axis % len(shape)


def abstract(shape: jax.ShapeDtypeStruct, in_axis: int, mode: str) -> QArray:
    """The QArray of ShapeDtypeStructs standing for a float weight's shape (restore targets)."""
    dims = tuple(shape.shape)
    in_axis = _check_in_axis(dims, in_axis)
    out = dims[:in_axis] + dims[in_axis + 1:]
    return QArray(jax.ShapeDtypeStruct((*out, dims[in_axis]), jnp.int8),
                  jax.ShapeDtypeStruct((*out, 1), jnp.float32), in_axis, check_mode(mode))


# ------------------------------------------------------------------------------- the product
def dense(x: jax.Array, w, *, in_axis: int = 0, out_dtype=None, min_rows: int = MIN_ROWS) -> jax.Array:
    """x [..., I] times w contracted over w's axis `in_axis` (0: w is [I, out...], x @ w; the last:
    w is [O, I]) -> [..., w's output axes], in out_dtype (default x's dtype). w: a float array or
    a QArray standing for one (stored [out..., I]). Float products accumulate in float32 when
    out_dtype is float32."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not isinstance(w, QArray):
        return _float_dot(x, w.astype(x.dtype), in_axis, out_dtype)
    if in_axis % w.ndim != w.in_axis:
        raise ValueError(f"dense: the weight's input axis is {w.in_axis}, the call says {in_axis}")
    scale = w.scale[..., 0]  # [out...]
    if w.mode == "weight-only":
        y = _float_dot(x, w.values.astype(x.dtype), -1, jnp.float32)
        return (y * scale).astype(out_dtype)
    return _dynamic(x, w.values, scale, out_dtype, min_rows)


def _float_dot(x, w, in_axis, out_dtype):
    preferred = jnp.float32 if out_dtype == jnp.float32 and x.dtype != jnp.float32 else None
    if in_axis == 0:
        y = jnp.matmul(x, w.reshape(w.shape[0], -1), preferred_element_type=preferred)
        return y.reshape(*x.shape[:-1], *w.shape[1:]).astype(out_dtype)
    y = jnp.einsum("...I,OI->...O", x, w.reshape(-1, w.shape[-1]), preferred_element_type=preferred)
    return y.reshape(*x.shape[:-1], *w.shape[:-1]).astype(out_dtype)


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., I] -> int8 values [..., I] and float32 scales [..., 1], symmetric per row (token)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    return jnp.round(xf / jnp.where(scale > 0, scale, 1.0)).astype(jnp.int8), scale


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _dynamic(x, values, scale, out_dtype, min_rows):
    """x [..., I], values [out..., I] int8, scale [out...] -> [..., out...]."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    xq, xs = quantize_activations(x.reshape(rows, d_in))
    acc = int8_product(xq, values.reshape(-1, d_in), min_rows)
    y = acc.astype(jnp.float32) * xs * scale.reshape(1, -1)
    return y.reshape(*lead, *scale.shape).astype(out_dtype)


def int8_product(xq: jax.Array, wq: jax.Array, min_rows: int = MIN_ROWS) -> jax.Array:
    """xq [M, I] int8 times wq [O, I] int8 -> [M, O] int32, exact: gemma_jax's CPU kernel where it
    is usable (kernels.int8.usable), else XLA's dot_general with rows padded to min_rows (XLA:CPU's
    int8 product of one row is a slow loop; two rows are not). Both give the same int32 bits."""
    from gemma_jax.kernels import int8 as kernel
    if kernel.usable(xq.shape[0]):
        return kernel.matmul(xq, wq)
    rows = xq.shape[0]
    if rows < min_rows:
        xq = jnp.pad(xq, ((0, min_rows - rows), (0, 0)))
    return jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)[:rows]


@_dynamic.defjvp
def _dynamic_jvp(out_dtype, min_rows, primals, tangents):
    """Straight-through: the derivative in x is that of x @ dequantized w (rounding x has a zero
    derivative almost everywhere, which would make gradients, e.g. attribution patching, useless).
    Values and scales are constants."""
    x, values, scale = primals
    y = _dynamic(x, values, scale, out_dtype, min_rows)
    dy = _float_dot(tangents[0], values.astype(x.dtype), -1, jnp.float32) * scale
    return y, dy.astype(out_dtype)


def lookup(w, ids: jax.Array, *, in_axis: int, dtype) -> jax.Array:
    """The input-axis vectors of output channels `ids` of w (float or QArray), [*ids.shape, I], in
    dtype: the embedding lookup (one vocabulary entry, one output channel of the logits, per id)."""
    if not isinstance(w, QArray):
        return jnp.moveaxis(jnp.take(w, ids, axis=1 - in_axis), 0 if in_axis == 0 else -1, -1).astype(dtype)
    scale = jnp.take(w.scale, ids, axis=0)
    return (jnp.take(w.values, ids, axis=0).astype(jnp.float32) * scale).astype(dtype)
