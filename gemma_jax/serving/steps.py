"""The engine's jitted programs over one batched decode state (JetStream's prefill / insert /
generate split, with the insert fused into the prefill):

- `prefill`: k requests' prompt chunks [k, T] into their slots of the batched KV cache (k = 1 for
  a long prompt's pieces, up to B for short prompts admitted together); on a request's last
  chunk, its first token and the row's settings (sampling arrays, stop ids, max_tokens) armed.
- `decode`: up to `limit` tokens for every live row in one call (a lax.while_loop), the state
  donated; finished rows go idle on the device, in the step that finished them. It runs over the
  first `rows` slots only (a power-of-two bucket holding every live row), so a lightly loaded
  engine does not pay for the whole batch.

Shapes: B slots, S cache positions, M stop ids per row, N tokens per decode call, V vocab.
Compilation: `prefill` once per (prompt bucket T, request bucket k, fresh cache or not),
`decode` once per (row bucket, S, N); sampling settings are arrays, so no mix of requests compiles anything new.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import cache as kv
from gemma_jax import sampler

TOP_LOGPROBS = 5  # alternatives computed per token (OpenAI's limit for completions)


class Slots(NamedTuple):
    """The batched decode state (a pytree, donated to every program)."""
    cache: kv.KVCache
    last: jax.Array        # [B] int32: each row's latest token, fed at the next step
    done: jax.Array        # [B] bool: free, prefilling or finished rows, fed at position -1
    steps: jax.Array       # [B] int32: tokens generated so far
    max_tokens: jax.Array  # [B] int32
    stop_ids: jax.Array    # [B, M] int32 (-1: none)
    top_n: jax.Array       # [B] int32: alternatives wanted per token (0..TOP_LOGPROBS)
    rows: sampler.Rows     # [B] sampling settings and keys
    counts: jax.Array      # [B, V] int32 tokens generated so far (penalties)


class Arm(NamedTuple):
    """k requests' settings, as the prefill program writes them into their slots (host arrays:
    the call transfers them all at once)."""
    max_tokens: np.ndarray  # [k] int32
    stop_ids: np.ndarray    # [k, M] int32
    top_n: np.ndarray       # [k] int32
    sampling: tuple         # sampler.Rows.host: the [k] settings, without keys
    seeds: np.ndarray       # [k, 2] uint32 sampler.seed_data: each row's key is row 0 of its seed's stream


class Graph:
    """A model's graphdef as the programs' static argument, hashed once: jit hashes its static
    arguments at every call, and hashing an nnx GraphDef walks the whole graph (0.2-0.8 ms, as long
    as a decode step of the default model)."""
    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Graph) and (other.graphdef is self.graphdef or other.graphdef == self.graphdef)


class Tokens(NamedTuple):
    """What a program hands back to the host: per row, the tokens made in this call."""
    ids: jax.Array           # [B, N] int32; -1 where the row made no token
    logprobs: jax.Array      # [B, N] float32
    top_ids: jax.Array       # [B, N, TOP_LOGPROBS] int32 (zeros unless some row asked)
    top_logprobs: jax.Array  # [B, N, TOP_LOGPROBS] float32


def init_slots(config, batch: int, max_length: int, dtype, max_stop_ids: int, device=None) -> Slots:
    """Every slot free, with room for max_length positions, placed on `device` (default: the first)
    as the programs' outputs are, so the first call compiles the same program as every later one."""
    b = batch
    rows = sampler.Rows.build([sampler.Sampling()] * b, sampler.row_keys(0, b))
    slots = Slots(kv.init_cache(config, b, max_length, dtype), jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool),
                  jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.full((b, max_stop_ids), -1, jnp.int32),
                  jnp.zeros((b,), jnp.int32), rows, jnp.zeros((b, config.vocab_size), jnp.int32))
    return jax.device_put(slots, device or jax.devices()[0])


