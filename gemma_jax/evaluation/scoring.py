"""Log-probabilities of token sequences: the scoring core of evaluation (perplexity, lm-eval).

A request is a pair (context ids, continuation ids). The model reads context + continuation[:-1];
for every continuation token the result holds log P(token | all tokens before it) and whether the
token is the argmax there (lm-eval's `is_greedy`): the positions HF scores in one forward of the
same tokens.

Faster than one forward per request, with the same numbers:
- requests are sorted by length (longest first, as lm-eval's HF backend does), batched up to a
  token budget and padded to length buckets (length_bucket) and power-of-two batch sizes, so a
  corpus of any lengths compiles a bounded number of programs (per length bucket, a few batch sizes and scored-position
  buckets);
- logits are computed only at scored positions (the [D, V] unembedding is a fifth of a 2B forward,
  and most of a multiple-choice request is context);
- requests that share a context (the choices of a multiple-choice question) read it once: all of
  it but its last token goes through the model into a KV cache, then each continuation (after that
  last token) runs against the cache.
Hooks (`{site or pattern: fn}`, as in `interp.run_with_hooks`) apply to every forward. They must
act on each position on its own (steering vectors, SAE splices): a request may be split into a
cached context and a continuation, and batches are padded.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import cache as kv
from gemma_jax import hooks as hooks_lib
from gemma_jax.errors import EvaluationError, GemmaWarning
from gemma_jax.sampler import bucket, pad_chunk

MIN_LENGTH = 16        # the shortest padded length (as the sampler's prompt buckets)
CHUNK_MIN_LENGTH = 8   # the shortest continuation chunk run against a cached context
FINE_FROM = 64         # lengths above this also get 3 * 2^(k-1) buckets


@dataclasses.dataclass(frozen=True)
class Batching:
    """How requests are packed. max_tokens bounds batch x padded length of one forward (and so the
    [rows, scored positions, V] float32 logits); max_rows bounds the rows of one forward."""

    max_tokens: int = 2048
    max_rows: int = 64
    share_prefix: bool = True

    def __post_init__(self):
        for name in ("max_tokens", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EvaluationError(f"{name} must be an integer >= 1, got {value!r}")


class Scored(NamedTuple):
    logprobs: np.ndarray   # float32 [n]: log P(continuation[i] | context, continuation[:i])
    greedy: np.ndarray     # bool [n]: continuation[i] is the argmax at its position


Pair = tuple[Sequence[int], Sequence[int]]


def make_hook(config, hooks: Mapping[str, Callable] | None):
    """{site or pattern: fn} -> a hashable `hooks.Hooks` (None when there is none)."""
    return hooks_lib.Hooks.from_mapping(config, hooks) if hooks else None



# ----------------------------------------------------------------------------- jitted programs
def _pick(model, hidden, where, targets, hook):
    """Log-probability and argmax test of `targets` [B, C] at positions `where` [B, C] of hidden."""
    picked = jnp.take_along_axis(hidden, where[:, :, None], axis=1)              # [B, C, D]
    logits = model.logits(picked, hook=hook)                                     # [B, C, V] float32
    target = jnp.take_along_axis(logits, targets[:, :, None], axis=-1)[..., 0]
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    # greedy = the target holds the largest logit: argmax without XLA:CPU's slow arg-reduction
    # (they differ only on an exact tie, where HF's argmax takes the lowest id)
    return target - lse, target >= top


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _score(graphdef, state, tokens, positions, where, targets, cache=None, hook=None):
    """tokens, positions [B, T] (-1 = padding), optionally after a cache -> scores at `where`."""
    model = nnx.merge(graphdef, state)
    if cache is not None:   # room for the chunk's writes: a global layer's buffer holds position p at slot p
        held = max(layer.k.shape[1] for layer in cache.layers)
        cache = kv.grow(cache, model.config, held + tokens.shape[1])
    hidden, _ = model(tokens, positions, cache, hook=hook)
    return _pick(model, hidden, where, targets, hook)


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, tokens, positions, hook=None):
    """Shared contexts [G, T] into an empty cache."""
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, cache, attend_cache=False, hook=hook)[1]


@jax.jit
def _rows_of(cache, rows):
    return jax.tree.map(lambda a: a[rows], cache)


def compiled_programs() -> int:
    """How many scoring programs have been compiled in this process (for tests and benchmarks)."""
    return _score._cache_size() + _prefill._cache_size() + _rows_of._cache_size()


# ----------------------------------------------------------------------------------- scoring
def length_bucket(n: int, minimum: int = MIN_LENGTH) -> int:
    """n rounded up to a power of two (at least `minimum`), and from FINE_FROM up to 2^k or
    3 * 2^(k-1): long rows, where padding costs most, are at most a third padding; short ones
    share few programs. Lengths up to N compile about 2 log2(N) programs."""
    n = max(n, minimum)
    p = bucket(n, 1)
    return 3 * p // 4 if p > FINE_FROM and n <= 3 * p // 4 else p


def _batches(items: list, length_of: Callable, batching: Batching, minimum: int):
    """(padded length, rows, padded rows) batches of items, longest first (as lm-eval's HF backend
    orders them): every row of a batch in one length bucket, at most a power-of-two number of rows
    within the budget; the last batch of a bucket is padded to a power of two with empty rows, so
    the batch sizes stay few."""
    items = sorted(items, key=lambda x: -length_of(x))     # stable: ties keep request order
    buckets = [length_bucket(length_of(x), minimum) for x in items]
    start = 0
    while start < len(items):
        length = buckets[start]
        room = max(1, min(batching.max_rows, batching.max_tokens // length))
        room = 1 << (room.bit_length() - 1)
        end = start
        while end < len(items) and buckets[end] == length and end - start < room:
            end += 1
        yield length, items[start:end], bucket(end - start, 1)
        start = end


def check_pairs(model, pairs: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
    """Pairs as int lists, each part non-empty, ids in the vocabulary, the fed tokens within
    max_position_embeddings."""
    out = []
    limit = model.config.max_position_embeddings
    for i, pair in enumerate(pairs):
        try:
            context, continuation = pair
        except (TypeError, ValueError):
            raise EvaluationError(f"request {i} must be a (context ids, continuation ids) pair") from None
        parts = []
        for name, ids in (("context", context), ("continuation", continuation)):
            arr = np.asarray(ids)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise EvaluationError(f"request {i}: the {name} must be a non-empty list of token ids")
            model.check_tokens(arr)
            parts.append(arr.astype(np.int64).tolist())
        fed = len(parts[0]) + len(parts[1]) - 1
        if fed > limit:
            raise EvaluationError(f"request {i}: context + continuation feed {fed} tokens, over the model's "
                                  f"max_position_embeddings {limit} (truncate the context: truncate_pair)")
        out.append((parts[0], parts[1]))
    return out


def truncate_pair(context: Sequence[int], continuation: Sequence[int], max_length: int):
    """lm-eval's HF truncation: keep the last max_length + 1 tokens of context + continuation (the
    model reads max_length of them). The continuation itself must fit in max_length."""
    context, continuation = list(context), list(continuation)
    if len(continuation) > max_length:
        raise EvaluationError(f"a continuation of {len(continuation)} tokens is longer than max_length {max_length}")
    keep = max_length + 1 - len(continuation)
    return (context[-keep:] if len(context) > keep else context), continuation


def score_pairs(model, pairs: Sequence[Pair], hooks: Mapping[str, Callable] | None = None,
                batching: Batching = Batching(), progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Scores of each (context, continuation) pair, in order; `progress(n)` after each batch of n."""
    pairs = check_pairs(model, pairs)
    hook = make_hook(model.config, hooks)
    out: list[Scored | None] = [None] * len(pairs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(i)
    shared = [g for c, g in groups.items() if batching.share_prefix and len(g) > 1 and len(c) > 1]
    alone = sorted(set(range(len(pairs))) - {i for g in shared for i in g})
    _score_alone(model, pairs, alone, hook, batching, out, progress)
    _score_shared(model, pairs, shared, hook, batching, out, progress)
    return out


def _fill(out, pairs, idxs, lp, greedy, progress):
    lp, greedy = np.asarray(lp), np.asarray(greedy)
    for r, i in enumerate(idxs):
        n = len(pairs[i][1])
        out[i] = Scored(lp[r, :n].astype(np.float32), greedy[r, :n].astype(bool))
    if progress is not None:
        progress(len(idxs))


def _score_alone(model, pairs, idxs, hook, batching, out, progress):
    """One forward of context + continuation[:-1] per request, logits at the continuation's
    positions only."""
    fed = {i: pairs[i][0] + pairs[i][1][:-1] for i in idxs}
    pad = model.config.pad_token_id
    for length, rows, b in _batches(idxs, lambda i: len(fed[i]), batching, MIN_LENGTH):
        scored = min(length, bucket(max(len(pairs[i][1]) for i in rows), 1))
        tokens, positions = pad_chunk([fed[i] for i in rows] + [[]] * (b - len(rows)), [0] * b, length, pad)
        where = np.zeros((b, scored), np.int32)
        targets = np.zeros((b, scored), np.int32)
        for r, i in enumerate(rows):
            n, end = len(pairs[i][1]), len(fed[i])
            where[r, :n] = np.arange(end - n, end)
            targets[r, :n] = pairs[i][1]
        lp, greedy = _score(model.graphdef, model.state, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(where), jnp.asarray(targets), hook=hook)
        _fill(out, pairs, rows, lp, greedy, progress)


def _score_shared(model, pairs, groups, hook, batching, out, progress):
    """Contexts shared by several requests: all but the context's last token into a KV cache once,
    then [last context token] + continuation[:-1] per request against the cache."""
    pad = model.config.pad_token_id
    # the cache holds the whole context length, so the last context token's write never wraps
    for length, batch, g in _batches(groups, lambda grp: len(pairs[grp[0]][0]), batching, MIN_LENGTH):
        prefixes = [pairs[grp[0]][0][:-1] for grp in batch] + [[]] * (g - len(batch))
        tokens, positions = pad_chunk(prefixes, [0] * g, length, pad)
        cache = _prefill(model.graphdef, model.state, model.new_cache(g, length), jnp.asarray(tokens),
                         jnp.asarray(positions), hook=hook)
        members = [(gi, i) for gi, grp in enumerate(batch) for i in grp]
        for chunk_len, rows, b in _batches(members, lambda m: len(pairs[m[1]][1]), batching, CHUNK_MIN_LENGTH):
            empty = b - len(rows)
            chunks = [[pairs[i][0][-1]] + pairs[i][1][:-1] for _, i in rows] + [[]] * empty
            starts = [len(pairs[i][0]) - 1 for _, i in rows] + [0] * empty
            tokens, positions = pad_chunk(chunks, starts, chunk_len, pad)
            where = np.broadcast_to(np.arange(chunk_len, dtype=np.int32), (b, chunk_len))
            targets = np.zeros((b, chunk_len), np.int32)
            for r, (_, i) in enumerate(rows):
                targets[r, :len(pairs[i][1])] = pairs[i][1]
            row_cache = _rows_of(cache, jnp.asarray([gi for gi, _ in rows] + [0] * empty, jnp.int32))
            lp, greedy = _score(model.graphdef, model.state, jnp.asarray(tokens), jnp.asarray(positions),
                                jnp.asarray(where), jnp.asarray(targets), row_cache, hook=hook)
            _fill(out, pairs, [i for _, i in rows], lp, greedy, progress)


# ------------------------------------------------------------------------------ rolling windows
def rolling_pairs(ids: Sequence[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Requests scoring every token of `ids` but the first exactly once, with at most `window`
    tokens fed per forward.

    The first window feeds ids[:window] and scores ids[1:window + 1]. Each later window scores the
    next `stride` tokens (fewer at the end), feeding the `window` tokens before the last of them:
    every token after the first window sees at least window - stride + 1 tokens of context.
    stride == window gives lm-eval's disjoint windows.
    """
    ids = list(ids)
    if not 1 <= stride <= window:
        raise EvaluationError(f"stride must be in [1, window={window}], got {stride}")
    out = []
    done = min(window, len(ids) - 1)    # targets 1..done are scored by the first window
    if done < 1:
        return out
    out.append((ids[:1], ids[1:done + 1]))
    while done < len(ids) - 1:
        end = min(done + stride, len(ids) - 1)
        start = max(0, end - window)
        out.append((ids[start:done + 1], ids[done + 1:end + 1]))
        done = end
    return out


def token_logprobs(model, sequences: Sequence[Sequence[int]], window: int | None = None,
                   stride: int | None = None, hooks: Mapping[str, Callable] | None = None,
                   batching: Batching = Batching(), progress: Callable[[int], None] | None = None,
                   ) -> list[np.ndarray]:
    """log P(ids[t] | ids[:t]) for t = 1..len-1 of each sequence (float32 [len - 1]).

    A sequence longer than `window` (default: max_position_embeddings) is scored in rolling windows
    (see rolling_pairs; stride default window // 2); one that fits is one forward, as in HF.
    """
    window, stride = check_window(model, window, stride)
    pairs, owner = [], []
    for s, ids in enumerate(sequences):
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
            raise EvaluationError(f"sequence {s} must be a list of at least 2 token ids (BOS and one more)")
        for pair in rolling_pairs(arr.tolist(), window, stride):
            pairs.append(pair)
            owner.append(s)
    scored = score_pairs(model, pairs, hooks, batching, progress)
    out: list[list[np.ndarray]] = [[] for _ in sequences]
    for s, result in zip(owner, scored):
        out[s].append(result.logprobs)
    return [np.concatenate(parts) for parts in out]


def check_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    limit = model.config.max_position_embeddings
    window = limit if window is None else window
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= limit:
        raise EvaluationError(f"window must be an integer in [1, max_position_embeddings={limit}], got {window!r}")
    stride = max(1, window // 2) if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= window:
        raise EvaluationError(f"stride must be an integer in [1, window={window}], got {stride!r}")
    return window, stride


# ---------------------------------------------------------------------------- text requests
def encode_pair(encode: Callable[..., list[int]], context: str, continuation: str, prefix_id: int):
    """lm-eval's `TemplateLM` tokenization of a (context, continuation) pair of strings.

    Trailing spaces of the context move to the continuation; the continuation's ids are those of
    encode(context + continuation) after the first len(encode(context)). An empty context becomes
    [prefix_id] (BOS), unless the continuation's own first id is it. `encode(text, add_bos)`.
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise EvaluationError("context and continuation must be strings")
    if context == "":
        ids = encode(continuation, add_bos=False)
        if not ids:
            raise EvaluationError("an empty context needs a non-empty continuation")
        return ([prefix_id], ids) if ids[0] != prefix_id else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation, add_bos=True), encode(context, add_bos=True)
    return head, whole[len(head):]


def loglikelihoods(model, contexts: Sequence[str], continuations: Sequence[str],
                   hooks: Mapping[str, Callable] | None = None, batching: Batching = Batching(),
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether every token is the argmax) per pair of
    strings, as lm-eval defines them (encode_pair; contexts too long are cut from the left)."""
    tok = model._need_tokenizer()
    limit = model.config.max_position_embeddings
    pairs, cut = [], 0
    for i, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
        context_ids, continuation_ids = encode_pair(tok.encode, context, continuation, tok.bos_id)
        if not continuation_ids:
            raise EvaluationError(f"request {i}: the continuation {continuation!r} adds no token to the context")
        pair = truncate_pair(context_ids, continuation_ids, limit)
        cut += len(pair[0]) < len(context_ids)
        pairs.append(pair)
    if cut:
        warnings.warn(f"{cut} contexts longer than max_position_embeddings {limit} were cut from the left",
                      GemmaWarning)
    return [(float(np.sum(s.logprobs, dtype=np.float64)), bool(s.greedy.all()))
            for s in score_pairs(model, pairs, hooks, batching, progress)]
