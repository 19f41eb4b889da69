"""Measure each formulation of each Gemma 2 decode-step product on this CPU, alone: float32, int8
weight-only (dequantized inside the product), dynamic int8 activations (int8 x int8 -> int32) with
1, 2 or 4 rows, both weight layouts, and qwix's dot_general when it is installed.

    python scripts/bench_int8_kernels.py [--preset 2b] [--json FILE]

Each product runs over enough distinct weight copies to stream at least --bytes of int8 weights
(the L3 cache of a big Xeon holds 300 MB; a 2B decode step streams 2.6 GB), as one jitted chain;
the figure is the best of --repeats calls, in GB/s of the weight bytes each formulation reads and
in ms for the 26 layers' (or the logits') worth of that product.
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
from gemma_jax import cpuinfo, quant  # noqa: E402
from gemma_jax.config import PRESETS  # noqa: E402


def shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in, out, the float model's input axis, times per decode step) of every weight
    product of one decode step."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k, layers = config.num_attention_heads * h, config.num_key_value_heads * h, config.num_hidden_layers
    return [("q", d, n, 0, layers), ("k/v", d, k, 0, 2 * layers), ("o", n, d, 1, layers),
            ("gate/up", d, 2 * f, 0, layers), ("down", f, d, 1, layers), ("logits", d, config.vocab_size, 0, 1)]


def _quantized(w: jax.Array, in_axis: int, mode: str) -> quant.QArray:
    """On the device, inside jit (quant.quantize is the exact host version; speed is all that counts here)."""
    scale = jnp.max(jnp.abs(w), axis=in_axis, keepdims=True) / 127
    return quant.QArray(jnp.round(w / scale).astype(jnp.int8), scale, mode)


def formulations(float_axis: int):
    """name -> (input axis of the weight, build the weight from a float one, the product, slow?).
    Layouts: the float model's for the shape (float_axis), and both for the 2-row int8 product."""
    layout = {0: "[in,out]", 1: "[out,in]"}

    def product(a, rows=quant.MIN_ROWS):
        return lambda x, w: quant.dense(x, w, in_axis=a, min_rows=rows)

    out = {f"float32 {layout[float_axis]}": (float_axis, lambda w: w, product(float_axis), False),
           f"int8 weight-only {layout[float_axis]}": (
               float_axis, lambda w: _quantized(w, float_axis, "weight-only"), product(float_axis), True),
           f"int8 dynamic 1 row {layout[float_axis]}": (
               float_axis, lambda w: _quantized(w, float_axis, "dynamic"), product(float_axis, 1), True)}
    for a in (0, 1):
        out[f"int8 dynamic 2 rows {layout[a]}"] = (a, lambda w, a=a: _quantized(w, a, "dynamic"), product(a, 2), False)
    out[f"int8 dynamic 4 rows {layout[float_axis]}"] = (
        float_axis, lambda w: _quantized(w, float_axis, "dynamic"), product(float_axis, 4), False)
    try:
        import qwix
    except ImportError:
        return out

    def qwix_weight(w):
        return qwix.quantize(w, jnp.int8, channelwise_axes=[1 - float_axis])

    def qwix_dynamic(x, w):  # qwix's fast path: int8 x int8 dot_general, then both scales; no row padding
        xq = qwix.quantize(x, jnp.int8, channelwise_axes=list(range(x.ndim - 1)))
        return qwix.dot_general(xq, w, (((x.ndim - 1,), (float_axis,)), ((), ())), preferred_element_type=jnp.float32)
    out[f"qwix dynamic 1 row {layout[float_axis]}"] = (float_axis, qwix_weight, qwix_dynamic, True)
    return out


def weight_bytes(w) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(w))


def measure(name, d_in, d_out, float_axis, per_step, copies, repeats) -> dict[str, dict]:
    results = {}
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (1, d_in), jnp.float32)
    for label, (in_axis, build, product, slow) in formulations(float_axis).items():
        shape = (d_in, d_out) if in_axis == 0 else (d_out, d_in)
        make = jax.jit(lambda k, shape=shape, build=build: build(jax.random.normal(k, shape, jnp.float32) * 0.02))
        n = max(1, copies // 8) if slow else copies  # a slow product gains nothing from the caches
        ws = [make(jax.random.fold_in(key, i)) for i in range(n)]
        chain = jax.jit(lambda x, ws, product=product: sum(product(x, w).astype(jnp.float32).sum() for w in ws))
        jax.block_until_ready(chain(x, ws))
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(chain(x, ws))
            best = min(best, time.perf_counter() - start)
        nbytes = weight_bytes(ws)
        results[label] = {"GBps": nbytes / best / 1e9, "ms_per_step": best / n * per_step * 1e3}
        print(f"{name:8s} [{d_in}x{d_out}] x{per_step:<3d} {label:32s} {results[label]['GBps']:6.1f} GB/s "
              f"{results[label]['ms_per_step']:8.1f} ms/step", flush=True)
        del ws
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--bytes", type=float, default=400e6, help="int8 weight bytes streamed per chain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(cpuinfo.describe(), flush=True)
    config = PRESETS[args.preset]()
    table = {}
    for name, d_in, d_out, float_axis, per_step in shapes(config):
        copies = max(1, math.ceil(args.bytes / (d_in * d_out)))
        table[name] = measure(name, d_in, d_out, float_axis, per_step, copies, args.repeats)
    kinds = {label.rsplit(" ", 1)[0] for products in table.values() for label in products}
    totals = {}
    for kind in sorted(kinds):  # per shape, the best layout measured for this formulation
        totals[kind] = sum(min(r["ms_per_step"] for label, r in table[n].items() if label.rsplit(" ", 1)[0] == kind)
                           for n in table)
    print("\nwhole decode step's products (sum over shapes, best layout of each):")
    for kind, ms in totals.items():
        print(f"  {kind:32s} {ms:8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpuinfo.describe(), "products": table, "step_ms": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
