"""Prefill and a jitted decode loop over the KV cache; sampling as per-row arrays.

Sampling: `Sampling` (a frozen dataclass) describes one row's settings; `Rows` holds a batch of
them as [B] arrays passed into the jitted step like the cache, so a batch may mix greedy and
sampled rows, and changing a setting compiles nothing. `sample` is the one implementation of
penalties, temperature, top-k, top-p and the draw, used by `generate_ids` and the serving engine
alike. Each row draws from its own key folded with its own step count, never from its place in
the batch.

Compilation: prompts are right-padded to a power-of-two length (at least 16), the cache to a
power of two of prompt + new tokens (at least 32), the output buffer to a power of two of
max_new_tokens. `start` compiles once per (batch, padded prompt, cache length, output buffer,
fresh or continued cache); `decode` once per (batch, cache length, output buffer).
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
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import cache as kv
from gemma_jax import checks


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One row's sampling settings. temperature 0 is greedy; otherwise temperature, then top-k,
    then top-p (HF's order). Presence and frequency penalties (OpenAI's) first subtract
    `presence * (count > 0) + frequency * count` from the logit of each token generated so far
    (greedy rows included)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):  # checked, and stored as plain Python numbers (NumPy scalars accepted)
        object.__setattr__(self, "temperature", checks.number("temperature", self.temperature))
        object.__setattr__(self, "top_k", checks.integer("top_k", self.top_k, minimum=1, optional=True))
        object.__setattr__(self, "top_p", checks.probability("top_p", self.top_p, optional=True))
        for name in ("presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, checks.number(name, getattr(self, name), minimum=-math.inf))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Rows(NamedTuple):
    """A batch of sampling settings as [B] arrays (a pytree, traced under jit)."""
    temperature: jax.Array        # float32; 0 = greedy
    top_k: jax.Array              # int32; 0 = no top-k
    top_p: jax.Array              # float32; 1 = no top-p
    presence_penalty: jax.Array   # float32
    frequency_penalty: jax.Array  # float32
    key: jax.Array                # [B] PRNG keys: row b's token at step s draws from fold_in(key[b], s)

    @classmethod
    def build(cls, samplings: Sequence[Sampling], keys: jax.Array) -> Rows:
        """Arrays for these settings (one per row) and per-row keys (see `row_keys`)."""
        return cls(*(jnp.asarray(a) for a in cls.host(samplings)), keys)

    @staticmethod
    def host(samplings: Sequence[Sampling]) -> tuple[np.ndarray, ...]:
        """The settings as NumPy arrays, in field order (without the keys)."""
        return (np.asarray([0.0 if s.greedy else s.temperature for s in samplings], np.float32),
                np.asarray([s.top_k or 0 for s in samplings], np.int32),
                np.asarray([1.0 if s.top_p is None else s.top_p for s in samplings], np.float32),
                np.asarray([s.presence_penalty for s in samplings], np.float32),
                np.asarray([s.frequency_penalty for s in samplings], np.float32))


def seed_data(seed: int) -> np.ndarray:
    """The [2] uint32 key data of any integer seed, taken modulo 2**64 (that of jax.random.key(seed)
    for 0 <= seed < 2**32; without x64, jax.random.key would fold larger seeds onto small ones)."""
    s = int(seed) % 2**64
    return np.asarray([s >> 32, s & 0xFFFFFFFF], np.uint32)


def seed_key(seed: int) -> jax.Array:
    """A PRNG key for any integer seed (see `seed_data`)."""
    return jax.random.wrap_key_data(seed_data(seed))


def first_row_keys(data: jax.Array) -> jax.Array:
    """row_keys(seed, 1)[0] of k seeds at once, traceable: data [k, 2] their `seed_data` -> [k] keys."""
    return jax.vmap(lambda d: _fold_rows(jax.random.wrap_key_data(d), 1)[0])(data)


@functools.partial(jax.jit, static_argnums=1)
def _fold_rows(base: jax.Array, rows: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(rows))


def row_keys(seed: int, rows: int) -> jax.Array:
    """[rows] keys fold_in(seed_key(seed), row): row 0 of any batch with this seed draws the same
    stream, so a request with a seed samples alike alone, in a batch, or in the serving engine."""
    return _fold_rows(seed_key(seed), rows)


def penalize(logits: jax.Array, rows: Rows, counts: jax.Array) -> jax.Array:
    """[B, V] logits minus the presence and frequency penalties of the tokens counted so far."""
    return (logits - rows.frequency_penalty[:, None] * counts.astype(logits.dtype)
            - rows.presence_penalty[:, None] * (counts > 0).astype(logits.dtype))


TOP_CANDIDATES = 1024  # filter_rows: the best tokens top-k and top-p look at before sorting the whole row


def filter_rows(logits: jax.Array, rows: Rows, candidates: int = TOP_CANDIDATES) -> jax.Array:
    """[B, V] float32 logits with each row's temperature, top-k and top-p applied (removed -> -inf).

    Top-k keeps the values >= the k-th largest; top-p the smallest set of the best remaining tokens
    whose probability (renormalized over the top-k) reaches p. Both cuts come from the row's best
    `candidates` tokens (lax.top_k) when they hold it (`cuts_from_best`); only a row whose cut lies
    further needs its whole row sorted, and the sort runs only when some row does (on XLA:CPU,
    sorting [8, 256000] takes ~0.5 s, its top 1024 ~10 ms). A row's cut is computed the same way
    whichever path the batch takes, so it never depends on the other rows. Nothing is computed
    when no row asks for either cut.
    """
    v = logits.shape[-1]
    z = logits / jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    top_k = jnp.where((rows.top_k > 0) & (rows.top_k < v), rows.top_k, v)

    def truncate(z):
        threshold, holds = cuts_from_best(z, top_k, rows.top_p, candidates)

        def whole(_):
            ordered = jnp.sort(z, axis=-1)[:, ::-1]
            kth = jnp.take_along_axis(ordered, top_k[:, None] - 1, axis=-1)
            return jnp.where(holds, threshold, jnp.maximum(kth, _nucleus(z, ordered, kth, rows.top_p)[0]))

        threshold = jax.lax.cond(jnp.all(holds), lambda _: threshold, whole, None)
        return jnp.where(z < threshold, -jnp.inf, z)

    needed = jnp.any(top_k < v) | jnp.any(rows.top_p < 1)
    return jax.lax.cond(needed, truncate, lambda z: z, z)


def cuts_from_best(z: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int):
    """Each row's threshold [B, 1] (values below it are removed) from its best `candidates` values,
    and whether those hold it [B, 1]: top_k [B] (V = none) at most `candidates`, and top_p [B]
    reached among them."""
    v = z.shape[-1]
    best, _ = jax.lax.top_k(z, min(candidates, v))
    near = (top_k <= best.shape[-1]) | (top_k >= v)
    kth = jnp.where(top_k < v, jnp.take_along_axis(best, jnp.minimum(top_k, best.shape[-1])[:, None] - 1, axis=-1)[:, 0],
                    -jnp.inf)[:, None]
    threshold, holds = _nucleus(z, best, kth, top_p)
    return jnp.maximum(kth, threshold), holds & near[:, None]


def _nucleus(z, ordered, kth, top_p):
    """The top-p threshold [B, 1] of rows z [B, V] from their best values in descending order
    `ordered` [B, n] (a prefix of the sorted row), and whether that prefix holds it. The softmax is
    over each whole row's tokens >= kth [B, 1] (its top-k)."""
    p = top_p[:, None]
    lse = jax.nn.logsumexp(jnp.where(z >= kth, z, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.exp(jnp.where(ordered >= kth, ordered, -jnp.inf) - lse)
    cumulative = jnp.cumsum(probs, axis=-1)
    before = cumulative - probs                         # mass of strictly better tokens
    threshold = jnp.min(jnp.where(before < p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(p < 1, threshold, -jnp.inf), (p >= 1) | (cumulative[:, -1:] >= p)


def sample(logits: jax.Array, rows: Rows, steps: jax.Array, counts: jax.Array | None = None):
    """Choose one token per row: logits [B, V] float32, steps [B] (or a scalar) each row's own step
    count, counts [B, V] tokens generated so far (for the penalties; None = no penalties).

    Returns (tokens [B] int32, log-probabilities [B] of the chosen tokens under the model's
    unmodified distribution). Greedy rows take the argmax; the sampled path runs only when some
    row samples. Every operation is row-wise, so a row's token does not depend on the others.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if counts is not None:
        penalized = (rows.presence_penalty != 0) | (rows.frequency_penalty != 0)
        logits = jax.lax.cond(jnp.any(penalized), lambda x: penalize(x, rows, counts), lambda x: x, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = rows.temperature > 0

    def draw(logits):
        keys = jax.vmap(jax.random.fold_in)(rows.key, jnp.broadcast_to(steps, hot.shape))
        return jax.vmap(jax.random.categorical)(keys, filter_rows(logits, rows)).astype(jnp.int32)

    tokens = jnp.where(hot, jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, logits), greedy)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def top_logprobs(logits: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The n most likely tokens per row and their log-probabilities (unmodified distribution)."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), n)
    return ids.astype(jnp.int32), values


class Loop(NamedTuple):
    """The decode loop's state (a pytree, donated to each call)."""
    cache: kv.KVCache
    tokens: jax.Array    # [B, N] int32 generated tokens (pad after a row is done)
    logprobs: jax.Array  # [B, N] float32
    done: jax.Array      # [B] bool
    step: jax.Array      # int32: tokens generated so far
    rows: Rows
    counts: jax.Array | None  # [B, V] int32 tokens generated so far, when a row has penalties


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


PREFILL_CHUNK = 1024  # prompts longer than this are prefilled in chunks of this many tokens


def _prefill(model, cache, tokens, positions, fresh, hook):
    """(cache, final-normed hidden [B, D] at each row's last real token of the chunk)."""
    hidden, cache = model(tokens, positions, cache, attend_cache=not fresh, hook=hook)
    last = jnp.sum(positions >= 0, axis=1) - 1
    return cache, hidden[jnp.arange(tokens.shape[0]), last]


def prefill_logits(model, tokens, positions, cache, fresh: bool, hook=None):
    """Run a right-padded chunk [B, T] into the cache -> (logits [B, V] at each row's last real
    token, cache). fresh: the cache holds nothing yet (the chunk attends to itself only)."""
    cache, hidden = _prefill(model, cache, tokens, positions, fresh, hook)
    return model.logits(hidden, hook=hook), cache


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


def step_logits(model, last, done, cache, hook=None):
    """Feed each row's last token [B] at its next position -> (logits [B, V], cache). A done row is
    fed at position -1: nothing is written, its cache stays continuable."""
    hidden, cache = model(last[:, None], jnp.where(done, -1, cache.end)[:, None], cache, hook=hook)
    return model.logits(hidden[:, 0], hook=hook), cache


def count(counts: jax.Array | None, tokens: jax.Array, live: jax.Array):
    """Add each live row's new token [B] to its counts [B, V] (for the penalties)."""
    if counts is None:
        return None
    return counts.at[jnp.arange(tokens.shape[0]), tokens].add(live.astype(counts.dtype))


@functools.partial(jax.jit, static_argnames=("graphdef", "buffer", "fresh", "hook"), donate_argnames=("cache",))
def start(graphdef, state, cache, tokens, positions, rows: Rows, counts, stop_ids, pad_id, *, buffer, fresh,
          hook=None):
    """Run a right-padded chunk [B, T] through the model into the cache and pick the first token.
    counts: zeros [B, V] to apply the rows' penalties, or None."""
    model = nnx.merge(graphdef, state)
    logits, cache = prefill_logits(model, tokens, positions, cache, fresh, hook)
    first, logprob = sample(logits, rows, jnp.int32(0), counts)
    b = tokens.shape[0]
    out = jnp.full((b, buffer), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((b, buffer), jnp.float32).at[:, 0].set(logprob)
    counts = count(counts, first, jnp.ones((b,), bool))
    return Loop(cache, out, logprobs, jnp.isin(first, stop_ids), jnp.int32(1), rows, counts)


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"), donate_argnames=("loop",))
def decode(graphdef, state, loop: Loop, stop_ids, pad_id, limit, *, hook=None) -> Loop:
    """Generate until `limit` tokens exist or every row is done (a lax.while_loop)."""
    model = nnx.merge(graphdef, state)

    def cond(l: Loop):
        return (l.step < limit) & ~jnp.all(l.done)

    def body(l: Loop):
        prev = jax.lax.dynamic_index_in_dim(l.tokens, l.step - 1, axis=1, keepdims=False)
        logits, cache = step_logits(model, prev, l.done, l.cache, hook)
        token, logprob = sample(logits, l.rows, l.step, l.counts)
        token = jnp.where(l.done, pad_id, token)
        tokens = jax.lax.dynamic_update_index_in_dim(l.tokens, token, l.step, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(l.logprobs, logprob, l.step, axis=1)
        return Loop(cache, tokens, logprobs, l.done | jnp.isin(token, stop_ids), l.step + 1, l.rows,
                    count(l.counts, token, ~l.done))

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
    rows = Rows.build([sampling] * b, row_keys(seed, b))
    penalties = sampling.presence_penalty != 0 or sampling.frequency_penalty != 0
    counts = jnp.zeros((b, nnx.merge(graphdef, state).config.vocab_size), jnp.int32) if penalties else None
    loop = start(graphdef, state, cache, jnp.asarray(tokens), jnp.asarray(positions), rows, counts, stops,
                 jnp.int32(pad_id), buffer=buffer, fresh=fresh, hook=hook)
    ends: list[int | None] = [None] * b   # tokens kept per row, once the row has finished
    seen, limit = 0, (max_new_tokens if stream is None else 1)
    while True:
        loop = decode(graphdef, state, loop, stops, jnp.int32(pad_id), jnp.int32(limit), hook=hook)
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
