"""Measure conversion and loading of a 2B-shaped bf16 checkpoint in two shards (about 5.2 GB of
synthetic weights), against a plain copy and a raw read of the same bytes in the same run.

    python scripts/bench_convert.py [--preset 2b] [--dir /tmp/gemma_jax_bench_convert] [--json FILE]
                                    [--quantize int8] [--keep]

--quantize int8 converts to an int8 checkpoint (and reports its size on disk); --keep leaves the
HF files and the checkpoint in --dir (e.g. for `gemma-jax bench --ckpt DIR/ckpt` afterwards).

Conversion and loading each run in a fresh process; their peak resident memory is that process's
high-water mark (VmHWM; file pages mapped while reading count too). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gemma_jax.bench import BenchSpec, spec_config, synthetic_tensor  # noqa: E402
from gemma_jax.convert import hf_shapes  # noqa: E402


def write_safetensors(path: Path, names: list[str], shapes: dict, seed: int) -> None:
    """A bf16 safetensors file written tensor by tensor (never the whole shard in memory)."""
    header, offset = {}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * 2
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            f.write(synthetic_tensor(name, shapes[name], seed).astype(ml_dtypes.bfloat16).tobytes())


def make_checkpoint(out: Path, preset: str, seed: int = 0) -> None:
    config = spec_config(BenchSpec(preset=preset))
    shapes = hf_shapes(config)
    names = list(shapes)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    out.mkdir(parents=True)
    for shard, shard_names in shards.items():
        write_safetensors(out / shard, shard_names, shapes, seed)
    index = {"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    hf = config.to_hf()
    hf.update(torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(hf))


def timed_child(setup: str, work: str) -> tuple[float, float, float]:
    """(seconds of `work` alone, peak RSS GiB, RSS GiB at the end) of a fresh Python process.

    The peak is the child's own VmHWM: a forked child's ru_maxrss also counts the parent's memory
    at the fork (Linux keeps the pre-exec high-water mark), which here holds the synthetic weights."""
    code = (f"{setup}\nimport time\nt = time.perf_counter()\n{work}\nprint(time.perf_counter() - t)\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip().splitlines()
    return float(out[-3]), int(out[-2]) / 2**20, int(out[-1]) / 2**20


def read_all(directory: Path) -> float:
    start = time.perf_counter()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gemma_jax_bench_convert"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--keep", action="store_true", help="keep the HF files and the checkpoint")
    parser.add_argument("--no-copy", action="store_true", help="skip the plain-copy reference (saves disk space)")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    hf, copy, ckpt = args.dir / "hf", args.dir / "copy", args.dir / "ckpt"
    start = time.perf_counter()
    make_checkpoint(hf, args.preset)
    size = sum(p.stat().st_size for p in hf.iterdir())
    from gemma_jax import cpuinfo
    print(cpuinfo.describe())
    print(f"synthetic {args.preset} bf16 checkpoint: {size / 1e9:.2f} GB in 2 shards "
          f"({time.perf_counter() - start:.0f}s to write)", flush=True)
    read_all(hf)  # the same warm page cache for the copy and the conversion
    copy_s = float("nan")
    if not args.no_copy:
        copy.mkdir()
        start = time.perf_counter()
        for p in hf.glob("*.safetensors"):
            shutil.copyfile(p, copy / p.name)
        os.sync()
        copy_s = time.perf_counter() - start
        shutil.rmtree(copy)
    convert_s, convert_gib, _ = timed_child("import os, gemma_jax", f"gemma_jax.convert({str(hf)!r}, {str(ckpt)!r}, "
                                         f"quantize={args.quantize!r}); os.sync()")
    ckpt_bytes = sum(p.stat().st_size for p in (ckpt / "params").rglob("*") if p.is_file())
    read_s = read_all(ckpt / "params")
    load_s, load_gib, loaded_gib = timed_child("import jax, gemma_jax",
                                   f"m = gemma_jax.load({str(ckpt)!r}); jax.block_until_ready(m.state)")
    figures = {"bytes": size, "copy_s": copy_s, "convert_s": convert_s, "convert_peak_rss_GiB": convert_gib,
               "convert_vs_copy": convert_s / copy_s, "raw_read_s": read_s, "load_s": load_s,
               "load_peak_rss_GiB": load_gib, "loaded_rss_GiB": loaded_gib, "load_vs_read": load_s / read_s, "quantize": args.quantize,
               "checkpoint_bytes": ckpt_bytes}
    print(f"plain copy {copy_s:.1f}s; convert {convert_s:.1f}s ({figures['convert_vs_copy']:.2f}x the copy), "
          f"peak RSS {convert_gib:.2f} GiB\nraw read of the checkpoint {read_s:.1f}s; load {load_s:.1f}s "
          f"({figures['load_vs_read']:.2f}x the read), peak RSS {load_gib:.2f} GiB, {loaded_gib:.2f} GiB once loaded\n"
          f"checkpoint params on disk: {ckpt_bytes / 1e9:.2f} GB ({args.quantize or 'float'})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
