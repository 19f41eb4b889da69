"""The continuous-batching engine: a fixed number of decode slots over one batched KV cache, a
bounded waiting queue, admission with chunked prefill, multi-step decode, and per-request
detokenization, stop strings and logprobs. No HTTP here (see server.py).

One thread (the engine loop) owns the device state. Each iteration it
1. frees the slots of finished and cancelled requests (the step boundary),
2. prefills waiting requests into free slots: short prompts admitted together in one call of
   [k, T], a prompt longer than `prefill_chunk` alone, one chunk at a time; while other rows are
   decoding, about one chunk's worth of prompt tokens per iteration, so a long prompt (or a burst
   of short ones) never stalls the running requests for more than one chunk,
3. queues one multi-step decode call (`decode_steps` tokens per row), and while it runs hands each
   request the previous call's tokens and text through its `on_output` callback (the host's
   work overlaps the device's; a row the host ends, by a stop string or a cancel, runs masked for
   at most that one queued call). When a request is waiting for a free slot at that moment, the
   next call is queued only after its prefill, so admission waits for one call, not two.

Determinism: every row of the decode step is computed by row-wise operations and matrix products
whose rows do not depend on the other rows' values, the sampling of a row draws from its own seed
folded with its own step count. A request's tokens therefore do not depend on what shares the
batch or which slot it lands in. Prefill and decode programs for different row buckets are
different XLA programs, so logits may differ in the last bits (about 1e-6; see docs/serving.md):
a token could change only at an exact tie, which the tests never saw.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import secrets
import threading
import time
import traceback
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np

from gemma_jax import checks, sampler
from gemma_jax.api import Gemma, TextStream
from gemma_jax.errors import GemmaError, GenerationError, QueueFullError, UnavailableError
from gemma_jax.serving import steps
from gemma_jax.serving.metrics import Metrics
from gemma_jax.serving.types import (FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Completion, Output,
                                     Request, TokenLogprob)

STARTING, READY, DRAINING, STOPPED, FAILED = "starting", "ready", "draining", "stopped", "failed"


WARMUPS = ("all", "decode", "none")   # Engine.start: what to compile before serving


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8          # decode slots
    max_length: int = 1024      # cache positions per slot: prompt + generated tokens
    max_queue: int = 64         # requests waiting for a slot; one more gets QueueFullError (429)
    prefill_chunk: int = 256    # prompt tokens per prefill call (a power of two >= 16)
    decode_steps: int = 64      # most tokens per row per decode call (host round trip)
    # Each decode call makes as many steps as fit in about this many milliseconds, from the step
    # time measured on the previous calls (1..decode_steps; all the rows still need when that is
    # at most a quarter more): tokens stream about this often, a request arriving meanwhile waits
    # up to this long, and what the host pays per call (dispatch, fetch: ~1 ms on a CPU) stays small.
    decode_call_ms: float = 40.0
    max_stop_ids: int = 8       # stop ids per request
    # Decode runs over a power-of-two bucket of slots holding every live row, at least this many.
    # 1 (the default) lets a lone request use XLA:CPU's one-row product, as generate_ids does on
    # one prompt (on the default model 1.3x faster a step than two rows); 2 keeps every decode a
    # multi-row product. Buckets differ in their last bits either way (see docs/serving.md). A bucket
    # under max_batch copies its rows' state (KV cache included) out and back at every call: with
    # a big model and cache (2B, 1,024 positions: ~0.3 s for 4 of 8 rows), max_batch avoids that.
    min_decode_batch: int = 1

    def __post_init__(self):
        for name in ("max_batch", "max_length", "max_queue", "prefill_chunk", "decode_steps", "max_stop_ids",
                     "min_decode_batch"):
            checks.integer(name, getattr(self, name), 0 if name == "max_queue" else 1)
        checks.number("decode_call_ms", self.decode_call_ms, strict=True)
        if self.prefill_chunk < 16 or self.prefill_chunk & (self.prefill_chunk - 1):
            raise GenerationError(f"{checks.name('prefill_chunk')} must be a power of two >= 16, "
                                  f"got {self.prefill_chunk}")


class Handle:
    """A submitted request: `cancel()` ends it at the next step boundary (finish_reason 'abort')."""

    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request, self.id = engine, request, request.id
        self.slot: int | None = None   # the decode slot, once admitted

    def cancel(self) -> None:
        self.engine._cancel(self)


@dataclasses.dataclass(eq=False)
class _Live:
    """A request inside the engine."""
    request: Request
    handle: Handle
    on_output: Callable[[Output], None]
    text: TextStream | None
    arrival: float
    stop_ids: frozenset
    seed: int
    slot: int | None = None
    prefilled: int = 0                 # prompt tokens already in the cache
    generated: int = 0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cancelled: bool = False
    finished: bool = False
    device_done: bool = False          # the device has finished the row (stop id, max_tokens)


class _Call(NamedTuple):
    """A decode call in flight."""
    out: steps.Tokens
    done: jax.Array              # [rows] the rows' done flags after the call
    rows: list                   # the request decoding in each row when it was queued (or None)
    bucket: int                  # row bucket
    queued: float                # time.monotonic() when queued
    prefills: int                # prefill calls made before it was queued


class Engine:
    """Serve many concurrent generation requests with one model on one device (or mesh).

    `submit(request, on_output)` queues a request (QueueFullError / UnavailableError / GenerationError
    when it cannot) and returns a Handle; `on_output(Output)` is called from the engine thread as
    tokens arrive, last with a finish_reason. `generate` and `stream` are blocking conveniences.
    """

    def __init__(self, model: Gemma, config: EngineConfig = EngineConfig(), metrics: Metrics | None = None):
        limit = model.config.max_position_embeddings
        if config.max_length > limit:
            raise GenerationError(f"max_length {config.max_length} exceeds the model's max_position_embeddings {limit}")
        self.model, self.config = model, config
        self.graph = steps.Graph(model.graphdef)
        self.tokenizer = model.tokenizer
        self.metrics = metrics or Metrics("gemma")
        self.metrics.slots.set(config.max_batch)
        self.state = STARTING
        self.error: str | None = None
        self._cv = threading.Condition()
        self._queue: collections.deque[_Live] = collections.deque()
        self._slots: list[_Live | None] = [None] * config.max_batch
        self._prefilling: _Live | None = None
        self._release = np.zeros(config.max_batch, bool)   # rows the host ended; the device learns at the boundary
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self.decode_calls = 0
        self.prefill_calls = 0
        self.device = None
        self.buckets = steps.decode_buckets(config.max_batch, config.min_decode_batch)
        self._step_ms: dict[int, float] = {}    # row bucket -> ms a decode step takes (running average)
        self._fixed_ms: dict[int, float] = {}   # row bucket -> ms of a decode call that makes no token
        self._last_done = 0.0                   # when the last decode call's tokens reached the host

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, warmup: str = "decode") -> Engine:
        """Allocate the decode state, compile ahead (`warmup`, one of WARMUPS) and start the engine
        loop. The engine is then ready."""
        if warmup not in WARMUPS:
            raise GenerationError(f"warmup must be one of {', '.join(WARMUPS)}, got {warmup!r}")
        c = self.config
        self.device = steps.init_slots(self.model.config, c.max_batch, c.max_length, self.model.dtype, c.max_stop_ids)
        if warmup != "none":
            self._warmup(everything=warmup == "all")
        self._thread = threading.Thread(target=self._run, name="gemma-engine", daemon=True)
        with self._cv:
            self.state = READY
        self._thread.start()
        return self

    def _warmup(self, everything: bool) -> None:
        """Compile the decode program of every row bucket (and time its fixed cost), the release
        program, and the prefill of the smallest prompt bucket, or with `everything` every prefill
        program the engine can run: each prompt bucket up to prefill_chunk, fresh for each request
        bucket, continued (a long prompt's later pieces) for one request."""
        c, bos = self.config, self.model.config.bos_token_id
        shapes = [(1, 16, True)]
        if everything:
            lengths = [16 << i for i in range(c.prefill_chunk.bit_length() - 4)]
            requests = sorted({self._rows(k) for k in range(1, c.max_batch + 1)})
            shapes = [(k, t, True) for t in lengths for k in requests] + [(1, t, False) for t in lengths]
        for k, length, fresh in shapes:   # max_tokens 1: every row is done after it
            arm = steps.arm([1] * k, [[]] * k, [0] * k, [sampler.Sampling()] * k, [0] * k, c.max_stop_ids, k)
            self._prefill_call(list(range(k)), [[bos] * length] * k, [0] * k, [True] * k, arm, fresh=fresh)
        self.device = self.device._replace(done=steps.release(self.device.done, np.zeros(c.max_batch, bool)))
        for rows in self.buckets:   # compile, then time a call that makes nothing (every slot is done)
            times = []
            for _ in range(4):
                start = time.monotonic()
                self.device, out, _ = steps.decode(self.graph, self.model.state, self.device, np.int32(1),
                                                   buffer=self.config.decode_steps, rows=rows)
                jax.device_get(out)
                times.append(time.monotonic() - start)
            self._fixed_ms[rows] = 1e3 * min(times[1:])
        self.prefill_calls = 0

    def drain(self) -> None:
        """Refuse new requests (UnavailableError); the accepted ones run to completion."""
        with self._cv:
            if self.state == READY:
                self.state = DRAINING
            self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return not self._queue and self._prefilling is None and not any(self._slots)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is waiting or running (True), or timeout (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._prefilling is not None or any(self._slots):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=left if left is not None else 1.0)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop: requests still queued or running are aborted."""
        with self._cv:
            if self.state in (READY, DRAINING):
                self.state = STOPPED
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> tuple[bool, str]:
        """(healthy, state): the engine loop is running and made progress recently."""
        with self._cv:
            state, error = self.state, self.error
        alive = self._thread is not None and self._thread.is_alive()
        if state == FAILED:
            return False, f"failed: {error}"
        if state != READY:
            return False, state
        if not alive:
            return False, "engine loop not running"
        return True, state

    # ------------------------------------------------------------------------------ requests
    def check(self, request: Request) -> None:
        """Refuse a request that can never run here (GenerationError, HTTP 400)."""
        c, vocab = self.config, self.model.config.vocab_size
        prompt = request.prompt
        if len(prompt) == 0:
            raise GenerationError("the prompt is empty (it needs at least one token, e.g. BOS)")
        if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
            bad = next(t for t in prompt if not isinstance(t, (int, np.integer)) or isinstance(t, bool)
                       or not 0 <= t < vocab)
            raise GenerationError(f"prompt token {bad!r} is outside the vocabulary [0, {vocab})")
        m = request.max_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise GenerationError(f"max_tokens must be an integer >= 1, got {m!r}")
        if len(prompt) + m > c.max_length:
            raise GenerationError(f"the prompt ({len(prompt)} tokens) + max_tokens ({m}) = {len(prompt) + m} "
                                  f"exceeds the server's max length {c.max_length} tokens")
        stops = list(request.stop_ids)
        if len(set(stops)) > c.max_stop_ids or any(not isinstance(t, int) or not 0 <= t < vocab for t in stops):
            raise GenerationError(f"stop ids must be at most {c.max_stop_ids} token ids in [0, {vocab}), got {stops}")
        if request.logprobs is not None and (not isinstance(request.logprobs, int) or isinstance(request.logprobs, bool)
                                             or not 0 <= request.logprobs <= steps.TOP_LOGPROBS):
            raise GenerationError(f"logprobs must be an integer in [0, {steps.TOP_LOGPROBS}], got {request.logprobs!r}")
        if request.seed is not None and (not isinstance(request.seed, int) or isinstance(request.seed, bool)):
            raise GenerationError(f"seed must be an integer, got {request.seed!r}")
        if any(not isinstance(s, str) or not s for s in request.stop_strings):
            raise GenerationError("stop strings must be non-empty strings")
        if request.stop_strings and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer, and this model has none")
        if not isinstance(request.sampling, sampler.Sampling):
            raise GenerationError("sampling must be a gemma_jax.sampler.Sampling")

    def submit(self, request: Request, on_output: Callable[[Output], None]) -> Handle:
        """Queue a request; raises GenerationError (bad request), UnavailableError (starting,
        draining, failed) or QueueFullError (the queue holds max_queue requests)."""
        return self.submit_many([(request, on_output)])[0]

    def submit_many(self, requests: Sequence[tuple[Request, Callable[[Output], None]]]) -> list[Handle]:
        """Queue several (request, on_output) at once, all or none (offline batch inference): the
        engine loop sees them together, so short prompts share prefill calls as in one static
        batch. Raises as `submit` (GenerationError naming the request's index when there are
        several; QueueFullError when the queue cannot hold them all)."""
        lives = []
        for i, (request, on_output) in enumerate(requests):
            try:
                self.check(request)
            except GenerationError as e:
                self._reject("invalid")
                raise e if len(requests) == 1 else GenerationError(f"request {i}: {e}") from None
            seed = secrets.randbits(63) if request.seed is None else request.seed
            lives.append(_Live(request, Handle(self, request), on_output,
                               TextStream(self.tokenizer, request.stop_strings) if self.tokenizer is not None else None,
                               time.monotonic(), frozenset(request.stop_ids), seed))
        with self._cv:
            if self.state != READY:
                self._reject({DRAINING: "draining", STARTING: "starting"}.get(self.state, "failed"), len(lives))
                raise UnavailableError(f"the engine is {self.state}" + (f": {self.error}" if self.error else ""))
            if len(self._queue) + len(lives) > self.config.max_queue:
                self._reject("queue_full", len(lives))
                raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting"
                                     + (f", {len(lives)} submitted together" if len(lives) > 1 else "")
                                     + "); retry later")
            self._queue.extend(lives)
            self.metrics.waiting.set(len(self._queue))
            self._cv.notify_all()
        return [live.handle for live in lives]

    def _reject(self, reason: str, count: int = 1) -> None:
        with self.metrics.lock:
            self.metrics.rejected.inc(count, value=reason)

    def generate(self, request: Request, timeout: float | None = None) -> Completion:
        """Submit and wait for the whole result."""
        return Completion.collect(list(self.stream(request, timeout)))

    def generate_many(self, requests: Sequence[Request], timeout: float | None = None) -> list[Completion]:
        """Submit several requests together (`submit_many`) and wait for all their results."""
        outputs = [queue.Queue() for _ in requests]
        handles = self.submit_many([(r, q.put) for r, q in zip(requests, outputs)])
        results = []
        try:
            for q in outputs:
                got = [q.get(timeout=timeout)]
                while got[-1].finish_reason is None:
                    got.append(q.get(timeout=timeout))
                results.append(Completion.collect(got))
        finally:
            for handle in handles:
                handle.cancel()   # a no-op once finished
        return results

    def stream(self, request: Request, timeout: float | None = None) -> Iterator[Output]:
        """Submit and yield each Output as it arrives (the last has a finish_reason)."""
        outputs: queue.Queue[Output] = queue.Queue()
        handle = self.submit(request, outputs.put)
        try:
            while True:
                out = outputs.get(timeout=timeout)
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            handle.cancel()   # a no-op once finished

    def _cancel(self, handle: Handle) -> None:
        with self._cv:
            for live in self._queue:
                if live.handle is handle:
                    self._queue.remove(live)
                    self.metrics.waiting.set(len(self._queue))
                    self._finish(live, FINISH_ABORT)
                    break
            else:
                for live in (*self._slots, self._prefilling):
                    if live is not None and live.handle is handle:
                        live.cancelled = True
            self._cv.notify_all()

    # ------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        pending = None   # the decode call in flight: its tokens are handed out after the next is queued
        try:
            while True:
                with self._cv:
                    self._heartbeat = time.monotonic()
                    self._sweep()
                    if self.state == STOPPED:
                        break
                    idle = not self._queue and self._prefilling is None and not any(self._slots)
                    if idle and pending is None:
                        self._cv.wait(timeout=1.0)
                        continue
                self._prefill_some()
                if pending is None:
                    pending = self._queue_decode() if self._decoding() else None
                    continue
                call, pending = pending, None
                out, done = jax.device_get((call.out, call.done))   # the call in flight is done
                made = (out.ids >= 0).sum(axis=1)                    # tokens per row
                self._measure(call, int(made.max(initial=0)))
                for live, finished in zip(call.rows, done):
                    if live is not None and finished:
                        live.device_done = True
                with self._cv:   # a request that came meanwhile is prefilled before the next call
                    admit = bool(self._queue) and None in self._slots
                if self._decoding() and not admit:
                    pending = self._queue_decode(made)
                self._hand_out(out, call.rows, made)
        except BaseException as e:  # a bug or a device failure: fail every request, report unhealthy
            traceback.print_exc()
            with self._cv:
                self.state, self.error = FAILED, f"{type(e).__name__}: {e}"
        finally:
            with self._cv:
                message = self.error
                for live in (*self._queue, self._prefilling, *self._slots):
                    if live is not None and not live.finished:
                        self._finish(live, FINISH_ERROR if message else FINISH_ABORT, message)
                self._queue.clear()
                self._slots = [None] * self.config.max_batch
                self._prefilling = None
                self.metrics.waiting.set(0)
                self.metrics.running.set(0)
                self._cv.notify_all()

    def _sweep(self) -> None:
        """At a step boundary (lock held): end cancelled requests and free every finished slot."""
        if self._prefilling is not None and self._prefilling.cancelled:
            self._finish(self._prefilling, FINISH_ABORT)
        if self._prefilling is not None and self._prefilling.finished:
            self._slots[self._prefilling.slot] = None
            self._prefilling = None
        for slot, live in enumerate(self._slots):
            if live is None:
                continue
            if live.cancelled and not live.finished:
                self._finish(live, FINISH_ABORT)
            if live.finished:
                self._slots[slot] = None
                self._release[slot] = True
        if self._release.any():
            self.device = self.device._replace(done=steps.release(self.device.done, self._release))
            self._release[:] = False
        self.metrics.running.set(sum(live is not None for live in self._slots))
        self._cv.notify_all()

    def _prefill_some(self) -> None:
        """Prefill waiting requests into free slots: about one chunk of prompt tokens (padding
        included) while other rows decode, up to a chunk per slot while none do. Short prompts
        admitted together share one call; a prompt longer than a chunk runs alone, piece by piece."""
        c = self.config
        budget = c.prefill_chunk if self._decoding() else c.prefill_chunk * c.max_batch
        spent = 0
        while spent < budget:
            with self._cv:
                if self._prefilling is not None:
                    group = [self._prefilling]
                else:
                    group = self._admit(budget - spent)
                if not group or any(live.cancelled for live in group):
                    return   # the next sweep ends a cancelled one
            spent += self._prefill_group(group)

    def _admit(self, room: int) -> list[_Live]:
        """Take requests from the head of the queue into the lowest free slots (lock held): short
        prompts while their padded [k, T] call fits `room` tokens (at least one), or one long prompt,
        which becomes `_prefilling` until its last piece."""
        c, free = self.config, [slot for slot, live in enumerate(self._slots) if live is None]
        group, width = [], 0
        while self._queue and len(group) < len(free) and self.state != STOPPED:
            n = len(self._queue[0].request.prompt)
            if n > c.prefill_chunk and group:
                break
            width = max(width, sampler.bucket(n, 16))
            if group and self._rows(len(group) + 1) * width > room:
                break
            group.append(self._queue.popleft())
            if n > c.prefill_chunk:
                self._prefilling = group[0]
                break
        now = time.monotonic()
        for live, slot in zip(group, free):
            live.slot = live.handle.slot = slot
            live.admitted = now
            self._slots[slot] = live
            with self.metrics.lock:
                self.metrics.queue_time.observe(now - live.arrival)
        if group:
            self.metrics.waiting.set(len(self._queue))
            self.metrics.running.set(sum(x is not None for x in self._slots))
        return group

    def _rows(self, k: int) -> int:
        """The request bucket of a prefill call of k requests: a power of two, at most max_batch."""
        return min(sampler.bucket(k, 1), self.config.max_batch)

    def _prefill_group(self, group: list[_Live]) -> int:
        """Feed the next chunk of each request's prompt in one call; deliver the first token of each
        whose prompt is now in. Returns the tokens computed (padding included)."""
        c = self.config
        chunks = [list(live.request.prompt[live.prefilled:live.prefilled + c.prefill_chunk]) for live in group]
        finals = [live.prefilled + len(chunk) == len(live.request.prompt) for live, chunk in zip(group, chunks)]
        rows = self._rows(len(group))
        arm = steps.arm([live.request.max_tokens for live in group], [sorted(live.stop_ids) for live in group],
                        [live.request.logprobs or 0 for live in group], [live.request.sampling for live in group],
                        [live.seed for live in group], c.max_stop_ids, rows)
        out = self._prefill_call([live.slot for live in group], chunks, [live.prefilled for live in group], finals,
                                 arm, fresh=group[0].prefilled == 0)
        for live, chunk in zip(group, chunks):
            live.prefilled += len(chunk)
        with self.metrics.lock:
            self.metrics.prompt_tokens.inc(sum(map(len, chunks)))
            self.metrics.prefill_calls.inc()
        if any(finals):
            ids, lps, top_ids, top_lps = jax.device_get(out)
            now = time.monotonic()
            with self._cv:
                for i, (live, final) in enumerate(zip(group, finals)):
                    if final:
                        if live is self._prefilling:
                            self._prefilling = None
                        self._deliver(live, ids[i], lps[i], top_ids[i], top_lps[i], now)
        return rows * sampler.bucket(max(map(len, chunks)), 16)

    def _prefill_call(self, slot_ids: list[int], chunks: list[list[int]], starts: list[int], finals: list[bool],
                      arm: steps.Arm, fresh: bool):
        rows, pad = arm.max_tokens.shape[0], len(chunks)
        length = sampler.bucket(max(map(len, chunks)), 16)
        tokens, positions = sampler.pad_chunk(chunks + [[]] * (rows - pad), starts + [0] * (rows - pad), length,
                                              self.model.config.pad_token_id)
        ids = np.full((rows,), self.config.max_batch, np.int32)   # padding rows: out of range, written nowhere
        ids[:pad] = slot_ids
        self.device, out = steps.prefill(self.graph, self.model.state, self.device, ids, tokens, positions,
                                         np.asarray(finals + [False] * (rows - pad)), arm, fresh=fresh)
        self.prefill_calls += 1
        return out

    def _decoding(self, live: _Live | None = None) -> bool:
        """Whether `live` (default: any slot) is a row the device is still decoding."""
        if live is None:
            return any(self._decoding(x) for x in self._slots if x is not None)
        return live.first_token is not None and not live.finished and not live.device_done

    def _queue_decode(self, fetched: np.ndarray | None = None) -> _Call:
        """Queue one decode call (asynchronous: the host hands out the previous call's tokens while
        this one runs), over the smallest row bucket holding every decoding row. `fetched`: the
        tokens per row of the call just fetched and not handed out yet."""
        decoding = {slot: x for slot, x in enumerate(self._slots) if x is not None and self._decoding(x)}
        bucket = next(b for b in self.buckets if b > max(decoding))
        fetched = np.zeros(0, int) if fetched is None else fetched
        rest = max(x.request.max_tokens - x.generated - (int(fetched[slot]) if slot < len(fetched) else 0)
                   for slot, x in decoding.items())
        queued = time.monotonic()
        self.device, out, done = steps.decode(self.graph, self.model.state, self.device,
                                              np.int32(self._call_steps(bucket, rest)),
                                              buffer=self.config.decode_steps, rows=bucket)
        self.decode_calls += 1
        with self.metrics.lock:
            self.metrics.decode_calls.inc()
        return _Call(out, done, [decoding.get(slot) for slot in range(bucket)], bucket, queued, self.prefill_calls)

    def _call_steps(self, bucket: int, rest: int) -> int:
        """Steps for the next call: about `decode_call_ms` of them, and enough that the call's fixed
        cost is at most a tenth of it; all `rest` (the most tokens a row still needs) when that is
        at most a quarter more, rather than a short call after (its fixed cost and a round trip).
        One while this bucket's step time is not measured yet."""
        step = self._step_ms.get(bucket)
        if step is None:
            return 1
        n = max(self.config.decode_call_ms, 9 * self._fixed_ms.get(bucket, 0.0)) / step
        n = rest if rest <= 1.25 * n else n
        return int(min(max(n, 1), self.config.decode_steps))

    def _measure(self, call: _Call, made: int) -> None:
        """Update the bucket's step time from a finished call that made `made` steps (a call with a
        prefill behind it on the device is skipped: its wait included the prefill)."""
        now = time.monotonic()
        if made and call.prefills == self.prefill_calls:
            took = 1e3 * (now - max(call.queued, self._last_done)) - self._fixed_ms.get(call.bucket, 0.0)
            step = max(took / made, 1e-3)
            old = self._step_ms.get(call.bucket)
            self._step_ms[call.bucket] = step if old is None else (old + step) / 2
        self._last_done = now

    def _hand_out(self, out: steps.Tokens, rows: list, made: np.ndarray) -> None:
        """Deliver a finished decode call's tokens (on the host; `made` [rows] per row) to the
        requests that held its rows. A request ended by the host since (stop string, cancel) gets
        nothing more; its row went on, masked."""
        ids, lps, top_ids, top_lps = out
        now = time.monotonic()
        with self._cv:
            for slot, live in enumerate(rows):
                if live is None or live.finished:
                    continue
                n = int(made[slot])
                if n:
                    self._deliver(live, ids[slot, :n], lps[slot, :n], top_ids[slot, :n], top_lps[slot, :n], now)

    # ------------------------------------------------------------------------------ delivery
    def _deliver(self, live: _Live, ids, lps, top_ids, top_lps, now: float) -> None:
        """Hand a request its new tokens (lock held): text, logprobs, and the end when a stop id, a
        stop string or max_tokens ends it. Tokens after the end (made in the same call) are dropped."""
        request, text, reason = live.request, "", None
        kept = [int(t) for t in ids[:request.max_tokens - live.generated]]
        consumed = len(kept)
        stop = next((i for i, token in enumerate(kept) if token in live.stop_ids), None)
        if stop is not None:   # the stop id counts as generated, but is not handed out
            kept, consumed, reason = kept[:stop], stop + 1, FINISH_STOP
        if live.text is not None and live.text.stop_strings:   # token by token: cut after the one that completes it
            for i, token in enumerate(kept):
                text += live.text.add([token])
                if live.text.stopped:
                    kept, consumed, reason = kept[:i + 1], i + 1, FINISH_STOP
                    break
        elif live.text is not None:
            text = live.text.add(kept)
        live.generated += consumed
        if reason is None and live.generated >= request.max_tokens:
            reason = FINISH_LENGTH
        n = request.logprobs
        logprobs = None if n is None else [
            TokenLogprob(token, float(lps[i]), [(int(a), float(b)) for a, b in zip(top_ids[i, :n], top_lps[i, :n])])
            for i, token in enumerate(kept)]
        with self.metrics.lock:
            m = self.metrics
            m.generation_tokens.inc(consumed)
            if live.first_token is None:
                live.first_token = now
                m.ttft.observe(now - live.arrival)
                m.prefill_time.observe(now - live.admitted)
            else:
                for _ in range(consumed):
                    m.itl.observe((now - live.last_token) / consumed)
            live.last_token = now
        out = Output(text, kept, logprobs, prompt_tokens=len(request.prompt), completion_tokens=live.generated)
        if reason is not None:
            self._finish(live, reason, output=out)
        else:
            live.on_output(out)

    def _finish(self, live: _Live, reason: str, error: str | None = None, output: Output | None = None) -> None:
        """End a request (lock held): flush its text and deliver the last Output."""
        if live.finished:
            return
        live.finished = True
        out = output or Output(prompt_tokens=len(live.request.prompt), completion_tokens=live.generated,
                               logprobs=[] if live.request.logprobs is not None else None)
        if live.text is not None and reason in (FINISH_LENGTH, FINISH_STOP):
            out.text += live.text.flush()
        out.finish_reason, out.error = reason, error
        now = time.monotonic()
        with self.metrics.lock:
            self.metrics.finished.inc(value=reason)
            if reason in (FINISH_STOP, FINISH_LENGTH):
                self.metrics.e2e.observe(now - live.arrival)
                if live.first_token is not None:
                    self.metrics.decode_time.observe(now - live.first_token)
        try:
            live.on_output(out)
        except Exception:  # a consumer's bug must not stop the engine
            traceback.print_exc()
