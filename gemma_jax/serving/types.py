"""What goes into the engine and what comes out, shared by the engine and the web layer."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from gemma_jax.sampler import Sampling

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"
_ids = itertools.count()


@dataclasses.dataclass
class Request:
    """One generation: a prompt of token ids and how to continue it.

    stop_ids end the request on the device (the stop token is counted but not returned as text);
    stop_strings end it on the host, at the first occurrence in the text (cut from it).
    logprobs: None for none, n >= 0 for the chosen token's log-probability and n alternatives.
    seed: the request's own random stream (None: a fresh random seed); a seeded request samples
    the same tokens alone or under load, in any slot.
    """
    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    logprobs: int | None = None
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")


@dataclasses.dataclass
class TokenLogprob:
    id: int
    logprob: float                        # under the model's unmodified distribution
    top: list[tuple[int, float]]          # the most likely alternatives, best first


@dataclasses.dataclass
class Output:
    """One delivery to a request's consumer: what is new since the last one."""
    text: str = ""                        # complete characters only; stop-string prefixes held back
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None      # stop | length | abort | error, on the last delivery
    prompt_tokens: int = 0
    completion_tokens: int = 0            # generated so far (a stop token included)
    error: str | None = None


@dataclasses.dataclass
class Completion:
    """A whole request's result (Engine.generate)."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @classmethod
    def collect(cls, outputs: Sequence[Output]) -> Completion:
        last = outputs[-1]
        logprobs = None if outputs[0].logprobs is None else [lp for o in outputs for lp in o.logprobs or ()]
        return cls("".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids], logprobs,
                   last.finish_reason, last.prompt_tokens, last.completion_tokens, last.error)
