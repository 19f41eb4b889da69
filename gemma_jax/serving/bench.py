"""`gemma-jax bench-serve`: a load test of a running OpenAI-compatible server.

Requests arrive as a Poisson process (`rate` per second; inf: all at once), at most `concurrency`
in flight, with prompt and output lengths drawn uniformly from ranges (random token ids; output
lengths exact, as `ignore_eos` is set) and sampling settings drawn from a mix (greedy, temperature
with top-p, temperature with top-k, penalties). Every request streams, so time to first token and
inter-token latency are measured as a client sees them. Pure Python (httpx): no JAX.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time

import numpy as np

from gemma_jax.errors import GenerationError

SAMPLING_MIX = (
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.95},
    {"temperature": 1.0, "top_k": 40},
    {"temperature": 0.7, "presence_penalty": 0.5, "frequency_penalty": 0.3},
)


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    url: str = "http://127.0.0.1:8000"
    requests: int = 32
    rate: float = math.inf               # requests per second (Poisson); inf: all at once
    concurrency: int = 8                 # requests in flight at most
    prompt_len: tuple[int, int] = (16, 128)
    max_tokens: tuple[int, int] = (16, 64)
    seed: int = 0
    timeout: float = 600.0               # seconds per request


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


async def _one(client, spec: LoadSpec, model: str, prompt: list[int], max_tokens: int, sampling: dict, seed: int):
    """Stream one completion; returns a record of what the client saw."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "logprobs": 0, "seed": seed, "stream_options": {"include_usage": True}, **sampling}
    record = {"prompt_tokens": len(prompt), "max_tokens": max_tokens, "error": None}
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    try:
        async with client.stream("POST", f"{spec.url}/v1/completions", json=body, timeout=spec.timeout) as r:
            if r.status_code != 200:
                await r.aread()
                record["error"] = str(r.status_code)
                return record
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record["error"] = "stream_error"
                    return record
                if chunk.get("usage"):
                    record["completion_tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    n = len((choice.get("logprobs") or {}).get("tokens") or ())
                    if not n:
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        n -= 1
                    elif n:
                        gaps.extend([(now - last) / n] * n)
                    tokens += len(choice["logprobs"]["tokens"])
                    last = now
    except Exception as e:  # httpx.TimeoutException, connection errors
        record["error"] = "timeout" if "Timeout" in type(e).__name__ else "connection"
        return record
    end = time.perf_counter()
    record.update(ttft_s=None if first is None else first - start, itl_s=gaps, e2e_s=end - start,
                  tokens=tokens, tpot_s=None if tokens < 2 else (last - first) / (tokens - 1))
    return record


async def _load(spec: LoadSpec) -> dict:
    import httpx
    rng = np.random.default_rng(spec.seed)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=spec.concurrency + 4)) as client:
        models = (await client.get(f"{spec.url}/v1/models", timeout=30)).json()["data"][0]
        vocab, limit = models.get("vocab_size", 256000), models.get("max_model_len", 1 << 30)
        plan = []
        for i in range(spec.requests):
            n = int(rng.integers(spec.prompt_len[0], spec.prompt_len[1] + 1))
            m = int(rng.integers(spec.max_tokens[0], spec.max_tokens[1] + 1))
            m = max(1, min(m, limit - n))
            plan.append((rng.integers(3, vocab, n).tolist(), m, SAMPLING_MIX[i % len(SAMPLING_MIX)], spec.seed + i))
        gaps = rng.exponential(1 / spec.rate, spec.requests) if math.isfinite(spec.rate) else np.zeros(spec.requests)
        gate = asyncio.Semaphore(spec.concurrency)

        async def run(i, delay):
            await asyncio.sleep(delay)
            async with gate:
                return await _one(client, spec, models["id"], *plan[i])

        start = time.perf_counter()
        records = await asyncio.gather(*(run(i, d) for i, d in enumerate(np.cumsum(gaps))))
        duration = time.perf_counter() - start
    return summarize(spec, records, duration)


def summarize(spec: LoadSpec, records: list[dict], duration: float) -> dict:
    done = [r for r in records if r["error"] is None]
    failures: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            failures[r["error"]] = failures.get(r["error"], 0) + 1
    output_tokens = sum(r.get("completion_tokens", r["tokens"]) for r in done)
    return {"spec": dataclasses.asdict(spec), "duration_s": duration, "completed": len(done), "failures": failures,
            "request_throughput_rps": len(done) / duration, "output_tokens_per_s": output_tokens / duration,
            "output_tokens": output_tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in done),
            "ttft_s": _quantiles([r["ttft_s"] for r in done if r["ttft_s"] is not None]),
            "itl_s": _quantiles([g for r in done for g in r["itl_s"]]),
            "tpot_s": _quantiles([r["tpot_s"] for r in done if r["tpot_s"] is not None]),
            "e2e_s": _quantiles([r["e2e_s"] for r in done])}


def run(spec: LoadSpec) -> dict:
    """One load test: the figures as a dict."""
    import httpx
    try:
        return asyncio.run(_load(spec))
    except httpx.TransportError as e:
        raise GenerationError(f"{spec.url}: cannot reach the server ({type(e).__name__}: {e})") from None


def sweep(spec: LoadSpec, concurrencies: list[int]) -> list[dict]:
    """The same load at each concurrency, one after another."""
    return [run(dataclasses.replace(spec, concurrency=c)) for c in concurrencies]


def format_report(result: dict) -> str:
    s = result["spec"]
    q = lambda k: "-" if not result[k] else f"{result[k]['p50'] * 1e3:.0f}/{result[k]['p99'] * 1e3:.0f} ms"  # noqa: E731
    fails = ", ".join(f"{k}: {v}" for k, v in sorted(result["failures"].items())) or "none"
    return (f"concurrency {s['concurrency']}, rate {s['rate']}/s, {s['requests']} requests: "
            f"{result['completed']} completed in {result['duration_s']:.1f}s, "
            f"{result['request_throughput_rps']:.2f} req/s, {result['output_tokens_per_s']:.1f} output tok/s; "
            f"TTFT p50/p99 {q('ttft_s')}, ITL p50/p99 {q('itl_s')}, e2e p50/p99 {q('e2e_s')}; failures: {fails}")


def plot(results: list[dict], path: str, title: str = "") -> None:
    """Output tokens/s and p99 latencies against concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = [r["spec"]["concurrency"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(c, [r["output_tokens_per_s"] for r in results], "o-")
    a.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="throughput")
    for key, label in (("ttft_s", "TTFT p99"), ("itl_s", "ITL p99"), ("e2e_s", "end-to-end p99")):
        b.plot(c, [r[key]["p99"] if r[key] else float("nan") for r in results], "o-", label=label)
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="seconds", title="p99 latency")
    b.legend()
    for ax in (a, b):
        ax.set_xticks(c, [str(x) for x in c])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
