"""Long-context prefill on the 2B shape (float32, synthetic weights from bench.py's generator):
peak resident memory and time of one T-token prompt through the generate path, against HF
transformers eager on the same weights; and the compiled temporary memory of the prefill program
against T for each attention implementation.

    python scripts/bench_longctx.py run --side jax --length 8192 [--json FILE]
    python scripts/bench_longctx.py run --side hf --length 8192 [--json FILE]
    python scripts/bench_longctx.py temp --lengths 512,1024,2048,4096,8192 [--chunks 512,1024,2048] [--json FILE]
    python scripts/bench_longctx.py attn --lengths 256,512,1024,2048,4096,8192 --blocks 256,512,1024
    python scripts/bench_longctx.py plot docs/longctx.json --out docs/longctx_memory.png

`run` measures one length per process: the model is built, the programs are compiled ahead of
time (and their compiled memory read), the high-water mark of resident memory is reset
(/proc/self/clear_refs), and then one generation of a single token from a T-token random prompt
is timed (prefill + first token). HF: one `model(ids, logits_to_keep=1)` forward with its cache.
Linux only (VmHWM). Works on older trees too (no `attention` option: the dense path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path and not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0]
            isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f" {f}" in flags]
            return f"{line.split(':', 1)[1].strip()} ({', '.join(isa)}), {os.cpu_count()} cores"
    return "unknown"


def run_jax(length: int, attention: str | None, once: bool = False) -> dict:
    import jax
    cache_dir = tempfile.mkdtemp(prefix="longctx-xla-")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from gemma_jax import bench
    spec = bench.BenchSpec(preset="2b")
    start = time.perf_counter()
    model = bench._jax_model(spec)
    if attention is not None:
        model = model.with_attention(attention)
    chosen = getattr(model, "attention", None)  # None: a tree from before attention choices (dense)
    out = {"side": "gemma_jax", "length": length, "attention": "dense (before)" if chosen is None else chosen.impl,
           "cpu": _cpu(),
           "build_s": time.perf_counter() - start}
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.state))
    # at the model's limit the prompt is one token short: prompt + the generated token fit 8,192
    n = min(length, model.config.max_position_embeddings - 1)
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, n).tolist()
    out["prompt_tokens"] = n
    # The first call compiles; the second, timed with its own memory peak, reuses the programs.
    # once: a single call (compilation included in its time and peak).
    import gc
    for key in (("once_s",) if once else ("first_call_s", "prefill_s")):
        gc.collect()
        out["rss_before_GiB"] = _status("VmRSS") / 2**30
        _reset_peak()
        start = time.perf_counter()
        model.generate_ids([prompt], 1, stop_ids=[])
        out[key] = time.perf_counter() - start
        out["peak_rss_GiB"] = _status("VmHWM") / 2**30
    from gemma_jax import cache as kv
    from gemma_jax import sampler
    cache_len = sampler.bucket(n + 1, 32)
    out["weights_GiB"] = weights / 2**30
    out["kv_cache_GiB"] = kv.cache_bytes(model.config, 1, cache_len, model.dtype)["total"] / 2**30
    out["target_GiB"] = out["weights_GiB"] + out["kv_cache_GiB"] + 1.5 * 1e9 / 2**30
    return out


def run_hf(length: int) -> dict:
    import torch

    from gemma_jax import bench
    spec = bench.BenchSpec(preset="2b")
    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    model = bench.hf_model(spec)
    out = {"side": "hf_eager", "length": length, "cpu": _cpu(), "build_s": time.perf_counter() - start,
           "threads": torch.get_num_threads()}
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, model.config.vocab_size, (1, length)))
    with torch.no_grad():
        model(ids[:, :16], logits_to_keep=1)  # warm-up
        import gc
        gc.collect()
        out["rss_before_GiB"] = _status("VmRSS") / 2**30
        _reset_peak()
        start = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=True)
        out["prefill_s"] = time.perf_counter() - start
    out["peak_rss_GiB"] = _status("VmHWM") / 2**30
    return out


def temp_memory(lengths: list[int], impls: list[str], chunks: list[int] = (), cache_len: int = 8192) -> list[dict]:
    """Compiled memory of the 2B prefill programs, from abstract weights (nothing is allocated):
    the fresh whole-prompt program (sampler.start, cache of T) for each T and implementation, and
    the chunk program (sampler.prefill_chunk: C tokens appended to a cache of `cache_len`) for each
    chunk size C, with the one-token decode program over that cache."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gemma_jax import cache as kv
    from gemma_jax import sampler
    from gemma_jax.attention import AttentionConfig
    from gemma_jax.config import gemma2_2b
    from gemma_jax.model import abstract_model
    config = gemma2_2b()
    stops = jax.ShapeDtypeStruct((4,), jnp.int32)
    greedy = sampler.Rows.build([sampler.Sampling()], sampler.row_keys(0, 1))  # one greedy row (tiny arrays)
    rows = []

    def record(program, impl, t, compiled, **extra):
        m = compiled.memory_analysis()
        rows.append({"program": program, "impl": impl, "length": t, **extra,
                     "temp_GiB": m.temp_size_in_bytes / 2**30, "argument_GiB": m.argument_size_in_bytes / 2**30})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    for impl in impls:
        graphdef, state = nnx.split(abstract_model(config, attention=AttentionConfig(impl=impl)))
        for t in lengths:
            cache = jax.eval_shape(lambda: kv.init_cache(config, 1, t, jnp.float32))
            tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
            record("whole prompt (start)", impl, t, sampler.start.lower(
                graphdef, state, cache, tokens, tokens, greedy, None, stops, jnp.int32(0), buffer=1,
                fresh=True).compile())
    if chunks:
        graphdef, state = nnx.split(abstract_model(config))
        cache = jax.eval_shape(lambda: kv.init_cache(config, 1, cache_len, jnp.float32))
        for c in chunks:
            tokens = jax.ShapeDtypeStruct((1, c), jnp.int32)
            record("chunk (prefill_chunk)", "auto", c, sampler.prefill_chunk.lower(
                graphdef, state, cache, tokens, tokens, fresh=False, logits=False).compile(), cache=cache_len)
        loop = jax.eval_shape(lambda c: sampler.Loop(c, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1)),
                                                     jnp.zeros((1,), bool), jnp.int32(1), greedy, None), cache)
        record("decode", "auto", 1, sampler.decode.lower(graphdef, state, loop, stops, jnp.int32(0),
                                                         jnp.int32(1)).compile(), cache=cache_len)
    return rows


