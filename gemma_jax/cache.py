"""KV cache: an explicit pytree passed into the jitted step and returned (donated).

Every layer's buffer is indexed by position modulo its size S. Global layers get S = max_length,
so slot s holds position s. Sliding-window layers get S = min(sliding_window, max_length): a ring
buffer, since a query only ever sees the last W keys. `end[b]` is the next position of row b.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.config import SLIDING, GemmaConfig


class LayerKV(NamedTuple):
    k: jax.Array  # [B, S, K, H], after RoPE
    v: jax.Array  # [B, S, K, H]


class KVCache(NamedTuple):
    layers: tuple[LayerKV, ...]
    end: jax.Array  # [B] int32: number of positions written per row (= next position)


def layer_slots(config: GemmaConfig, layer: int, max_length: int) -> int:
    """Buffer length S of one layer: a ring of W for sliding layers, max_length for global ones."""
    if config.is_sliding(layer):
        return min(config.sliding_window, max_length)
    return max_length


def init_cache(config: GemmaConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` positions; dtype = compute dtype."""
    layers = []
    for i in range(config.num_hidden_layers):
        shape = (batch, layer_slots(config, i, max_length), config.num_key_value_heads, config.head_dim)
        layers.append(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    return KVCache(tuple(layers), jnp.zeros((batch,), jnp.int32))


def slot_positions(end: jax.Array, slots: int) -> jax.Array:
    """[B, S] position held by each slot (the latest p < end with p = slot mod S), -1 where empty."""
    last = end[:, None] - 1
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    return last - jnp.mod(last - slot, slots)


def write(layer: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerKV:
    """Store new keys/values [B, T, K, H] at their positions [B, T] (-1 = padding, not stored).

    Only the last S valid positions of a chunk are written, so a prompt longer than a ring buffer
    never writes two positions to one slot.
    """
    slots = layer.k.shape[1]
    last_new = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > last_new - slots)
    index = jnp.where(keep, jnp.mod(positions, slots), slots)  # slots is out of range: dropped
    rows = jnp.arange(positions.shape[0])[:, None]
    return LayerKV(layer.k.at[rows, index].set(k.astype(layer.k.dtype), mode="drop"),
                   layer.v.at[rows, index].set(v.astype(layer.v.dtype), mode="drop"))


def advance(end: jax.Array, positions: jax.Array) -> jax.Array:
    """New end per row after writing `positions` [B, T] (-1 = padding)."""
    return jnp.maximum(end, jnp.max(positions, axis=1) + 1)


def cache_bytes(config: GemmaConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of the cache by layer kind: {'sliding', 'full', 'total', 'all_full'}.

    'all_full' is what the cache would take if every layer kept max_length positions.
    """
    per_slot = 2 * batch * config.num_key_value_heads * config.head_dim * np.dtype(dtype).itemsize
    out = {"sliding": 0, "full": 0}
    for i, kind in enumerate(config.layer_types):
        out["sliding" if kind == SLIDING else "full"] += per_slot * layer_slots(config, i, max_length)
    out["total"] = out["sliding"] + out["full"]
    out["all_full"] = per_slot * max_length * config.num_hidden_layers
    return out


def grow(cache: KVCache, config: GemmaConfig, max_length: int) -> KVCache:
    """The same cache with room for max_length positions (zero-padded buffers).

    Valid because a buffer smaller than its final size always holds position p at slot p.
    """
    layers = []
    for i, layer in enumerate(cache.layers):
        extra = layer_slots(config, i, max_length) - layer.k.shape[1]
        if extra < 0:
            raise ValueError(f"cannot shrink a cache of layer {i}")
        pad = ((0, 0), (0, extra), (0, 0), (0, 0))
        layers.append(LayerKV(jnp.pad(layer.k, pad), jnp.pad(layer.v, pad)))
    return KVCache(tuple(layers), cache.end)

