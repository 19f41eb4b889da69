"""Run by test_sharding.py in a subprocess with virtual CPU devices (XLA_FLAGS set by the caller).

usage: sharded_worker.py CKPT OUT.json [--distributed COORD NPROC PID]
Writes logits, greedy tokens and per-device parameter bytes for each mesh shape to OUT.json.
"""

import json
import sys

import jax
import numpy as np

args = sys.argv[1:]
if "--distributed" in args:
    i = args.index("--distributed")
    coordinator, nproc, pid = args[i + 1], int(args[i + 2]), int(args[i + 3])
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=nproc, process_id=pid)
    args = args[:i]
ckpt, out_path = args[0], args[1]

import gemma_jax  # noqa: E402
from gemma_jax import sharding  # noqa: E402

n = jax.device_count()
meshes = [(n, 1), (1, n)] + ([(2, n // 2)] if n >= 4 else [])
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
