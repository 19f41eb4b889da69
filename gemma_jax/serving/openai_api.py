"""OpenAI's formats for /v1/completions and /v1/chat/completions: a JSON body checked and turned
into an engine Request, and results, stream chunks, usage and errors rendered as OpenAI's API
renders them (the `openai` client parses them). Pure Python: no HTTP server, no JAX.

Beyond OpenAI's fields, vLLM's `top_k` and `ignore_eos` are accepted. Refused with a 400 naming
the field: n > 1, best_of > 1, echo, suffix, logit_bias, tools, non-text response formats, and
fields OpenAI does not know.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import uuid
from typing import Any

from gemma_jax.errors import GemmaError
from gemma_jax.sampler import Sampling
from gemma_jax.serving.types import Output, Request, TokenLogprob

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 5
COMPLETION_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "presence_penalty",
           "frequency_penalty", "seed", "logit_bias", "ignore_eos", "logprobs"}
COMPLETION_FIELDS = _COMMON | _IGNORED | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | _IGNORED | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                    "tool_choice", "functions", "function_call"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the formats need to know about the served model."""
    name: str
    tokenizer: Any                 # gemma_jax.tokenizer.Tokenizer
    stop_ids: tuple[int, ...]      # completions: the config's eos ids
    chat_stop_ids: tuple[int, ...]  # chat: eos and <end_of_turn>
    max_length: int                # prompt + generated tokens per request
    vocab_size: int


@dataclasses.dataclass
class Parsed:
    """A checked request: the engine Request and how to answer it."""
    chat: bool
    request: Request
    stream: bool
    include_usage: bool
    id: str
    created: int
    model: str


# ----------------------------------------------------------------------------------- checking
def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, key: str, default, lo: float, hi: float, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(f"{key} must be a finite number, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise _bad(f"{key} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", key)
    return value


def _integer(body: dict, key: str, default, lo: int, hi: int | None = None):
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        raise _bad(f"{key} must be an integer in [{lo}, {'inf' if hi is None else hi}], got {value!r}", key)
    return value


def _flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {value!r}", key)
    return value


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])


def _refuse_unsupported(body: dict) -> None:
    if _integer(body, "n", 1, 1) != 1:
        raise _bad("n must be 1: this server returns one choice per request (send n requests instead)", "n")
    if _integer(body, "best_of", 1, 1) != 1:
        raise _bad("best_of must be 1 on this server", "best_of")
    if body.get("echo"):
        raise _bad("echo is not supported on this server", "echo")
    if body.get("suffix") is not None:
        raise _bad("suffix is not supported (Gemma 2 has no fill-in-the-middle)", "suffix")
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported on this server", "logit_bias")
    for key in ("tools", "functions"):
        if body.get(key):
            raise _bad(f"{key} are not supported (Gemma 2 has no tool-calling template)", key)
    if body.get("tool_choice") not in (None, "none"):
        raise _bad("tool_choice must be 'none' (no tools on this server)", "tool_choice")
    if body.get("function_call") not in (None, "none"):
        raise _bad("function_call is not supported on this server", "function_call")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format must be {'type': 'text'} on this server", "response_format")


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP_STRINGS
            or any(not isinstance(s, str) or not s for s in stops)):
        raise _bad(f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings, "
                   f"got {stop!r}", "stop")
    return tuple(stops)


def _sampling(body: dict) -> tuple[Sampling, int | None]:
    temperature = _number(body, "temperature", 1.0, 0.0, math.inf)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise _bad(f"top_k must be an integer >= 1, or -1 or 0 for none, got {top_k!r}", "top_k")
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**64):
        raise _bad(f"seed must be an integer in [-2**63, 2**64), got {seed!r}", "seed")
    return Sampling(float(temperature), top_k if top_k and top_k > 0 else None, float(top_p) if top_p < 1 else None,
                    float(presence), float(frequency)), seed


def _check_model(body: dict, info: ModelInfo) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {model!r}", "model")
    if model not in (None, info.name):
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{info.name}')", "model",
                       "model_not_found")
    return info.name


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise _bad(f"stream_options must be an object with include_usage, got {options!r}", "stream_options")
    return stream, _flag(options, "include_usage")


