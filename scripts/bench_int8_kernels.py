"""Measure each Gemma 2 decode-step weight product on this CPU, alone: float32 (the float model's
layout), XLA's int8 x int8 -> int32 dot (weight [out, in], rows padded to 2, as quant.py did before
the kernel), and gemma_jax's int8 kernel (kernels/int8.py) on every instruction set this CPU runs;
then the gate/up product with 1..256 rows (kernel vs XLA: where prefill should switch), and the
machine's bandwidth (bench.bandwidth_probe, float32 copy).

    python scripts/bench_int8_kernels.py [--preset 2b] [--json FILE]

Each product runs over enough distinct weight copies to stream at least --bytes of int8 weights
(the L3 cache of a big Xeon holds 300 MB), as one jitted chain; the figure is the best of
--repeats calls, in GB/s of the weight bytes as stored (int8 or float32) and in ms for one decode
step's worth of that product (26 layers, 52 for k and v, 1 for the logits).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gemma_jax import bench, cpuinfo  # noqa: E402
from gemma_jax.config import PRESETS  # noqa: E402
from gemma_jax.kernels import int8 as kernel  # noqa: E402


def shapes(config) -> list[tuple[str, int, int, int, int]]:
    """(name, in, out, the float model's input axis, times per decode step) of every weight product
    of one decode step."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k, layers = config.num_attention_heads * h, config.num_key_value_heads * h, config.num_hidden_layers
    return [("q", d, n, 0, layers), ("k/v", d, k, 0, 2 * layers), ("o", n, d, 1, layers),
            ("gate/up", d, 2 * f, 0, layers), ("down", f, d, 1, layers), ("logits", d, config.vocab_size, 0, 1)]


def xla_int8(x, w):
    rows = x.shape[0]
    x = jnp.pad(x, ((0, max(0, 2 - rows)), (0, 0)))  # XLA:CPU's one-row int8 dot is a slow loop
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)[:rows]


def float32(in_axis):
    return lambda x, w: x @ w if in_axis == 0 else jnp.einsum("mi,oi->mo", x, w)


def products(float_axis: int, isas: list[str]) -> dict:
    """label -> (is the weight float32 in the float layout?, product(x, w))."""
    out = {"float32": (True, float32(float_axis)), "XLA int8": (False, xla_int8)}
    for isa in isas:
        out[f"kernel {isa}"] = (False, lambda x, w, isa=isa: kernel.matmul(x, w, isa=isa))
    return out


def timed(product, x, ws, repeats: int) -> float:
    chain = jax.jit(lambda x, ws: sum(product(x, w).astype(jnp.float32).sum() for w in ws))
    jax.block_until_ready(chain(x, ws))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chain(x, ws))
        best = min(best, time.perf_counter() - start)
    return best


def weights(d_in, d_out, copies, is_float, float_axis):
    key = jax.random.key(0)
    if is_float:
        shape = (d_in, d_out) if float_axis == 0 else (d_out, d_in)
        make = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32))
    else:
        make = jax.jit(lambda k: jax.random.randint(k, (d_out, d_in), -127, 128, jnp.int8))
    return [make(jax.random.fold_in(key, i)) for i in range(copies)]


def measure(name, d_in, d_out, float_axis, per_step, copies, rows, isas, repeats) -> dict[str, dict]:
    results = {}
    rng = np.random.default_rng(0)
    for label, (is_float, product) in products(float_axis, isas).items():
        x = (jnp.asarray(rng.standard_normal((rows, d_in)), jnp.float32) if is_float
             else jnp.asarray(rng.integers(-127, 128, (rows, d_in)), jnp.int8))
        ws = weights(d_in, d_out, copies, is_float, float_axis)
        best = timed(product, x, ws, repeats)
        nbytes = sum(w.size * w.dtype.itemsize for w in ws)
        results[label] = {"GBps": nbytes / best / 1e9, "ms_per_step": best / copies * per_step * 1e3}
        print(f"{name:8s} [{rows}x{d_in}]·[{d_in}->{d_out}] x{per_step:<3d} {label:20s} "
              f"{results[label]['GBps']:6.1f} GB/s {results[label]['ms_per_step']:8.1f} ms/step", flush=True)
        del ws
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--bytes", type=float, default=400e6, help="int8 weight bytes streamed per chain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="1,2,4,8,16,64,256", help="row counts for the gate/up sweep")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(cpuinfo.describe(), flush=True)
    if not kernel.available():
        sys.exit("the int8 kernel is unavailable here (see the warning above)")
    isas = [isa for isa in kernel.supported_isas() if isa != "scalar"] or ["scalar"]
    print(f"kernel ISAs: {', '.join(kernel.supported_isas())} (best: {kernel.best_isa()})", flush=True)
    config = PRESETS[args.preset]()
    table = {}
    for name, d_in, d_out, float_axis, per_step in shapes(config):
        copies = max(1, math.ceil(args.bytes / (d_in * d_out)))
        table[name] = measure(name, d_in, d_out, float_axis, per_step, copies, 1, isas, args.repeats)
    totals = {label: sum(table[n][label]["ms_per_step"] for n in table) for label in table["q"]}
    print("\nwhole decode step's products (one row):")
    for label, ms in totals.items():
        print(f"  {label:20s} {ms:8.1f} ms")
    name, d_in, d_out, float_axis, per_step = shapes(config)[3]
    sweep = {}
    for rows in (int(r) for r in args.rows.split(",")):
        copies = max(1, math.ceil(args.bytes / (d_in * d_out) / max(1, rows // 8)))
        sweep[rows] = {}
        for label in ("XLA int8", f"kernel {kernel.best_isa()}"):
            product = products(float_axis, [kernel.best_isa()])[label][1]
            x = jnp.asarray(np.random.default_rng(rows).integers(-127, 128, (rows, d_in)), jnp.int8)
            ws = weights(d_in, d_out, copies, False, float_axis)
            best = timed(product, x, ws, args.repeats)
            sweep[rows][label] = copies * d_in * d_out / best / 1e9
            del ws
        print(f"gate/up with {rows:3d} rows: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in sweep[rows].items()), flush=True)
    probe = bench.bandwidth_probe("float32") / 1e9
    print(f"\nbandwidth probe (float32 copy): {probe:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpuinfo.describe(), "products": table, "step_ms": totals,
                                         "gate_up_rows_GBps": sweep, "bandwidth_GBps": probe}, indent=1) + "\n")


if __name__ == "__main__":
    main()