def _rows(x: jax.Array, slot_ids: jax.Array) -> jax.Array:
    """Rows `slot_ids` [k] of x (an out-of-range id, a padding row, reads the last row)."""
    return jnp.take(x, slot_ids, axis=0, mode="clip")


def _put(x: jax.Array, rows: jax.Array, slot_ids: jax.Array) -> jax.Array:
    """x with rows `slot_ids` [k] replaced (an out-of-range id, a padding row, writes nothing)."""
    return x.at[slot_ids].set(rows.astype(x.dtype), mode="drop")


def _top(logits: jax.Array, want) -> tuple[jax.Array, jax.Array]:
    """Top alternatives when `want`, zeros otherwise (the top-k over the vocabulary is skipped)."""
    b = logits.shape[0]
    zeros = (jnp.zeros((b, TOP_LOGPROBS), jnp.int32), jnp.zeros((b, TOP_LOGPROBS), jnp.float32))
    return jax.lax.cond(want, lambda l: sampler.top_logprobs(l, TOP_LOGPROBS), lambda l: zeros, logits)


@functools.partial(jax.jit, static_argnames=("graph", "fresh"), donate_argnames=("slots",))
def prefill(graph: Graph, state, slots: Slots, slot_ids, tokens, positions, final, arm: Arm, *, fresh: bool):
    """Feed k requests' right-padded chunks [k, T] at `positions` into slots `slot_ids` [k] of the
    batched cache (fresh: each chunk is its request's first and attends to itself only). A row
    whose chunk is its request's last (`final` [k]) is armed with its first token and settings;
    until then it stays done, so decode calls leave it alone. Padding rows (to a bucket of k) have
    slot id B (out of range): they read the last slot and write nothing.

    Returns (slots, Tokens of [k, N=1]): each row's first token.
    """
    model = nnx.merge(graph.graphdef, state)
    k = tokens.shape[0]
    rows = sampler.Rows(*arm.sampling, sampler.first_row_keys(arm.seeds))
    if fresh:   # nothing of the slots' old contents is read: start from empty rows, as generate_ids does
        row_cache = kv.KVCache(tuple(kv.LayerKV(jnp.zeros((k, *l.k.shape[1:]), l.k.dtype),
                                                jnp.zeros((k, *l.v.shape[1:]), l.v.dtype)) for l in slots.cache.layers),
                               jnp.zeros((k,), jnp.int32))
    else:
        row_cache = kv.KVCache(tuple(kv.LayerKV(_rows(l.k, slot_ids), _rows(l.v, slot_ids))
                                     for l in slots.cache.layers), _rows(slots.cache.end, slot_ids))
    logits, row_cache = sampler.prefill_logits(model, tokens, positions, row_cache, fresh)
    first, logprob = sampler.sample(logits, rows, jnp.zeros((k,), jnp.int32))
    top_ids, top_lps = _top(logits, jnp.any(arm.top_n > 0))
    cache = kv.KVCache(tuple(kv.LayerKV(_put(l.k, r.k, slot_ids), _put(l.v, r.v, slot_ids))
                             for l, r in zip(slots.cache.layers, row_cache.layers)),
                       _put(slots.cache.end, row_cache.end, slot_ids))
    finished = jnp.any(first[:, None] == arm.stop_ids, axis=1) | (arm.max_tokens <= 1)
    vocab = slots.counts.shape[1]
    slots = Slots(cache,
                  _put(slots.last, first, slot_ids),
                  _put(slots.done, ~final | finished, slot_ids),
                  _put(slots.steps, jnp.ones((k,), jnp.int32), slot_ids),
                  _put(slots.max_tokens, arm.max_tokens, slot_ids),
                  _put(slots.stop_ids, arm.stop_ids, slot_ids),
                  _put(slots.top_n, arm.top_n, slot_ids),
                  jax.tree.map(lambda all_rows, some: _put(all_rows, some, slot_ids), slots.rows, rows),
                  _put(slots.counts, jax.nn.one_hot(first, vocab, dtype=jnp.int32), slot_ids))
    return slots, Tokens(first[:, None], logprob[:, None], top_ids[:, None], top_lps[:, None])