def _prompt_ids(prompt, info: ModelInfo) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, str):
        return info.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise _bad(f"prompt token {bad} is outside the vocabulary [0, {info.vocab_size})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("prompt must be one string or one list of token ids (a batch of prompts is not supported: "
                   "send one request each)", "prompt")
    raise _bad(f"prompt must be a string or a non-empty list of token ids, got {prompt!r:.80}", "prompt")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise _bad(f"messages[{i}] must be an object with a role and content", "messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_completion(body: Any, info: ModelInfo) -> Parsed:
    """A /v1/completions body -> Parsed (APIError 400/404 for anything OpenAI or this server refuses)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_fields(body, COMPLETION_FIELDS)
    model = _check_model(body, info)
    _refuse_unsupported(body)
    if "prompt" not in body:
        raise _bad("prompt is required", "prompt")
    prompt = _prompt_ids(body["prompt"], info)
    sampling, seed = _sampling(body)
    max_tokens = _integer(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, 1)
    logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    stream, include_usage = _stream_flags(body)
    stop_ids = () if _flag(body, "ignore_eos") else info.stop_ids
    request = Request(prompt, max_tokens, sampling, seed, stop_ids, _stop_strings(body), logprobs)
    return Parsed(False, request, stream, include_usage, f"cmpl-{uuid.uuid4().hex}", int(time.time()), model)


def parse_chat(body: Any, info: ModelInfo) -> Parsed:
    """A /v1/chat/completions body -> Parsed; the prompt is the Gemma 2 chat template (model.chat's
    rules: roles alternate user/assistant from user; no system role)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_fields(body, CHAT_FIELDS)
    model = _check_model(body, info)
    _refuse_unsupported(body)
    messages = _messages(body)
    try:
        prompt = info.tokenizer.encode_chat(messages, add_generation_prompt=True)
    except GemmaError as e:
        raise _bad(str(e), "messages") from None
    sampling, seed = _sampling(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = max(1, info.max_length - len(prompt))   # OpenAI: up to the context length
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(f"{key} must be an integer >= 1, got {max_tokens!r}", key)
    logprobs = None
    if _flag(body, "logprobs"):
        logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    stream, include_usage = _stream_flags(body)
    stop_ids = () if _flag(body, "ignore_eos") else info.chat_stop_ids
    request = Request(prompt, max_tokens, sampling, seed, stop_ids, _stop_strings(body), logprobs)
    return Parsed(True, request, stream, include_usage, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model)


def engine_error(e: GemmaError) -> APIError:
    """An engine refusal as an HTTP error: its `status` (429, 503) or 400 for a bad request."""
    status = getattr(e, "status", 400)
    param = "max_tokens" if "max_tokens" in str(e) else None
    return APIError(status, str(e), param)


# ----------------------------------------------------------------------------------- rendering
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_bytes(tokenizer, token: int) -> bytes:
    """The UTF-8 bytes a token stands for (one byte for a byte-fallback piece)."""
    piece = tokenizer.id_to_piece(token)
    match = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()


def token_text(tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", errors="backslashreplace")


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs (the alternatives and
    the chosen token, as vLLM returns them) and text_offset (from `offset`)."""
    tokens, top, offsets = [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        alternatives = {token_text(tokenizer, t): v for t, v in lp.top}
        alternatives.setdefault(text, lp.logprob)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict:
    def entry(token, value):
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": value, "bytes": list(raw)}
    return {"content": [dict(entry(lp.id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in logprobs], "refusal": None}


def response(p: Parsed, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str, prompt_tokens: int,
             completion_tokens: int, tokenizer) -> dict:
    """The non-streamed answer."""
    if p.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None if logprobs is None else chat_logprobs(tokenizer, logprobs),
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason,
                  "logprobs": None if logprobs is None else completion_logprobs(tokenizer, logprobs)}
        obj = "text_completion"
    return {"id": p.id, "object": obj, "created": p.created, "model": p.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


class Chunker:
    """Stream chunks for one request, in OpenAI's server-sent-event format: the chat stream opens
    with the assistant role, each chunk carries new text (and the logprobs of the tokens consumed
    since the last chunk), the last one the finish_reason; with include_usage every chunk has
    "usage": null and a final chunk with no choices carries the usage."""

    def __init__(self, p: Parsed, tokenizer):
        self.p, self.tokenizer = p, tokenizer
        self.offset = 0
        self.pending: list[TokenLogprob] = []

    def _chunk(self, choice: dict | None, usage_obj: dict | None = None) -> dict:
        obj = "chat.completion.chunk" if self.p.chat else "text_completion"
        out = {"id": self.p.id, "object": obj, "created": self.p.created, "model": self.p.model,
               "choices": [] if choice is None else [choice], "system_fingerprint": None}
        if self.p.include_usage:
            out["usage"] = usage_obj
        return out

    def start(self) -> list[dict]:
        if not self.p.chat:
            return []
        return [self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})]

    def feed(self, out: Output) -> list[dict]:
        if out.logprobs:
            self.pending.extend(out.logprobs)
        if not out.text and out.finish_reason is None:
            return []
        logprobs = None
        if self.p.request.logprobs is not None:
            if self.p.chat:
                logprobs = chat_logprobs(self.tokenizer, self.pending)
            else:
                logprobs = completion_logprobs(self.tokenizer, self.pending, self.offset)
            self.pending = []
        self.offset += len(out.text)
        if self.p.chat:
            delta = {"content": out.text} if out.text or out.finish_reason is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}
        chunks = [self._chunk(choice)]
        if out.finish_reason is not None and self.p.include_usage:
            chunks.append(self._chunk(None, usage(out.prompt_tokens, out.completion_tokens)))
        return chunks
