"""The serving engine against the library's static paths, in one process on one model:

- aggregate output tokens/s for C concurrent requests through the engine, against the same C
  prompts as one static `generate_ids` batch and one after another (C = 1, 2, 4, 8 by default);
- time to first token of a new request arriving at a random moment while 7 others decode (it
  waits for the decode call in flight), against the same request alone: p50 and max.

Greedy, every request the same prompt length and exactly --gen-len new tokens (no stop ids). The
three run interleaved in each of --repeats warm rounds: each tokens/s figure is the best round, each
ratio the median over the rounds of the ratio within a round (robust to the machine's slow spells,
which can last a whole round). Run it alone on the machine.

    python scripts/bench_engine.py --repeats 15                     # the built-in default model
    python scripts/bench_engine.py --preset 2b --prompt-len 16 --gen-len 8 --repeats 3 --json docs/serving_engine_2b.json
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_jax import cpuinfo, sampler  # noqa: E402
from gemma_jax.serving.engine import Engine, EngineConfig  # noqa: E402
from gemma_jax.serving.launch import ModelSource  # noqa: E402
from gemma_jax.serving.types import Request  # noqa: E402


def rounds(fns, repeats: int) -> list[np.ndarray]:
    """The times of each function over `repeats` rounds, the functions interleaved in every round
    (so a slow spell of the machine hits all of them alike and a ratio within a round holds)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [np.asarray(t) for t in times]


def engine_batch(engine: Engine, prompts, gen_len: int) -> None:
    """Submit every prompt together (as the static batch gets them) and wait for all of them."""
    engine.generate_many([Request(p, gen_len) for p in prompts], timeout=3600)


def first_token_time(engine: Engine, prompt, gen_len: int) -> tuple[float, tuple]:
    """Seconds to the request's first token, and (its queue, that output, its handle)."""
    q = queue.Queue()
    start = time.perf_counter()
    handle = engine.submit(Request(prompt, gen_len), q.put)
    out = q.get(timeout=3600)
    return time.perf_counter() - start, (q, out, handle)


def drain(q: queue.Queue, out, handle=None) -> None:
    while out.finish_reason is None:
        out = q.get(timeout=3600)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a converted checkpoint (default: the built-in default model)")
    parser.add_argument("--preset", help="random weights of this shape instead, e.g. 2b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--decode-call-ms", type=float, default=40.0)
    parser.add_argument("--min-decode-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    model = ModelSource(args.ckpt, args.preset, None, args.dtype).load_weights()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    max_length = sampler.bucket(args.prompt_len + args.gen_len, 32)   # generate_ids' own cache length
    config = EngineConfig(args.max_batch, max_length, 64, sampler.bucket(args.prompt_len, 16), args.decode_steps,
                          decode_call_ms=args.decode_call_ms, min_decode_batch=args.min_decode_batch)
    engine = Engine(model, config).start()
    print(cpuinfo.describe(), flush=True)
    result = {"model": args.preset or args.ckpt or "default", "dtype": args.dtype, "cpu": cpuinfo.cpu_info(),
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "engine": vars(args) | {"json": None},
              "runs": []}
    for c in concurrencies:
        prompts = [rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(c)]
        tokens = c * args.gen_len
        static = lambda: model.generate_ids(prompts, args.gen_len, stop_ids=[])  # noqa: E731
        one_by_one = lambda: [model.generate_ids([p], args.gen_len, stop_ids=[]) for p in prompts]  # noqa: E731
        served = lambda: engine_batch(engine, prompts, args.gen_len)  # noqa: E731
        # warm-up: compile everything first (one after another runs generate_ids' batch-1 program)
        for fn in (static, lambda: model.generate_ids(prompts[:1], args.gen_len, stop_ids=[]), served):
            fn()
        t_static, t_seq, t_engine = rounds((static, one_by_one, served), args.repeats)
        run = {"concurrency": c, "engine_tok_s": tokens / t_engine.min(), "static_batch_tok_s": tokens / t_static.min(),
               "one_after_another_tok_s": tokens / t_seq.min(),
               # the ratios: medians over the rounds of the ratio within each round
               "engine_vs_static": float(np.median(t_static / t_engine)),
               "engine_vs_one_after_another": float(np.median(t_seq / t_engine))}
        result["runs"].append(run)
        print(f"C={c}: engine {run['engine_tok_s']:.2f} tok/s, static batch {run['static_batch_tok_s']:.2f}, "
              f"one after another {run['one_after_another_tok_s']:.2f} -> engine/static "
              f"{run['engine_vs_static']:.3f}, engine/sequential {run['engine_vs_one_after_another']:.2f}",
              flush=True)

    # TTFT of a new request: alone, then arriving at a random moment while max_batch - 1 others decode
    # (it waits for the decode call in flight, up to about --decode-call-ms)
    probe = rng.integers(3, vocab, args.prompt_len).tolist()
    alone = []
    for _ in range(max(5, args.repeats)):
        t, pending = first_token_time(engine, probe, 2)
        drain(*pending)
        alone.append(t)
    others = [rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(args.max_batch - 1)]
    loaded = []
    for _ in range(max(5, args.repeats)):
        running = [first_token_time(engine, p, max_length - args.prompt_len)[1] for p in others]   # decoding now
        time.sleep(rng.uniform(0, args.decode_call_ms / 1e3))
        t, pending = first_token_time(engine, probe, 2)
        loaded.append(t)
        for _, _, handle in running:
            handle.cancel()
        for q in (*running, pending):
            drain(*q)
    result["ttft_alone_s"] = {"p50": float(np.median(alone)), "max": max(alone)}
    result["ttft_with_others_decoding_s"] = {"p50": float(np.median(loaded)), "max": max(loaded)}
    result["others_decoding"] = args.max_batch - 1
    print(f"TTFT alone p50 {np.median(alone) * 1e3:.1f} ms; arriving while {args.max_batch - 1} others decode "
          f"p50 {np.median(loaded) * 1e3:.1f} ms, max {max(loaded) * 1e3:.1f} ms over {len(loaded)} "
          f"(decode calls of about {args.decode_call_ms:g} ms, at most {args.decode_steps} tokens)")
    engine.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
