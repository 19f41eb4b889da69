"""Benchmark harness: compile time, time to first token, prefill and decode speed, peak memory,
and the fraction of the memory-bandwidth roofline, optionally against HF transformers (eager, same
dtype, same threads) on identical weights. Each side runs in its own process.

Weights: a checkpoint, or deterministic synthetic weights generated per HF tensor name from the
seed, so both processes build bit-identical models without touching the disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from gemma_jax.config import PRESETS, GemmaConfig, SLIDING

TINY_PRESET = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=16, max_position_embeddings=512)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    preset: str = "2b"              # "2b" | "9b" | "27b" | "tiny" (ignored with ckpt)
    ckpt: str | None = None         # a converted checkpoint (HF side: hf_dir)
    hf_dir: str | None = None
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1,)
    prompt_lens: tuple[int, ...] = (64,)
    sliding_window: int | None = None  # override the preset's window (decode vs context experiments)
    gen_len: int = 32
    seed: int = 0
    repeats: int = 3                # decode and TTFT: the best of this many runs (as the probe's best-of-5)


def spec_config(spec: BenchSpec) -> GemmaConfig:
    config = _base_config(spec)
    return config if spec.sliding_window is None else dataclasses.replace(config, sliding_window=spec.sliding_window)


def _base_config(spec: BenchSpec) -> GemmaConfig:
    if spec.ckpt:
        from gemma_jax.checkpoint import read_meta
        return read_meta(Path(spec.ckpt))[0]
    if spec.preset == "tiny":
        import dataclasses as dc
        base = PRESETS["2b"]()
        layer_types = tuple(SLIDING if i % 2 == 0 else "full_attention" for i in range(TINY_PRESET["num_hidden_layers"]))
        return dc.replace(base, layer_types=layer_types, **TINY_PRESET)
    return PRESETS[spec.preset]()


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic float32 tensor for one HF tensor name (norm weights small, matrices ~N(0, 0.02))."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    scale = 0.1 if name.endswith("norm.weight") else 0.02
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------- JAX side
def bandwidth_probe(dtype: str = "float32", elements: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s streamed by jitted matrix-vector products over a 1 GiB (float32) matrix: the best of
    `repeats` runs of each of three shapes (square, wide, tall), so that no single XLA kernel
    choice sets the roofline."""
    import jax
    import jax.numpy as jnp
    best = 0.0
    for rows in (1 << 14, 1 << 12, 1 << 16):
        w = jax.random.normal(jax.random.key(0), (rows, elements // rows), jnp.dtype(dtype))
        x = jnp.ones((1, rows), w.dtype)
        f = jax.jit(lambda x, w: x @ w)
        f(x, w).block_until_ready()
        seconds = min(_timed(lambda: f(x, w).block_until_ready()) for _ in range(repeats))
        best = max(best, w.size * w.dtype.itemsize / seconds)
        w = None  # free this matrix before the next one is made
    return best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _jax_model(spec: BenchSpec):
    import jax
    from flax import nnx

    from gemma_jax import api, checkpoint
    from gemma_jax.convert import NP_DTYPES, build_param, hf_shapes, name_table
    from gemma_jax.model import abstract_model
    if spec.ckpt:
        return api.load(spec.ckpt, dtype=spec.dtype)
    config = spec_config(spec)
    dtype = api.DTYPES[spec.dtype]
    np_dtype = NP_DTYPES[spec.dtype]
    abstract = abstract_model(config, param_dtype=dtype, dtype=dtype)
    shapes = hf_shapes(config)
    params = {}
    for ours, (theirs, how) in name_table(config).items():
        arrays = [synthetic_tensor(t, shapes[t], spec.seed) for t in theirs]
        params[ours] = jax.device_put(build_param(how, arrays, np_dtype))
        del arrays
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, checkpoint.unflatten(params))
    return api.Gemma(nnx.merge(graphdef, state))


def bytes_per_decode_step(model, batch: int, cache_len: int) -> dict[str, int]:
    """Bytes a decode step must read: every weight once (the tied embedding once, for the logits;
    the lookup of B columns is negligible) plus every layer's whole cache buffer (keys and values),
    which the step attends over."""
    import jax
    from gemma_jax import cache as kv
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.state))
    cache = kv.cache_bytes(model.config, batch, cache_len, model.dtype)["total"]
    return {"weights": int(weights), "cache": int(cache), "total": int(weights + cache)}


