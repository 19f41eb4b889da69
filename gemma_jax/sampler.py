"""Prefill and a jitted decode loop over the KV cache; sampling strategies as a frozen dataclass.

Compilation: prompts are right-padded to a power-of-two length (at least 16), the cache to a
power of two of prompt + new tokens (at least 32), the output buffer to a power of two of
max_new_tokens. `start` compiles once per (batch, padded prompt, cache length, output buffer,
sampling, fresh or continued cache); `decode` once per (batch, cache length, output buffer, sampling).
The decode step limit is a traced argument, so streaming in chunks reuses the same program, and the
stop ids are padded to a power of two (at least 4).

Chunked prefill: a prompt longer than PREFILL_CHUNK tokens goes into the cache PREFILL_CHUNK tokens
at a time (`prefill_chunk`, one compilation), positions continuing, the last piece through `start`;
activation memory is then bounded by the chunk, not the prompt. Each chunk attends over the
cache's buffers and itself (see model.Attention), so ring buffers wrap correctly inside a chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import cache as kv
from gemma_jax import checks


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise temperature, then top-k, then top-p (HF's order)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):  # checked, and stored as plain Python numbers (NumPy scalars accepted)
        object.__setattr__(self, "temperature", checks.number("temperature", self.temperature))
        object.__setattr__(self, "top_k", checks.integer("top_k", self.top_k, minimum=1, optional=True))
        object.__setattr__(self, "top_p", checks.probability("top_p", self.top_p, optional=True))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """[B, V] float32 logits with temperature, top-k and top-p applied (removed tokens -> -inf)."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of strictly better tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def pick(logits: jax.Array, rng: jax.Array, step: jax.Array, sampling: Sampling):
    """Choose one token per row; each row draws from its own key so rows are batch-independent.

    Returns (tokens [B], log-probabilities [B] of the chosen tokens under the model's unmodified
    distribution).
    """
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits, sampling)
        keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(rng, row), step))(
            jnp.arange(logits.shape[0]))
        tokens = jax.vmap(jax.random.categorical)(keys, filtered)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


class Loop(NamedTuple):
    """The decode loop's state (a pytree, donated to each call)."""
    cache: kv.KVCache
    tokens: jax.Array    # [B, N] int32 generated tokens (pad after a row is done)
    logprobs: jax.Array  # [B, N] float32
    done: jax.Array      # [B] bool
    step: jax.Array      # int32: tokens generated so far
    rng: jax.Array


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


PREFILL_CHUNK = 1024  # prompts longer than this are prefilled in chunks of this many tokens


def _prefill(model, cache, tokens, positions, fresh, hook):
    """(cache, final-normed hidden [B, D] at each row's last real token of the chunk)."""
    hidden, cache = model(tokens, positions, cache, attend_cache=not fresh, hook=hook)
    last = jnp.sum(positions >= 0, axis=1) - 1
    return cache, hidden[jnp.arange(tokens.shape[0]), last]


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh", "logits", "hook"), donate_argnames=("cache",))
def prefill_chunk(graphdef, state, cache: kv.KVCache, tokens, positions, *, fresh: bool = False,
                  logits: bool = True, hook=None):
    """Append one right-padded chunk to the cache: tokens, positions [B, C] (-1 = padding; each
    row's positions continue its cache, `cache.end`). Returns (cache, float32 logits [B, V] at each
    row's last real token of the chunk), or (cache, hidden [B, D]) with logits=False.

    fresh: the cache is empty (nothing to attend to). The cache is donated. A row with no token in
    this chunk (all padding) is left as it was; its logits are meaningless.
    """
    model = nnx.merge(graphdef, state)
    cache, hidden = _prefill(model, cache, tokens, positions, fresh, hook)
    return cache, (model.logits(hidden, hook=hook) if logits else hidden)