def attention_times(lengths: list[int], blocks: list[int], repeats: int = 3, dense_up_to: int = 4096) -> list[dict]:
    """Seconds for one layer's attention on the 2B shape (N 8, K 4, H 256, batch 1, float32), a
    global and a sliding (W 4096) layer: dense against blockwise with square blocks of each size."""
    import jax
    import jax.numpy as jnp

    from gemma_jax import attention as att
    rows = []
    for t in lengths:
        r = np.random.default_rng(0)
        q = jnp.asarray(r.standard_normal((1, t, 8, 256)), jnp.float32)
        k = jnp.asarray(r.standard_normal((1, t, 4, 256)), jnp.float32)
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        variants = [("xla", att.dense, {})] if t <= dense_up_to else []
        variants += [(f"blockwise {b}", att.blockwise, dict(block_q=b, block_kv=b)) for b in blocks]
        for window in (None, 4096):
            for name, fn, kw in variants:
                f = jax.jit(lambda q, k, v, p, fn=fn, kw=kw: fn(q, k, v, p, p, scale=1 / 16, softcap=50.0,
                                                                window=window, **kw))
                f(q, k, k, pos).block_until_ready()
                best = min(_timed(lambda: f(q, k, k, pos).block_until_ready()) for _ in range(repeats))
                rows.append({"length": t, "window": window, "impl": name, "seconds": best})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plot(files: list[str], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # one line per series: a row's "file" (a name for the runs of one version), else its label
    rows = [r for f in files for r in json.loads(Path(f).read_text()) if "peak_rss_GiB" in r]
    series = lambda r: r.get("file") or r.get("label") or r["side"]  # noqa: E731
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in sorted({series(r) for r in rows}):
        pts = sorted((r["length"], r["peak_rss_GiB"]) for r in rows if series(r) == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    target = [r for r in rows if "target_GiB" in r]
    if target:
        pts = sorted((r["length"], r["target_GiB"]) for r in target)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="weights + KV cache + 1.5 GB")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xlabel="prompt length (tokens)", ylabel="peak RSS (GiB)",
           title="Gemma 2 2B float32 prefill, one prompt (CPU)")
    ax.set_xticks(sorted({r["length"] for r in rows}), labels=[str(t) for t in sorted({r["length"] for r in rows})])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--side", choices=["jax", "hf"], required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--attention", help="gemma_jax attention implementation (default: the tree's own)")
    p.add_argument("--label", help="a name for the plot legend")
    p.add_argument("--once", action="store_true", help="one call only: its time includes compilation")
    p.add_argument("--json", help="append the figures to this JSON list")
    p = sub.add_parser("temp")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--impls", default="xla,blockwise")
    p.add_argument("--chunks", default="", help="chunk sizes for the chunk program, e.g. 512,1024,2048")
    p.add_argument("--cache", type=int, default=8192, help="cache length the chunks are appended to")
    p.add_argument("--json")
    p = sub.add_parser("attn")
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--blocks", default="256,512,1024")
    p.add_argument("--json")
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "plot":
        return plot(args.files, args.out)
    if args.cmd == "attn":
        result = attention_times([int(t) for t in args.lengths.split(",")], [int(b) for b in args.blocks.split(",")])
    elif args.cmd == "temp":
        result = temp_memory([int(t) for t in args.lengths.split(",") if t], [i for i in args.impls.split(",") if i],
                             [int(c) for c in args.chunks.split(",") if c], args.cache)
    else:
        result = [run_jax(args.length, args.attention, args.once) if args.side == "jax" else run_hf(args.length)]
        if args.label:
            result[0]["label"] = args.label
    print(json.dumps(result, indent=1))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(old + result, indent=1) + "\n")


if __name__ == "__main__":
    main()