@functools.partial(jax.jit, static_argnames=("graph", "buffer", "rows"), donate_argnames=("slots",))
def decode(graph: Graph, state, slots: Slots, limit, *, buffer: int, rows: int):
    """Up to `limit` (<= buffer) tokens for every live row among the first `rows` slots (the
    others must be done); stops early once every row is done.

    A row is done after a stop id or its max_tokens-th token; the host learns both from the
    returned Tokens [rows, buffer] (ids after a row is done are -1) and frees the slot.
    Returns (slots, Tokens, done [rows]: each row's done flag after the call).
    """
    model = nnx.merge(graph.graphdef, state)
    everything = slots
    b = everything.last.shape[0]
    if rows < b:
        slots = jax.tree.map(lambda x: x[:rows], everything)
    out = Tokens(jnp.full((rows, buffer), -1, jnp.int32), jnp.zeros((rows, buffer), jnp.float32),
                 jnp.zeros((rows, buffer, TOP_LOGPROBS), jnp.int32),
                 jnp.zeros((rows, buffer, TOP_LOGPROBS), jnp.float32))

    def cond(carry):
        i, s, _ = carry
        return (i < limit) & ~jnp.all(s.done)

    def body(carry):
        i, s, out = carry
        logits, cache = sampler.step_logits(model, s.last, s.done, s.cache)
        token, logprob = sampler.sample(logits, s.rows, s.steps, s.counts)
        live = ~s.done
        top_ids, top_lps = _top(logits, jnp.any(live & (s.top_n > 0)))
        steps = s.steps + live
        done = s.done | (live & (jnp.any(token[:, None] == s.stop_ids, axis=1) | (steps >= s.max_tokens)))
        out = Tokens(out.ids.at[:, i].set(jnp.where(live, token, -1)), out.logprobs.at[:, i].set(logprob),
                     out.top_ids.at[:, i].set(top_ids), out.top_logprobs.at[:, i].set(top_lps))
        s = s._replace(cache=cache, last=jnp.where(live, token, s.last), done=done, steps=steps,
                       counts=sampler.count(s.counts, token, live))
        return i + 1, s, out

    _, slots, out = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out))
    done = slots.done
    if rows < b:
        slots = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), everything, slots)
    return slots, out, done


def decode_buckets(max_batch: int, smallest: int) -> tuple[int, ...]:
    """The row counts decode compiles for: powers of two from `smallest`, and max_batch."""
    sizes = {max_batch}
    n = min(smallest, max_batch)
    while n < max_batch:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes))


@functools.partial(jax.jit, donate_argnames=("done",))
def release(done, mask):
    """Mark the rows in `mask` [B] done (stopped by the host: stop string, cancellation)."""
    return done | mask


def arm(max_tokens, stop_ids, top_n, samplings, seeds, max_stop_ids: int, rows: int) -> Arm:
    """The settings of k requests (a list of each: max_tokens, stop ids, top_n, Sampling, integer
    seed) as the [rows] arrays `prefill` writes into their slots; rows past k (padding) repeat
    the first request's."""
    pad = rows - len(max_tokens)
    max_tokens, stop_ids, top_n, samplings, seeds = (list(x) + [x[0]] * pad
                                                     for x in (max_tokens, stop_ids, top_n, samplings, seeds))
    stops = np.full((rows, max_stop_ids), -1, np.int32)
    for i, ids in enumerate(stop_ids):
        stops[i, :len(ids)] = ids
    return Arm(np.asarray(max_tokens, np.int32), stops, np.asarray(top_n, np.int32), sampler.Rows.host(samplings),
               np.stack([sampler.seed_data(s) for s in seeds]))
