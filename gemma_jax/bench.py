"""Benchmark harness: compile time, time to first token, prefill and decode speed, peak memory,
and the fraction of the memory-bandwidth roofline, optionally against HF transformers (eager, same
dtype, same threads) on identical weights. Each side runs in its own process.

Weights: a checkpoint, or deterministic synthetic weights generated per HF tensor name from the
seed, so both processes build bit-identical models without touching the disk.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from gemma_jax import checks, cpuinfo, errors
from gemma_jax.bench_report import bytes_text, count_text, duration_text, rate_text
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
    quantize: str | None = None     # "int8": int8 weights (a float ckpt is quantized while loading)
    int8_mode: str | None = None    # "dynamic" | "weight-only" | None (the backend's default)

    def __post_init__(self):        # paths as given by a user: ~ expanded
        for name in ("ckpt", "hf_dir"):
            if getattr(self, name):
                object.__setattr__(self, name, os.path.expanduser(str(getattr(self, name))))


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


def preflight(spec: BenchSpec, vs_hf: bool = False, outputs: dict | None = None) -> None:
    """Refuse, in one line and before any JAX work, what would fail later: a missing checkpoint or
    HF directory, a missing torch/transformers (vs_hf) or matplotlib (a plot), an output file
    whose directory does not exist. `outputs` maps a flag ('--plot', '--json') to its path or None."""
    from gemma_jax.convert import read_hf_config
    spec_config(spec)                               # reads --ckpt's metadata: CheckpointError if unusable
    if vs_hf:
        checks.importable(("torch", "transformers"), "--vs-hf")
        if spec.ckpt and not spec.hf_dir:
            raise errors.GenerationError("--vs-hf with --ckpt needs --hf-dir (the HF directory it was converted from)")
    if spec.hf_dir:
        read_hf_config(Path(spec.hf_dir))           # ConfigError naming the directory or its config.json
    for flag, path in (outputs or {}).items():
        if path is None:
            continue
        if flag == "--plot":
            checks.importable(("matplotlib",), "--plot")
        if not Path(path).parent.is_dir():
            raise errors.GenerationError(f"{flag} {path}: the directory {Path(path).parent} does not exist")


# Rough figures for plan(), measured by `gemma-jax bench` (2B, float32) on the 2-core build machine.
CPU_BANDWIDTH = 20e9        # bytes/s a decode step streams (24 GB/s measured)
CPU_FLOPS = 100e9           # prefill (104 GFLOP/s measured)
SYNTHETIC_PER_S = 2.5e7     # synthetic weights generated per second (111 s for 2B)
OVERHEAD_S = (10, 20)       # per process (start, imports), per (batch, prompt length) run (19 s compiling)


def plan(spec: BenchSpec, vs_hf: bool = False) -> str:
    """What the run will do and roughly what it needs (memory; time on a CPU), said before it starts."""
    import jax

    from gemma_jax import cache as kv
    from gemma_jax import sampler
    from gemma_jax.api import DTYPES
    from gemma_jax.convert import hf_shapes
    config = spec_config(spec)
    sizes = [int(np.prod(shape)) for shape in hf_shapes(config).values()]   # HF's tensors: every parameter once
    params = sum(sizes)
    weights = params * np.dtype(DTYPES[spec.dtype]).itemsize
    largest = 4 * max(sizes)                                                # float32, as generated
    runs = [(b, p, weights + kv.cache_bytes(config, b, sampler.bucket(p + spec.gen_len, 32), DTYPES[spec.dtype])
             ["total"]) for b in spec.batch_sizes for p in spec.prompt_lens]
    step = max(r[2] for r in runs)
    ours = step + (1 << 28) * np.dtype(DTYPES[spec.dtype]).itemsize + (0 if spec.ckpt else 2 * largest)
    memory = max(ours, step + largest) if vs_hf else ours    # HF runs after us, in its own process
    what = f"checkpoint {spec.ckpt}" if spec.ckpt else f"random weights in the Gemma 2 {spec.preset} shape"
    lines = [f"bench: {what}: {count_text(params)} parameters in {spec.dtype} ({bytes_text(weights)}); batch sizes "
             f"{', '.join(map(str, spec.batch_sizes))} x prompt lengths {', '.join(map(str, spec.prompt_lens))}, "
             f"{spec.gen_len} new tokens, best of {spec.repeats}"
             + ("; then HF transformers on the same weights" if vs_hf else "")]
    need = f"bench: needs about {bytes_text(memory, binary=True)} of memory"
    if jax.default_backend() == "cpu":
        setup = OVERHEAD_S[0] + (0 if spec.ckpt else params / SYNTHETIC_PER_S)
        work = sum(OVERHEAD_S[1] + spec.gen_len * (1 + spec.repeats) * moved / CPU_BANDWIDTH
                   + (2 + 2 * spec.repeats) * 2 * params * b * p / CPU_FLOPS for b, p, moved in runs)
        seconds = setup + work * (20 if spec.dtype == "bfloat16" else 1)      # XLA:CPU emulates bf16
        seconds += (setup + 1.5 * work) if vs_hf else 0                        # HF: about 1.5x our time
        need += f" and roughly {duration_text(seconds)} on a 2-core CPU"
    if not spec.ckpt and spec.preset != "tiny":
        need += " (--preset tiny checks the harness in seconds)"
    return "\n".join(lines + [need])


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
    from gemma_jax.model import abstract_model, weight_in_axis
    if spec.ckpt:
        return api.load(spec.ckpt, dtype=spec.dtype, quantize=spec.quantize, int8_mode=spec.int8_mode)
    config = spec_config(spec)
    dtype = api.DTYPES[spec.dtype]
    np_dtype = NP_DTYPES[spec.dtype]
    mode = None
    if spec.quantize:
        from gemma_jax import quant
        mode = spec.int8_mode or quant.default_mode()
    abstract = abstract_model(config, param_dtype=dtype, dtype=dtype, int8_mode=mode)
    shapes = hf_shapes(config)
    params = {}
    for ours, (theirs, how) in name_table(config).items():
        arrays = [synthetic_tensor(t, shapes[t], spec.seed) for t in theirs]
        if mode and weight_in_axis(ours) is not None:  # quantized as `convert --quantize int8` does
            values, scale = build_param(how, arrays, np_dtype, quantize=True)
            params[f"{ours}/values"], params[f"{ours}/scale"] = jax.device_put(values), jax.device_put(scale)
        else:
            params[ours] = jax.device_put(build_param(how, arrays, np_dtype))
        del arrays
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, checkpoint.unflatten(params, int8_mode=mode))
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
    out = {"side": "gemma_jax", "device": str(jax.devices()[0].platform), "dtype": spec.dtype,
           "cpu": cpuinfo.cpu_info()}
    _progress("gemma_jax: building the model" if not spec.ckpt else f"gemma_jax: loading {spec.ckpt}")
    start = time.perf_counter()
    model = _jax_model(spec)
    out["load_s"] = time.perf_counter() - start
    out["weights"] = _weights_label(model)
    _progress(f"gemma_jax: model ready in {duration_text(out['load_s'])}; probing the memory bandwidth")
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
        _progress(f"gemma_jax: batch {batch}, prompt {prompt_len}: compiling, then {spec.repeats} timed runs")
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
            "tokens": np.asarray(loop.tokens[:, :spec.gen_len]).tolist()})
        _progress(f"gemma_jax: batch {batch}, prompt {prompt_len}: decode {rate_text(per_seq)} tok/s per sequence")
    out["peak_rss_GiB"] = peak_rss_bytes() / 2**30
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats:
        out["peak_device_GiB"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return out


def _weights_label(model) -> str:
    """'float32', or 'int8 (dynamic)' / 'int8 (weight-only)' for a quantized model."""
    import jax
    from gemma_jax import quant
    leaves = jax.tree.leaves(model.state, is_leaf=lambda x: isinstance(x, quant.QArray))
    modes = sorted({leaf.mode for leaf in leaves if isinstance(leaf, quant.QArray)})
    return f"int8 ({', '.join(modes)})" if modes else str(np.dtype(model.dtype))


# -------------------------------------------------------------------------------- HF side
def hf_model(spec: BenchSpec):
    """HF Gemma2ForCausalLM (eager attention) from spec.hf_dir, or with the synthetic weights."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    out = {"side": "hf_transformers", "version": transformers.__version__, "dtype": spec.dtype,
           "threads": torch.get_num_threads()}
    _progress("HF transformers: building the model")
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
    return model.eval()


