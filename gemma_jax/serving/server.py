"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an Engine. No JAX here: the
engine is built by a loader callable, in a thread, while the server already answers 503.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /health (200 only while the engine loop runs), GET /metrics (Prometheus).
A client that disconnects cancels its request: the engine frees the slot at the next step
boundary. SIGTERM (or Ctrl-C) drains: new requests get 503, accepted ones finish, then the process
exits 0; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
import traceback
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gemma_jax.errors import GemmaError
from gemma_jax.serving import openai_api
from gemma_jax.serving.metrics import Metrics
from gemma_jax.serving.openai_api import APIError, ModelInfo
from gemma_jax.serving.types import FINISH_ABORT, FINISH_ERROR, Output


class Backend:
    """The engine behind the web layer, once loaded: None while starting, then the Engine."""

    def __init__(self, name: str, metrics: Metrics):
        self.name, self.metrics = name, metrics
        self.engine = None
        self.info: ModelInfo | None = None
        self.failure: BaseException | None = None
        self.draining = False

    def set(self, engine, info: ModelInfo) -> None:
        self.engine, self.info = engine, info

    def reject(self, reason: str) -> None:
        with self.metrics.lock:
            self.metrics.rejected.inc(value=reason)

    def ready(self):
        """The engine, or APIError 503 while starting, draining or failed."""
        if self.engine is None:
            self.reject("starting")
            raise APIError(503, "the server is starting (loading and compiling the model); retry shortly")
        if self.draining:
            self.reject("draining")
            raise APIError(503, "the server is shutting down")
        healthy, state = self.engine.health()
        if not healthy:
            self.reject("draining" if state == "draining" else "failed")
            raise APIError(503, f"the engine is not available ({state})")
        return self.engine

    def parse(self, parse: Callable, body) -> openai_api.Parsed:
        try:
            return parse(body, self.info)
        except APIError:
            self.reject("invalid")
            raise


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: HTTPRequest, backend: Backend | None = None) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if backend is not None:
            backend.reject("invalid")
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(title="gemma_jax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return _error(APIError(400, str(e)))

    @app.get("/health")
    async def health():
        if backend.engine is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        healthy, state = backend.engine.health()
        if backend.draining and healthy:
            healthy, state = False, "draining"
        return JSONResponse({"status": "ok" if healthy else state}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(backend.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        entry = {"id": backend.name, "object": "model", "created": int(time.time()), "owned_by": "gemma_jax"}
        if backend.info is not None:
            entry.update(max_model_len=backend.info.max_length, vocab_size=backend.info.vocab_size)
        return {"object": "list", "data": [entry]}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await _json_body(request)
        backend.ready()
        info = backend.info
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise APIError(400, "tokenize takes an object with either prompt (a string) or messages")
        try:
            if "prompt" in body:
                if not isinstance(body["prompt"], str):
                    raise APIError(400, "prompt must be a string", "prompt")
                ids = info.tokenizer.encode(body["prompt"], add_bos=body.get("add_special_tokens", True) is not False)
            else:
                ids = info.tokenizer.encode_chat(openai_api._messages(body),
                                                 add_generation_prompt=body.get("add_generation_prompt", True) is not False)
        except GemmaError as e:
            raise APIError(400, str(e)) from None
        return {"count": len(ids), "max_model_len": info.max_length, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await _json_body(request)
        backend.ready()
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list):
            raise APIError(400, "detokenize takes an object with tokens (a list of token ids)", "tokens")
        try:
            return {"prompt": backend.info.tokenizer.decode(tokens)}
        except GemmaError as e:
            raise APIError(400, str(e), "tokens") from None

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _json_body(request, backend)
        backend.ready()
        return await _generate(request, backend, backend.parse(openai_api.parse_completion, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _json_body(request, backend)
        backend.ready()
        return await _generate(request, backend, backend.parse(openai_api.parse_chat, body))

    return app


async def _generate(http: HTTPRequest, backend: Backend, parsed: openai_api.Parsed):
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[Output] = asyncio.Queue()
    try:
        handle = backend.engine.submit(parsed.request, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
    except GemmaError as e:
        raise openai_api.engine_error(e) from None
    tokenizer = backend.info.tokenizer
    if parsed.stream:
        return _EventStream(_stream(http, parsed, handle, outputs, tokenizer), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
    collected, watch = [], _Outputs(http, outputs)
    try:
        while True:
            out = await watch.next()
            if out is None:
                handle.cancel()
                return JSONResponse({}, status_code=499)   # nobody reads it
            collected.append(out)
            if out.finish_reason is not None:
                break
    finally:
        watch.close()
        handle.cancel()   # a no-op once finished
    last = collected[-1]
    if last.finish_reason in (FINISH_ERROR, FINISH_ABORT):
        raise APIError(500 if last.finish_reason == FINISH_ERROR else 503, last.error or "the request was aborted")
    logprobs = None if parsed.request.logprobs is None else [lp for o in collected for lp in o.logprobs or ()]
    return openai_api.response(parsed, "".join(o.text for o in collected), logprobs, last.finish_reason,
                               last.prompt_tokens, last.completion_tokens, tokenizer)


class _Outputs:
    """A request's outputs as the engine hands them over, until its client disconnects: a watch
    awaits the connection's `http.disconnect` message (as vLLM does), so a client that leaves is
    seen at once, whether anything was written to it or not (tokens without text write nothing)."""

    def __init__(self, http: HTTPRequest, outputs: asyncio.Queue):
        self.outputs = outputs
        self.left = asyncio.ensure_future(self._watch(http))

    @staticmethod
    async def _watch(http: HTTPRequest) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    async def next(self) -> Output | None:
        """The next output, or None once the client has disconnected."""
        if self.left.done():
            return None
        if not self.outputs.empty():
            return self.outputs.get_nowait()
        get = asyncio.ensure_future(self.outputs.get())
        await asyncio.wait((get, self.left), return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        return None

    def close(self) -> None:
        self.left.cancel()


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its generator however the response ends, a failed send to a
    client that left included (Starlette leaves that generator to the garbage collector), so the
    request is cancelled at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _stream(http: HTTPRequest, parsed, handle, outputs: asyncio.Queue, tokenizer):
    """Server-sent events; when the client disconnects (seen by a failed send or by the watch) the
    generator is closed and the request cancelled (finally)."""
    chunker, watch = openai_api.Chunker(parsed, tokenizer), _Outputs(http, outputs)
    try:
        for chunk in chunker.start():
            yield _sse(chunk)
        while True:
            out = await watch.next()
            if out is None:
                return
            if out.finish_reason in (FINISH_ERROR, FINISH_ABORT):
                error = APIError(500 if out.finish_reason == FINISH_ERROR else 503, out.error or "aborted")
                yield _sse(error.body())
                break
            for chunk in chunker.feed(out):
                yield _sse(chunk)
            if out.finish_reason is not None:
                break
        yield "data: [DONE]\n\n"
    finally:
        watch.close()
        handle.cancel()


# ----------------------------------------------------------------------------------- running
@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000                # 0: any free port (the line printed says which)
    name: str = "gemma"
    drain_timeout: float = 600.0    # seconds SIGTERM waits for running requests
    log_level: str = "warning"


class _Server(uvicorn.Server):
    """uvicorn with a draining exit: the first SIGTERM/SIGINT stops admission (503) and exits once
    the engine is idle; the signal is not re-raised, so the exit status is 0."""

    def __init__(self, config: uvicorn.Config, backend: Backend, drain_timeout: float):
        super().__init__(config)
        self.backend, self.drain_timeout = backend, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.backend.draining or self.backend.engine is None:
            self.should_exit = True
            self.force_exit = self.backend.draining
            return
        self.backend.draining = True
        threading.Thread(target=self._drain, name="gemma-drain", daemon=True).start()

    def _drain(self) -> None:
        engine = self.backend.engine
        engine.drain()
        engine.wait_idle(self.drain_timeout)
        self.should_exit = True


def _url(server: uvicorn.Server, options: ServeOptions) -> str:
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else options.port
    return f"http://{options.host}:{port}"


def serve(load: Callable[[], tuple[Any, ModelInfo]], options: ServeOptions = ServeOptions(),
          metrics: Metrics | None = None, out=sys.stdout) -> None:
    """Serve until SIGTERM. `load()` builds (engine, info) in a background thread while the server
    answers 503; once both listen and the engine is ready, one line `serving NAME on http://HOST:PORT`
    goes to `out`. A GemmaError from load() stops the server and is raised here."""
    backend = Backend(options.name, metrics or Metrics(options.name))
    config = uvicorn.Config(create_app(backend), host=options.host, port=options.port, log_level=options.log_level,
                            lifespan="off", timeout_graceful_shutdown=5)
    server = _Server(config, backend, options.drain_timeout)

    def loader():
        try:
            engine, info = load()
        except BaseException as e:  # reported by serve() once the server has stopped
            backend.failure = e
            server.should_exit = True
            return
        backend.set(engine, info)
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            print(f"serving {options.name} on {_url(server, options)}", file=out, flush=True)

    def announce():   # as soon as the socket listens, while the model may still be loading
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started and backend.engine is None:
            print(f"gemma-jax: listening on {_url(server, options)}; loading the model (requests get 503 until "
                  "ready)", file=sys.stderr, flush=True)

    threading.Thread(target=announce, name="gemma-announce", daemon=True).start()
    thread = threading.Thread(target=loader, name="gemma-load", daemon=True)
    thread.start()
    try:
        server.run()
    finally:
        if backend.engine is not None:
            backend.engine.stop()
    if backend.failure is not None:
        if isinstance(backend.failure, GemmaError):
            raise backend.failure
        traceback.print_exception(backend.failure)
        raise RuntimeError(f"loading the model failed: {backend.failure}")