def jax_worker(spec: BenchSpec) -> dict:
    import jax
    import jax.numpy as jnp

    from gemma_jax import cache as kv
    from gemma_jax import sampler
    out = {"side": "gemma_jax", "device": str(jax.devices()[0].platform), "dtype": spec.dtype}
    start = time.perf_counter()
    model = _jax_model(spec)
    out["load_s"] = time.perf_counter() - start
    out["bandwidth_GBps"] = bandwidth_probe(spec.dtype) / 1e9
    rng = np.random.default_rng(spec.seed)
    out["runs"] = []
    for batch, prompt_len in ((b, p) for b in spec.batch_sizes for p in spec.prompt_lens):
        prompts = rng.integers(3, model.config.vocab_size, (batch, prompt_len)).astype(np.int32)
        length = sampler.bucket(prompt_len, 16)
        cache_len = sampler.bucket(prompt_len + spec.gen_len, 32)
        tokens, positions = sampler.pad_chunk(prompts.tolist(), [0] * batch, length, 0)
        tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
        stops, pad = jnp.asarray([-1], jnp.int32), jnp.int32(0)
        greedy = sampler.Rows.build([sampler.Sampling()] * batch, sampler.row_keys(0, batch))
        buffer = sampler.bucket(spec.gen_len, 1)

        def prefill():
            cache = kv.init_cache(model.config, batch, cache_len, model.dtype)
            loop = sampler.start(model.graphdef, model.state, cache, tokens, positions, greedy, None, stops,
                                 pad, buffer=buffer, fresh=True)
            return jax.block_until_ready(loop)

        def generate(loop):
            return jax.block_until_ready(sampler.decode(model.graphdef, model.state, loop, stops, pad,
                                                        jnp.int32(spec.gen_len)))
        cold = time.perf_counter()
        loop = prefill()
        prefill_cold = time.perf_counter() - cold
        cold = time.perf_counter()
        loop = generate(loop)
        decode_cold = time.perf_counter() - cold
        ttft = min(_timed(prefill) for _ in range(max(2, spec.repeats)))
        decode_s = float("inf")
        for _ in range(spec.repeats):
            held = {"loop": prefill()}
            decode_s = min(decode_s, _timed(lambda: held.update(loop=generate(held["loop"]))))
        loop = held["loop"]
        steps = spec.gen_len - 1
        moved = bytes_per_decode_step(model, batch, cache_len)
        per_seq = steps / decode_s
        roofline = out["bandwidth_GBps"] * 1e9 / moved["total"]
        out["runs"].append({
            "batch": batch, "prompt_len": prompt_len, "gen_len": spec.gen_len,
            "compile_s": (prefill_cold - ttft) + (decode_cold - decode_s * spec.gen_len / max(steps, 1)),
            "ttft_s": ttft, "prefill_tok_s": batch * prompt_len / ttft,
            "decode_tok_s_per_seq": per_seq, "decode_tok_s_total": per_seq * batch,
            "bytes_per_step": moved, "roofline_tok_s": roofline, "roofline_fraction": per_seq / roofline,
            "tokens": np.asarray(loop.tokens[:, :spec.gen_len]).tolist() if batch == 1 else None})
    out["peak_rss_GiB"] = peak_rss_bytes() / 2**30
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats:
        out["peak_device_GiB"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return out


# -------------------------------------------------------------------------------- HF side
def hf_worker(spec: BenchSpec) -> dict:
    import torch
    import transformers
    from transformers.initialization import no_init_weights
    torch.set_num_threads(os.cpu_count())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    out = {"side": "hf_transformers", "version": transformers.__version__, "dtype": spec.dtype,
           "threads": torch.get_num_threads()}
    start = time.perf_counter()
    if spec.hf_dir:
        model = transformers.Gemma2ForCausalLM.from_pretrained(spec.hf_dir, dtype=dtype, attn_implementation="eager")
    else:
        config = spec_config(spec)
        fields = {k: v for k, v in config.to_hf().items() if k not in ("model_type", "architectures")}
        hf_config = transformers.Gemma2Config(**fields, attn_implementation="eager")
        with no_init_weights():
            model = transformers.Gemma2ForCausalLM(hf_config).to(dtype)
        from gemma_jax.convert import hf_shapes
        shapes = hf_shapes(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in shapes:
                    param.copy_(torch.from_numpy(synthetic_tensor(name, shapes[name], spec.seed)))
            model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in every Gemma 2
    model.eval()
    out["load_s"] = time.perf_counter() - start
    rng = np.random.default_rng(spec.seed)
    out["runs"] = []
    for batch, prompt_len in ((b, p) for b in spec.batch_sizes for p in spec.prompt_lens):
        prompts = torch.as_tensor(rng.integers(3, model.config.vocab_size, (batch, prompt_len)))
        kwargs = dict(max_new_tokens=spec.gen_len, min_new_tokens=spec.gen_len, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
        first = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
        with torch.no_grad():
            model.generate(prompts, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            ttft = min(_timed(lambda: model.generate(prompts, **first)) for _ in range(max(2, spec.repeats)))
            result = {}
            total = min(_timed(lambda: result.update(ids=model.generate(prompts, **kwargs)))
                        for _ in range(spec.repeats))
        per_seq = (spec.gen_len - 1) / max(total - ttft, 1e-9)
        out["runs"].append({"batch": batch, "prompt_len": prompt_len, "ttft_s": ttft,
                            "prefill_tok_s": batch * prompt_len / ttft,
                            "decode_tok_s_per_seq": per_seq, "decode_tok_s_total": per_seq * batch,
                            "tokens": result["ids"][:, prompt_len:].tolist() if batch == 1 else None})
    out["peak_rss_GiB"] = peak_rss_bytes() / 2**30
    return out


# ---------------------------------------------------------------------------- orchestration
def _in_subprocess(side: str, spec: BenchSpec) -> dict:
    cmd = [sys.executable, "-m", "gemma_jax.bench", side, json.dumps(dataclasses.asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} benchmark failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(spec: BenchSpec, vs_hf: bool = False, progress: bool = False) -> dict:
    """All figures as a dict: {'spec', 'gemma_jax', 'hf'?, 'ratios'?}. Each side runs in its own
    process, one after the other (so they never share memory or cores)."""
    def stage(text):
        if progress:
            print(f"bench: {text}", file=sys.stderr, flush=True)
    stage("gemma_jax: building the model, probing bandwidth, prefill and decode ...")
    result = {"spec": dataclasses.asdict(spec), "gemma_jax": _in_subprocess("jax", spec)}
    if vs_hf:
        stage("HF transformers on identical weights ...")
        result["hf"] = _in_subprocess("hf", spec)
        result["ratios"] = []
        for ours, theirs in zip(result["gemma_jax"]["runs"], result["hf"]["runs"]):
            result["ratios"].append({
                "batch": ours["batch"], "prompt_len": ours["prompt_len"],
                "decode_speedup": ours["decode_tok_s_per_seq"] / theirs["decode_tok_s_per_seq"],
                "prefill_speedup": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
                "same_greedy_tokens": None if ours["tokens"] is None else ours["tokens"] == theirs["tokens"]})
    return result


def format_report(result: dict) -> str:
    ours = result["gemma_jax"]
    lines = [f"gemma_jax on {ours['device']} ({ours['dtype']}): load {ours['load_s']:.1f}s, "
             f"measured bandwidth {ours['bandwidth_GBps']:.1f} GB/s, peak RSS {ours['peak_rss_GiB']:.2f} GiB"]
    for r in ours["runs"]:
        lines.append(f"  batch {r['batch']}, prompt {r['prompt_len']}: compile {r['compile_s']:.1f}s, TTFT {r['ttft_s']:.2f}s, "
                     f"prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s_per_seq']:.2f} tok/s/seq "
                     f"({r['decode_tok_s_total']:.2f} total), {r['bytes_per_step']['total'] / 1e9:.2f} GB/step, "
                     f"roofline {r['roofline_tok_s']:.2f} tok/s -> {100 * r['roofline_fraction']:.0f}%")
    if "hf" in result:
        hf = result["hf"]
        lines.append(f"HF transformers {hf['version']} eager ({hf['dtype']}, {hf['threads']} threads): "
                     f"load {hf['load_s']:.1f}s, peak RSS {hf['peak_rss_GiB']:.2f} GiB")
        for r, ratio in zip(hf["runs"], result["ratios"]):
            lines.append(f"  batch {r['batch']}, prompt {r['prompt_len']}: TTFT {r['ttft_s']:.2f}s, prefill {r['prefill_tok_s']:.1f} tok/s, "
                         f"decode {r['decode_tok_s_per_seq']:.2f} tok/s/seq -> gemma_jax is "
                         f"{ratio['decode_speedup']:.2f}x decode, {ratio['prefill_speedup']:.2f}x prefill"
                         + ("" if ratio["same_greedy_tokens"] is None
                            else f", same greedy tokens: {ratio['same_greedy_tokens']}"))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Decode tokens/s (aggregate) against batch size, both sides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("gemma_jax", "gemma_jax"), ("hf", "HF transformers (eager)")):
        if key in result:
            runs = result[key]["runs"]
            ax.plot([r["batch"] for r in runs], [r["decode_tok_s_total"] for r in runs], "o-", label=label)
    spec = result["spec"]
    ax.set(xscale="log", xlabel="batch size", ylabel="decode tokens/s (all sequences)",
           title=f"Gemma 2 {spec['preset']} {spec['dtype']} decode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    side, payload = sys.argv[1], json.loads(sys.argv[2])
    payload["batch_sizes"], payload["prompt_lens"] = tuple(payload["batch_sizes"]), tuple(payload["prompt_lens"])
    spec = BenchSpec(**payload)
    figures = jax_worker(spec) if side == "jax" else hf_worker(spec)
    print(json.dumps(figures))