def hf_worker(spec: BenchSpec) -> dict:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    out = {"side": "hf_transformers", "version": transformers.__version__, "dtype": spec.dtype,
           "threads": torch.get_num_threads()}
    start = time.perf_counter()
    model = hf_model(spec)
    out["load_s"] = time.perf_counter() - start
    rng = np.random.default_rng(spec.seed)
    out["runs"] = []
    for batch, prompt_len in ((b, p) for b in spec.batch_sizes for p in spec.prompt_lens):
        prompts = torch.as_tensor(rng.integers(3, model.config.vocab_size, (batch, prompt_len)))
        kwargs = dict(max_new_tokens=spec.gen_len, min_new_tokens=spec.gen_len, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
        first = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
        _progress(f"HF transformers: batch {batch}, prompt {prompt_len}: warm-up, then {spec.repeats} timed runs")
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
                            "tokens": result["ids"][:, prompt_len:].tolist()})
        _progress(f"HF transformers: batch {batch}, prompt {prompt_len}: decode {rate_text(per_seq)} tok/s per sequence")
    out["peak_rss_GiB"] = peak_rss_bytes() / 2**30
    return out


# ---------------------------------------------------------------------------- orchestration
PROGRESS = "bench: "    # a worker's stderr lines with this prefix are progress, shown as they come


