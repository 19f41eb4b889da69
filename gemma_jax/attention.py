"""The core of Gemma 2 attention behind one signature: scores, soft-cap, mask, softmax, values.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim. Queries
and keys arrive rotated (RoPE applied); positions say which key each query may see (-1 = padding).
Every implementation computes, per query head h using kv head h // G:
    s = (q . k) * scale;  s = softcap(s) BEFORE the mask;  mask (0 <= k <= q, q - k < window);
    p = softmax(s) in float32;  z = p @ v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.layers import softcap as apply_softcap

MASKED = -2.3819763e38  # finite "minus infinity": a query with no visible key stays NaN-free


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: key visible to query iff 0 <= k <= q (and q - W < k on sliding layers).

    Positions of -1 mark padding (never visible as keys).
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
           scale: float, softcap: float | None, window: int | None, hook=None, name: str = "") -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], q_pos [B, T], k_pos [B, S] -> z [B, T, N, H].

    The dense XLA path: the [B, N, T, S] scores are materialized, so `hook` sees
    `{name}.hook_attn_scores` and `{name}.hook_pattern` ([B, N, T, S]).
    """
    b, t, n, h = q.shape
    kv_heads, dt = k.shape[2], q.dtype
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32).astype(dt) * scale
    scores = apply_softcap(scores.astype(jnp.float32), softcap)  # soft-cap before the mask
    mask = attention_mask(q_pos, k_pos, window)[:, None, None]
    scores = jnp.where(mask, scores, MASKED)
    if hook is not None:  # sites see [B, N, T, S]
        scores = hook(f"{name}.hook_attn_scores", scores.reshape(b, n, t, -1)).reshape(scores.shape)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    if hook is not None:
        probs = hook(f"{name}.hook_pattern", probs.reshape(b, n, t, -1)).reshape(probs.shape)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
