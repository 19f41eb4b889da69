"""Small pure building blocks: RMSNorm, the scaled embedder, rotary embedding, soft-capping, and the
two helpers every hook site goes through (`site`, `wants`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.quant import dense, lookup


def site(hook, name: str, value: jax.Array) -> jax.Array:
    """`hook(name, value)`, or the value itself when there is no hook (the program is then unchanged)."""
    return value if hook is None else hook(name, value)


def wants(hook, name: str) -> bool:
    """Whether `hook` takes part at site `name`. A hook may list the sites it reads or edits in a
    `sites` attribute; one without it sees every site. Sites that cost extra work (per-head results,
    norm statistics) are computed only where this is true."""
    if hook is None:
        return False
    sites = getattr(hook, "sites", None)
    return sites is None or name in sites


class RMSNorm(nnx.Module):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32 and cast back (zero-centred w)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array, hook=None, name: str = "") -> jax.Array:
        """With a hook that wants `{name}.hook_scale` or `{name}.hook_normalized`, the norm is computed
        as TransformerLens writes it: scale = sqrt(mean(x^2) + eps) [..., 1] and normalized = x / scale
        (both float32, before the weight), each passed through the hook. Otherwise (the plain path)
        neither is materialized. The caller hooks the weighted output."""
        x32 = x.astype(jnp.float32)
        mean_sq = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        if wants(hook, f"{name}.hook_scale") or wants(hook, f"{name}.hook_normalized"):
            scale = hook(f"{name}.hook_scale", jnp.sqrt(mean_sq + self.eps))
            y = hook(f"{name}.hook_normalized", x32 / scale)
        else:
            y = x32 * jax.lax.rsqrt(mean_sq + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class Embedder(nnx.Module):
    """Token embedding stored [D, V], scaled by sqrt(D) on the way in and reused (unscaled) as the
    unembedding. [D, V] makes the batch-1 logits a plain row-major `x @ E` (the lookup of a few
    columns per step costs nothing by comparison). As an int8 QArray (stored [V, D], see quant.py)
    it has one scale per vocabulary entry, used by both the lookup and the logits."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (dim, vocab_size), param_dtype))

    def encode(self, tokens: jax.Array, dtype) -> jax.Array:
        """[B, T] ids -> [B, T, D]; the scale is rounded to the compute dtype first, as HF does."""
        table = self.embedding[...]
        scale = jnp.asarray(math.sqrt(table.shape[0]), dtype)
        return lookup(table, tokens, in_axis=0, dtype=dtype) * scale

    def decode(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., V] logits in float32."""
        return dense(x, self.embedding[...], out_dtype=jnp.float32)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """tanh(x / cap) * cap, or x when cap is None."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Split-half rotary embedding of x [B, T, N, H] at integer positions [B, T].

    Frequencies, angles, cos and sin are float32 and cast to x's dtype before the rotation (as HF).
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]    # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