def _progress(text: str) -> None:
    print(PROGRESS + text, file=sys.stderr, flush=True)


def _in_subprocess(side: str, spec: BenchSpec, progress: bool) -> dict:
    """Run one side in a fresh process; its progress lines are passed on, a GemmaError it raises
    comes back as the same one-line error, anything else as a RuntimeError with its stderr."""
    with tempfile.TemporaryDirectory(prefix="gemma_jax_bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "gemma_jax.bench", side, json.dumps(dataclasses.asdict(spec)), str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tail = collections.deque(maxlen=100)
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                if progress:
                    sys.stderr.write(line)
                    sys.stderr.flush()
            else:
                tail.append(line)
        proc.wait()
        answer = json.loads(out.read_text()) if out.is_file() else None
    name = "gemma_jax" if side == "jax" else "HF transformers"
    if proc.returncode == 0 and answer is not None:
        return answer
    if answer is not None and "error" in answer:
        raise getattr(errors, answer["type"], errors.GemmaError)(answer["error"])
    if proc.returncode < 0:
        raise errors.GenerationError(f"bench: the {name} process was killed by signal {-proc.returncode} "
                                     "(out of memory? see the estimate above)")
    raise RuntimeError(f"{name} benchmark failed:\n{''.join(tail)[-4000:]}")


def run(spec: BenchSpec, vs_hf: bool = False, progress: bool = False, vs_float: bool = False) -> dict:
    """All figures as a dict: {'spec', 'cpu', 'gemma_jax', 'hf'?, 'ratios'?, 'float'?,
    'int8_ratios'?}. Each side runs in its own process, one after the other (so they never share
    memory or cores). progress: stage lines on stderr (plain lines, also when stderr is not a
    terminal). vs_float (with spec.quantize): also gemma_jax with float weights, same run."""
    result = {"spec": dataclasses.asdict(spec), "cpu": cpuinfo.cpu_info(),
              "gemma_jax": _in_subprocess("jax", spec, progress)}
    if vs_float and spec.quantize:
        if progress:
            _progress("gemma_jax with float weights (the int8 baseline)")
        result["float"] = _in_subprocess("jax", dataclasses.replace(spec, quantize=None, int8_mode=None), progress)
        result["int8_ratios"] = [{"batch": q["batch"], "prompt_len": q["prompt_len"],
                                  "decode_speedup": q["decode_tok_s_per_seq"] / f["decode_tok_s_per_seq"],
                                  "prefill_speedup": q["prefill_tok_s"] / f["prefill_tok_s"]}
                                 for q, f in zip(result["gemma_jax"]["runs"], result["float"]["runs"])]
    if vs_hf:
        result["hf"] = _in_subprocess("hf", spec, progress)
        result["ratios"] = []
        for ours, theirs in zip(result["gemma_jax"]["runs"], result["hf"]["runs"]):
            same = [a == b for a, b in zip(ours["tokens"], theirs["tokens"])]
            result["ratios"].append({
                "batch": ours["batch"], "prompt_len": ours["prompt_len"],
                "decode_speedup": ours["decode_tok_s_per_seq"] / theirs["decode_tok_s_per_seq"],
                "prefill_speedup": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
                "same_greedy_tokens": all(same), "same_greedy_rows": sum(same)})
    return result


if __name__ == "__main__":
    side, payload, out_path = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    payload["batch_sizes"], payload["prompt_lens"] = tuple(payload["batch_sizes"]), tuple(payload["prompt_lens"])
    spec = BenchSpec(**payload)
    try:
        figures = jax_worker(spec) if side == "jax" else hf_worker(spec)
    except errors.GemmaError as e:      # a refused input: one line in the parent
        out_path.write_text(json.dumps({"error": str(e), "type": type(e).__name__}))
        sys.exit(2)
    out_path.write_text(json.dumps(figures))
