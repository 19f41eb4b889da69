"""The serving commands: `serve` (docs/serving.md) and `bench-serve`, its load test."""

from __future__ import annotations

from gemma_jax.cli import _path
from gemma_jax.errors import GenerationError


def add_parsers(sub) -> None:
    """`serve` and `bench-serve`."""
    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching (see docs/serving.md)")
    p.add_argument("--ckpt", type=_path, metavar="DIR",
                   help="a directory made by 'gemma-jax convert' (default: the built-in tiny model)")
    p.add_argument("--preset", choices=["2b", "9b", "27b", "tiny"], help="serve random weights of this shape "
                   "(benchmarks; needs --tokenizer)")
    p.add_argument("--tokenizer", type=_path, metavar="FILE", help="a tokenizer.model (default: the checkpoint's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: as stored)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the 'serving' line says which)")
    p.add_argument("--model-name", help="the model id clients send and see (default: from --ckpt/--preset)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
    p.add_argument("--max-length", type=int, default=1024, help="prompt + generated tokens per request")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill call")
    p.add_argument("--decode-steps", type=int, default=64, help="most tokens per decode call (host round trip)")
    p.add_argument("--decode-call-ms", type=float, default=40.0, help="target length of a decode call: each makes "
                   "as many steps as fit, from the measured step time (how often tokens stream)")
    p.add_argument("--min-decode-batch", type=int, default=1, metavar="N",
                   help="decode over at least N slots: a call over fewer copies their state out and back "
                        "(large with big caches: set it to --max-batch for a 2B model at 1024+ positions)")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="seconds SIGTERM waits for running requests")
    p.add_argument("--warmup", choices=["all", "decode", "none"], default="all",   # engine.WARMUPS
                   help="what to compile before serving: every program (steady latency from the first request), "
                        "the decode programs only, or nothing (default: all)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info shows each request)")

    p = sub.add_parser("bench-serve", help="load-test a running server: throughput and latency (JSON, plot)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, default=float("inf"), help="requests per second, Poisson (default: all at once)")
    p.add_argument("--concurrency", default="8", help="requests in flight; comma-separated for a sweep, e.g. 1,2,4,8")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    p.add_argument("--prompt-len", default="16:128", help="prompt tokens, uniform in LO:HI (default 16:128)")
    p.add_argument("--max-tokens", default="16:64", help="output tokens, uniform in LO:HI (default 16:64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", type=_path, help="write the figures to this JSON file")
    p.add_argument("--plot", type=_path, help="draw throughput and p99 latency against concurrency to this PNG")


def serve(args) -> None:
    from gemma_jax.serving import launch
    from gemma_jax.serving.engine import EngineConfig
    from gemma_jax.serving.server import ServeOptions
    source = launch.ModelSource(args.ckpt and str(args.ckpt), args.preset, args.tokenizer and str(args.tokenizer),
                                args.dtype)
    config = EngineConfig(args.max_batch, args.max_length, args.max_queue, args.prefill_chunk, args.decode_steps,
                          decode_call_ms=args.decode_call_ms, min_decode_batch=args.min_decode_batch)
    if not 0 <= args.port < 65536:
        raise GenerationError(f"--port must be in [0, 65535], got {args.port}")
    options = ServeOptions(args.host, args.port, args.model_name or source.describe(), args.drain_timeout,
                           args.log_level)
    launch.run(source, config, options, warmup=args.warmup)


def _range(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text),) * 2
    except ValueError:
        raise GenerationError(f"{flag} takes LO:HI or N (integers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise GenerationError(f"{flag} needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def bench_serve(args) -> None:
    from gemma_jax.serving import bench as load
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise GenerationError("--concurrency takes comma-separated integers, e.g. 1,2,4,8") from None
    if min(concurrencies) < 1 or args.requests < 1 or not args.rate > 0:
        raise GenerationError("--concurrency and --requests must be >= 1 and --rate > 0")
    spec = load.LoadSpec(args.url.rstrip("/"), args.requests, args.rate, concurrencies[0],
                         _range(args.prompt_len, "--prompt-len"), _range(args.max_tokens, "--max-tokens"), args.seed,
                         args.timeout)
    results = load.sweep(spec, concurrencies)
    for result in results:
        print(load.format_report(result))
    if args.json:
        import json
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        load.plot(results, str(args.plot), title=args.url)