def split_prompts(chunks: Sequence[Sequence[int]], starts: Sequence[int], size: int):
    """Cut each row's tokens into pieces of `size`, aligned so that every row's last piece is in
    the last call: a list of (pieces per row, start position per row), one per call."""
    counts = [max(1, -(-len(c) // size)) for c in chunks]
    calls = []
    for i in range(max(counts)):
        pieces, piece_starts = [], []
        for chunk, s, n in zip(chunks, starts, counts):
            k = i - (max(counts) - n)  # this row's piece index (negative: not started yet)
            pieces.append(list(chunk[k * size:(k + 1) * size]) if k >= 0 else [])
            piece_starts.append(s + max(k, 0) * size)
        calls.append((pieces, piece_starts))
    return calls


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "buffer", "fresh", "hook"),
                   donate_argnames=("cache",))
def start(graphdef, state, cache, tokens, positions, rng, stop_ids, pad_id, *, sampling, buffer, fresh,
          hook=None):
    """Run a right-padded chunk [B, T] through the model into the cache and pick the first token."""
    model = nnx.merge(graphdef, state)
    cache, hidden = _prefill(model, cache, tokens, positions, fresh, hook)
    logits = model.logits(hidden, hook=hook)
    first, logprob = pick(logits, rng, jnp.int32(0), sampling)
    b = tokens.shape[0]
    out = jnp.full((b, buffer), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((b, buffer), jnp.float32).at[:, 0].set(logprob)
    return Loop(cache, out, logprobs, jnp.isin(first, stop_ids), jnp.int32(1), rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "hook"), donate_argnames=("loop",))
def decode(graphdef, state, loop: Loop, stop_ids, pad_id, limit, *, sampling, hook=None) -> Loop:
    """Generate until `limit` tokens exist or every row is done (a lax.while_loop)."""
    model = nnx.merge(graphdef, state)

    def cond(l: Loop):
        return (l.step < limit) & ~jnp.all(l.done)

    def body(l: Loop):
        prev = jax.lax.dynamic_index_in_dim(l.tokens, l.step - 1, axis=1, keepdims=True)
        # a finished row is fed at position -1: nothing is written, its cache stays continuable
        hidden, cache = model(prev, jnp.where(l.done, -1, l.cache.end)[:, None], l.cache, hook=hook)
        token, logprob = pick(model.logits(hidden[:, 0], hook=hook), l.rng, l.step, sampling)
        token = jnp.where(l.done, pad_id, token)
        tokens = jax.lax.dynamic_update_index_in_dim(l.tokens, token, l.step, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(l.logprobs, logprob, l.step, axis=1)
        return Loop(cache, tokens, logprobs, l.done | jnp.isin(token, stop_ids), l.step + 1, l.rng)

    return jax.lax.while_loop(cond, body, loop)


def pad_chunk(chunks: Sequence[Sequence[int]], starts: Sequence[int], length: int, pad_id: int):
    """Right-pad token lists into [B, length] tokens and positions (-1 at padding)."""
    tokens = np.full((len(chunks), length), pad_id, np.int32)
    positions = np.full((len(chunks), length), -1, np.int32)
    for i, (chunk, s) in enumerate(zip(chunks, starts)):
        tokens[i, :len(chunk)] = chunk
        positions[i, :len(chunk)] = np.arange(s, s + len(chunk))
    return tokens, positions


@dataclasses.dataclass
class Result:
    tokens: list[list[int]]                 # new tokens per row, stop token excluded
    logprobs: list[list[float]] | None      # their log-probabilities, when asked for
    stopped: list[bool]                     # whether each row ended on a stop id or stop request


def run(graphdef, state, cache: kv.KVCache, chunks: Sequence[Sequence[int]], starts: Sequence[int],
        max_new_tokens: int, sampling: Sampling, seed: int, stop_ids: Sequence[int], pad_id: int,
        fresh: bool, stream: Callable[[list[list[int]]], Sequence[int] | None] | None = None,
        stream_every: int = 1, hook=None, chunk_size: int = PREFILL_CHUNK):
    """Feed each row's chunk (appended at position starts[row]) and generate up to max_new_tokens.
    A chunk longer than `chunk_size` is prefilled `chunk_size` tokens at a time.

    `stream(new_tokens_per_row)` is called after every `stream_every` tokens when given; it may
    return row indices to stop (stop strings). Returns (Result, cache).
    `hook` (a hashable `hooks.Hooks`) edits hook sites during
    prefill and every decode step (steered generation).
    """
    b = len(chunks)
    calls = split_prompts(chunks, starts, chunk_size)
    for pieces, piece_starts in calls[:-1]:
        tokens, positions = pad_chunk(pieces, piece_starts, chunk_size, pad_id)
        cache, _ = prefill_chunk(graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(positions), fresh=fresh,
                                 logits=False, hook=hook)
        fresh = False
    chunks, starts = calls[-1]
    length = bucket(max(len(c) for c in chunks), 16)
    tokens, positions = pad_chunk(chunks, starts, length, pad_id)
    buffer = bucket(max_new_tokens, 1)
    stops = sorted(set(stop_ids))
    stops = jnp.asarray(stops + [-1] * (bucket(len(stops), 4) - len(stops)), jnp.int32)  # -1: no token
    rng = jax.random.key(seed)
    loop = start(graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(positions), rng, stops,
                 jnp.int32(pad_id), sampling=sampling, buffer=buffer, fresh=fresh, hook=hook)
    ends: list[int | None] = [None] * b   # tokens kept per row, once the row has finished
    seen, limit = 0, (max_new_tokens if stream is None else 1)
    while True:
        loop = decode(graphdef, state, loop, stops, jnp.int32(pad_id), jnp.int32(limit), sampling=sampling,
                      hook=hook)
        step = int(_host(loop.step))
        new = _host(loop.tokens)[:, seen:step]
        delivered = []
        for i in range(b):
            row = np.asarray([], np.int32) if ends[i] is not None else _until_stop(new[i], stop_ids)
            if ends[i] is None and len(row) < len(new[i]):
                ends[i] = seen + len(row)
            delivered.append(row.tolist())
        if stream is not None:
            for r in stream(delivered) or ():
                if ends[r] is None:
                    ends[r] = step
            done = np.asarray([e is not None for e in ends])
            loop = loop._replace(done=jax.device_put(done, loop.done.sharding))  # same placement: no recompile
        seen = step
        if step >= max_new_tokens or all(e is not None for e in ends):
            break
        limit = min(max_new_tokens, step + stream_every)
    out, logprobs = _host(loop.tokens), _host(loop.logprobs)
    result = Result([], [], [])
    for i in range(b):
        n = step if ends[i] is None else ends[i]
        result.tokens.append(out[i, :n].tolist())
        result.logprobs.append(logprobs[i, :n].tolist())
        result.stopped.append(ends[i] is not None)
    return result, loop.cache


def _until_stop(row: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
    hits = np.flatnonzero(np.isin(row, list(stop_ids)))
    return row[:hits[0]] if hits.size else row


def _host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process, sharded) array as a NumPy array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
