"""Gemma 2 attention in jax's Pallas TPU kernels (`AttentionConfig(impl="splash")`).

Prefill: jax's splash attention (jax.experimental.pallas.ops.tpu.splash_attention) computes
Gemma 2's attention exactly: its `attn_logits_soft_cap` caps the logits before the mask, a
`LocalMask` with left window W - 1 gives the sliding window (a query sees W keys, itself
included), a `CausalMask` the global layers, GQA without repeating keys (query head h uses kv head
h // G), and the queries are pre-scaled by query_pre_attn_scalar ** -0.5 (the kernel has no scale).
Splash masks by index, not position, so it runs on self-attention over one chunk (a fresh prefill)
whose rows hold their real tokens contiguously (padding only at the ends, as `Gemma.logits`,
`generate` and the samplers make them; padding is a segment of its own). Any other layout is
computed by the blockwise path instead, chosen at run time (`lax.cond`), so the result is always
exact. Decode keeps the dense XLA path; why the ragged paged attention kernel is not used for it is
in docs/accelerators.md.

`interpret=True` traces the kernel under `pltpu.force_tpu_interpret_mode()`: the same kernel, run
by the TPU interpreter on CPU (for tests; slow).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp


def contiguous_rows(positions: jax.Array) -> jax.Array:
    """Whether every row's real positions (>= 0) sit at consecutive indices, increasing by one."""
    valid = positions >= 0
    rel = positions - jnp.arange(positions.shape[1], dtype=positions.dtype)[None, :]
    info = jnp.iinfo(positions.dtype)
    hi = jnp.max(jnp.where(valid, rel, info.min), axis=1)
    lo = jnp.min(jnp.where(valid, rel, info.max), axis=1)
    return jnp.all((hi == lo) | ~jnp.any(valid, axis=1))

def splash(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, *, scale: float, softcap: float | None,
           window: int | None, block: int, interpret: bool, fallback: Callable[[], jax.Array]) -> jax.Array:
    """Self-attention over one chunk: q [B, T, N, H], k/v [B, T, K, H], positions q_pos [B, T]
    (the keys' too) -> z [B, T, N, H]. `fallback()` computes the same where splash cannot."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q.shape
    padded = -(-t // block) * block
    shape = (padded, padded)
    mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    block_sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)

    def pad(x):  # [B, T, heads, H] -> [B, heads, padded, H]
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).swapaxes(1, 2)

    def run():
        segments = jnp.pad((q_pos >= 0).astype(jnp.int32), ((0, 0), (0, padded - t)))  # padding: segment 0
        ctx = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
        with ctx:
            kernel = sa.make_splash_mha_single_device(sa.MultiHeadMask([mask] * n), block_sizes=block_sizes,
                                                      attn_logits_soft_cap=softcap)
            # rows one after another (lax.map, not vmap: a batched pallas_call grows a grid axis
            # that TPU interpret mode's dimension semantics do not cover)
            out = jax.lax.map(lambda a: kernel(*a[:3], segment_ids=sa.SegmentIds(a[3], a[3])),
                              (pad(q * jnp.asarray(scale, q.dtype)), pad(k), pad(v), segments))
        return out.swapaxes(1, 2)[:, :t].astype(q.dtype)

    return jax.lax.cond(contiguous_rows(q_pos), run, fallback)
