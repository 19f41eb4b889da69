"""Run by test_sharding.py in a subprocess with virtual CPU devices (XLA_FLAGS set by the caller).

usage: sharded_worker.py CKPT OUT.json [--distributed COORD NPROC PID]
Writes logits, greedy tokens and per-device parameter bytes for each mesh shape to OUT.json.
"""

import json
import sys

import jax
import numpy as np

import gemma_jax
from gemma_jax import sharding

args = sys.argv[1:]
if "--distributed" in args:  # before anything starts a JAX backend, as the CLI does
    i = args.index("--distributed")
    sharding.initialize_distributed(args[i + 1], int(args[i + 2]), int(args[i + 3]))
    args = args[:i]
ckpt, out_path = args[0], args[1]

n = jax.device_count()
meshes = list(dict.fromkeys([(n, 1), (1, n)] + ([(2, n // 2)] if n >= 4 else [])))
ids = np.random.default_rng(0).integers(3, 128, (2, 19))
prompts = [ids[0, :7].tolist(), ids[1, :3].tolist()]
results = {"devices": n, "processes": jax.process_count()}
for shape in meshes:
    mesh = sharding.make_mesh(*shape)
    model = gemma_jax.load(ckpt, mesh=mesh)
    per_device: dict[int, int] = {}
    for leaf in jax.tree.leaves(model.state):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    results[f"{shape[0]}x{shape[1]}"] = {
        "logits": model.logits(ids).tolist(),
        "greedy": model.generate_ids(prompts, 16, stop_ids=[]),
        "bytes_per_device": sorted(per_device.values()),
    }
if jax.process_index() == 0:
    with open(out_path, "w") as f:
        json.dump(results, f)
