"""Run by test_sharding.py in a subprocess with virtual CPU devices (XLA_FLAGS set by the caller).

usage: sharded_worker.py CKPT OUT.json [--distributed COORD NPROC PID] [--int8 INT8_CKPT]
Writes logits, greedy tokens and per-device parameter bytes for each mesh shape to OUT.json. With
--int8 (CKPT a float checkpoint), for each mesh both CKPT quantized while loading ("MESH requantized")
and INT8_CKPT, made by convert --quantize int8 ("MESH int8").
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
int8_ckpt = None
if "--int8" in args:
    i = args.index("--int8")
    int8_ckpt, args = args[i + 1], args[:i] + args[i + 2:]
ckpt, out_path = args[0], args[1]

n = jax.device_count()
meshes = list(dict.fromkeys([(n, 1), (1, n)] + ([(2, n // 2)] if n >= 4 else [])))
ids = np.random.default_rng(0).integers(3, 128, (2, 19))
prompts = [ids[0, :7].tolist(), ids[1, :3].tolist()]
results = {"devices": n, "processes": jax.process_count()}
loads = {"": lambda mesh: gemma_jax.load(ckpt, mesh=mesh)} if int8_ckpt is None else {
    " requantized": lambda mesh: gemma_jax.load(ckpt, mesh=mesh, quantize="int8"),
    " int8": lambda mesh: gemma_jax.load(int8_ckpt, mesh=mesh)}
for shape in meshes:
    mesh = sharding.make_mesh(*shape)
    for suffix, load in loads.items():
        model = load(mesh)
        per_device: dict[int, int] = {}
        for leaf in jax.tree.leaves(model.state):
            for shard in leaf.addressable_shards:
                per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
        results[f"{shape[0]}x{shape[1]}{suffix}"] = {
            "logits": model.logits(ids).tolist(),
            "greedy": model.generate_ids(prompts, 16, stop_ids=[]),
            "bytes_per_device": sorted(per_device.values()),
        }
if jax.process_index() == 0:
    with open(out_path, "w") as f:
        json.dump(results, f)
