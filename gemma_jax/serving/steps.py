"""The engine's jitted programs over one batched decode state (JetStream's prefill / insert /
generate split, with the insert fused into the prefill):

- `prefill`: one request's prompt chunk [1, T] into its slot of the batched KV cache; on the last
  chunk, its first token and the row's settings (sampling arrays, stop ids, max_tokens) armed.
- `decode`: up to `limit` tokens for every live row in one call (a lax.while_loop), the state
  donated; finished rows go idle on the device, in the step that finished them. It runs over the
  first `rows` slots only (a power-of-two bucket holding every live row), so a lightly loaded
  engine does not pay for the whole batch.

Shapes: B slots, S cache positions, M stop ids per row, N tokens per decode call, V vocab.
Compilation: `prefill` once per (prompt bucket T, fresh cache or not), `decode` once per
(row bucket, S, N); sampling settings are arrays, so no mix of requests compiles anything new.
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
    """One request's settings, as the prefill program writes them into its slot."""
    max_tokens: jax.Array  # int32
    stop_ids: jax.Array    # [M] int32
    top_n: jax.Array       # int32
    rows: sampler.Rows     # [1]


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


def _row(x: jax.Array, slot) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)


def _put(x: jax.Array, row: jax.Array, slot) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, row.astype(x.dtype), slot, axis=0)


def _top(logits: jax.Array, want) -> tuple[jax.Array, jax.Array]:
    """Top alternatives when `want`, zeros otherwise (the top-k over the vocabulary is skipped)."""
    b = logits.shape[0]
    zeros = (jnp.zeros((b, TOP_LOGPROBS), jnp.int32), jnp.zeros((b, TOP_LOGPROBS), jnp.float32))
    return jax.lax.cond(want, lambda l: sampler.top_logprobs(l, TOP_LOGPROBS), lambda l: zeros, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh"), donate_argnames=("slots",))
def prefill(graphdef, state, slots: Slots, slot, tokens, positions, final, arm: Arm, *, fresh: bool):
    """Feed a right-padded chunk [1, T] at `positions` into slot `slot`'s cache (fresh: the first
    chunk of a new request, which attends to itself only). On the final chunk the row is armed
    with its first token; until then it stays done, so decode calls leave it alone.

    Returns (slots, Tokens of [B=1, N=1]) for the first token.
    """
    model = nnx.merge(graphdef, state)
    row_cache = kv.KVCache(tuple(kv.LayerKV(_row(l.k, slot), _row(l.v, slot)) for l in slots.cache.layers),
                           jnp.zeros((1,), jnp.int32) if fresh else _row(slots.cache.end, slot))
    logits, row_cache = sampler.prefill_logits(model, tokens, positions, row_cache, fresh)
    first, logprob = sampler.sample(logits, arm.rows, jnp.zeros((1,), jnp.int32))
    top_ids, top_lps = _top(logits, arm.top_n > 0)
    cache = kv.KVCache(tuple(kv.LayerKV(_put(l.k, r.k, slot), _put(l.v, r.v, slot))
                             for l, r in zip(slots.cache.layers, row_cache.layers)),
                       _put(slots.cache.end, row_cache.end, slot))
    finished = jnp.isin(first[0], arm.stop_ids) | (arm.max_tokens <= 1)
    vocab = slots.counts.shape[1]
    slots = Slots(cache,
                  slots.last.at[slot].set(first[0]),
                  slots.done.at[slot].set(~final | finished),
                  slots.steps.at[slot].set(1),
                  slots.max_tokens.at[slot].set(arm.max_tokens),
                  _put(slots.stop_ids, arm.stop_ids[None], slot),
                  slots.top_n.at[slot].set(arm.top_n),
                  jax.tree.map(lambda all_rows, one: _put(all_rows, one, slot), slots.rows, arm.rows),
                  _put(slots.counts, jax.nn.one_hot(first, vocab, dtype=jnp.int32), slot))
    return slots, Tokens(first[:, None], logprob[:, None], top_ids[:, None], top_lps[:, None])


@functools.partial(jax.jit, static_argnames=("graphdef", "buffer", "rows"), donate_argnames=("slots",))
def decode(graphdef, state, slots: Slots, limit, *, buffer: int, rows: int):
    """Up to `limit` (<= buffer) tokens for every live row among the first `rows` slots (the
    others must be done); stops early once every row is done.

    A row is done after a stop id or its max_tokens-th token; the host learns both from the
    returned Tokens [rows, buffer] (ids after a row is done are -1) and frees the slot.
    """
    model = nnx.merge(graphdef, state)
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
    if rows < b:
        slots = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), everything, slots)
    return slots, out


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


def arm(max_tokens: int, stop_ids, max_stop_ids: int, top_n: int, sampling: sampler.Sampling,
        key: jax.Array) -> Arm:
    """A request's settings as the arrays `prefill` writes into its slot."""
    stops = np.full((max_stop_ids,), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    rows = sampler.Rows.build([sampling], key[None])
    return Arm(jnp.int32(max_tokens), jnp.asarray(stops), jnp.int32(top_n), rows)
