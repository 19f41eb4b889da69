"""Long-context prefill on the 2B shape (float32, synthetic weights from bench.py's generator):
peak resident memory and time of one T-token prompt through the generate path, against HF
transformers eager on the same weights; and the compiled temporary memory of the prefill program
against T for each attention implementation.

    python scripts/bench_longctx.py run --side jax --length 8192 [--json FILE]
    python scripts/bench_longctx.py run --side hf --length 8192 [--json FILE]
    python scripts/bench_longctx.py temp --lengths 512,1024,2048,4096,8192 [--json FILE]
    python scripts/bench_longctx.py plot FILE... --out docs/longctx_memory.png

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


def run_jax(length: int, attention: str | None) -> dict:
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
    out = {"side": "gemma_jax", "length": length, "attention": attention or "dense (before)", "cpu": _cpu(),
           "build_s": time.perf_counter() - start}
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.state))
    # at the model's limit the prompt is one token short: prompt + the generated token fit 8,192
    n = min(length, model.config.max_position_embeddings - 1)
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, n).tolist()
    out["prompt_tokens"] = n
    # First call compiles (into the persistent cache of this process); the timed call reuses it.
    # Compile with a prompt of the same length bucket: the same programs.
    start = time.perf_counter()
    model.generate_ids([prompt], 1, stop_ids=[])
    out["first_call_s"] = time.perf_counter() - start
    import gc
    gc.collect()
    out["rss_before_GiB"] = _status("VmRSS") / 2**30
    _reset_peak()
    start = time.perf_counter()
    model.generate_ids([prompt], 1, stop_ids=[])
    out["prefill_s"] = time.perf_counter() - start
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


def temp_memory(lengths: list[int], impls: list[str]) -> list[dict]:
    """Compiled temporary bytes of the fresh prefill program (sampler.start) for each T, from
    abstract weights (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gemma_jax import cache as kv
    from gemma_jax import sampler
    from gemma_jax.attention import AttentionConfig
    from gemma_jax.config import gemma2_2b
    from gemma_jax.model import abstract_model
    config = gemma2_2b()
    rows = []
    for impl in impls:
        for t in lengths:
            model = abstract_model(config, attention=AttentionConfig(impl=impl))
            graphdef, state = nnx.split(model)
            cache = jax.eval_shape(lambda: kv.init_cache(config, 1, t, jnp.float32))
            tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
            stops = jax.ShapeDtypeStruct((4,), jnp.int32)
            compiled = sampler.start.lower(graphdef, state, cache, tokens, tokens, jax.random.key(0), stops,
                                           jnp.int32(0), sampling=sampler.Sampling(), buffer=1,
                                           fresh=True).compile()
            m = compiled.memory_analysis()
            rows.append({"impl": impl, "length": t, "temp_GiB": m.temp_size_in_bytes / 2**30,
                         "argument_GiB": m.argument_size_in_bytes / 2**30})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def plot(files: list[str], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for f in files for r in json.loads(Path(f).read_text())]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in sorted({r.get("label", r["side"]) for r in rows}):
        pts = sorted((r["length"], r["peak_rss_GiB"]) for r in rows if r.get("label", r["side"]) == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    target = [r for r in rows if "target_GiB" in r]
    if target:
        pts = sorted((r["length"], r["target_GiB"]) for r in target)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="weights + KV cache + 1.5 GB")
    ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel="peak RSS (GiB)",
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
    p.add_argument("--json", help="append the figures to this JSON list")
    p = sub.add_parser("temp")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--impls", default="xla,blockwise")
    p.add_argument("--json")
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "plot":
        return plot(args.files, args.out)
    if args.cmd == "temp":
        result = temp_memory([int(t) for t in args.lengths.split(",")], args.impls.split(","))
    else:
        result = [run_jax(args.length, args.attention) if args.side == "jax" else run_hf(args.length)]
        if args.label:
            result[0]["label"] = args.label
    print(json.dumps(result, indent=1))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(old + result, indent=1) + "\n")


if __name__ == "__main__":
    main()
