"""Sharded loading and generation on virtual CPU devices, in subprocesses (XLA_FLAGS must be set
before jax is imported): meshes (8,1), (1,8), (2,4) and two processes joined by
jax.distributed.initialize must reproduce the single-device logits and greedy tokens."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import gemma_jax
from gemma_jax import sharding
from gemma_jax.config import PRESETS
from hf_oracle import hf_model, save

WORKER = Path(__file__).with_name("sharded_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(args, devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def _converted(root):
    # 8 heads and 8 kv heads so that tp=8 shards every attention weight by whole heads
    model = hf_model(seed=5, embed_std=0.1, hidden_size=64, intermediate_size=64, num_attention_heads=8,
                     num_key_value_heads=8, head_dim=8)
    save(model, root / "hf")
    gemma_jax.convert(root / "hf", root / "ckpt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    _converted(root)
    single = _run([root / "ckpt", root / "one.json"], devices=1)
    eight = _run([root / "ckpt", root / "eight.json"], devices=8)
    _wait(single), _wait(eight)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_run([root / "ckpt", root / "multi.json", "--distributed", f"localhost:{port}", 2, pid], devices=2)
             for pid in (0, 1)]
    for p in procs:
        _wait(p)
    return {name: json.loads((root / f"{name}.json").read_text()) for name in ("one", "eight", "multi")}


@pytest.mark.parametrize("run,mesh", [("eight", "8x1"), ("eight", "1x8"), ("eight", "2x4"),
                                      ("multi", "4x1"), ("multi", "1x4"), ("multi", "2x2")])
def test_mesh_matches_single_device(runs, run, mesh, report):
    ref, got = runs["one"]["1x1"], runs[run][mesh]
    diff = float(np.abs(np.asarray(got["logits"]) - np.asarray(ref["logits"])).max())
    report(f"sharding {run} mesh {mesh} max|dlogit| vs one device", diff)
    assert diff <= 1e-5
    assert got["greedy"] == ref["greedy"]


def test_two_processes_joined(runs):
    assert runs["multi"]["processes"] == 2 and runs["multi"]["devices"] == 4


def test_each_device_holds_its_share(runs):
    single = runs["one"]["1x1"]["bytes_per_device"][0]
    for mesh, parts in (("1x8", 8), ("8x1", 8), ("2x4", 8)):
        held = runs["eight"][mesh]["bytes_per_device"]
        # all weights shard 8 ways here; only the norm vectors (replicated) keep it above 1/8
        assert single / parts <= max(held) <= single / parts * 1.1, (mesh, held)


@pytest.fixture(scope="module")
def int8_runs(tmp_path_factory):
    """The same model in int8 on one device (this process) and on 8 virtual devices, loaded both
    from an int8 checkpoint and by quantizing the float one while loading."""
    root = tmp_path_factory.mktemp("sharding_int8")
    _converted(root)
    gemma_jax.convert(root / "hf", root / "int8", quantize="int8")
    proc = _run([root / "ckpt", root / "int8.json", "--int8", root / "int8"], devices=8)
    _wait(proc)
    single = gemma_jax.load(root / "int8")
    ids = np.random.default_rng(0).integers(3, 128, (2, 19))
    prompts = [ids[0, :7].tolist(), ids[1, :3].tolist()]
    one = {"logits": single.logits(ids), "greedy": single.generate_ids(prompts, 16, stop_ids=[]),
           "bytes": sum(x.nbytes for x in jax.tree.leaves(single.state)), "config": single.config}
    return one, json.loads((root / "int8.json").read_text())


@pytest.mark.parametrize("mesh", ["8x1", "1x8", "2x4"])
@pytest.mark.parametrize("how", ["int8", "requantized"])
def test_int8_mesh_matches_single_device(int8_runs, mesh, how, report):
    """Scales are sharded with their weights (each device holds the scales of its output
    channels): the same logits and greedy tokens as one device, and each device holds what the
    partitioning rules say (sharding.bytes_per_device), at most 1/8 of the weights plus the
    replicated norms and scales (a large share on a model this small)."""
    one, eight = int8_runs
    got = eight[f"{mesh} {how}"]
    diff = float(np.abs(np.asarray(got["logits"]) - one["logits"]).max())
    report(f"sharding int8 ({how}) mesh {mesh} max|dlogit| vs one device", diff)
    assert diff <= 1e-4
    assert got["greedy"] == one["greedy"]
    shape = tuple(int(n) for n in mesh.split("x"))
    assert max(got["bytes_per_device"]) == sharding.bytes_per_device(one["config"], shape, np.float32, int8=True)
    assert max(got["bytes_per_device"]) < one["bytes"] / 4


def test_per_device_bytes_of_presets():
    full = sharding.bytes_per_device(PRESETS["27b"](), (1, 1), np.float32)
    assert full == 27_227_128_320 * 4
    tp8 = sharding.bytes_per_device(PRESETS["27b"](), (1, 8), np.float32)
    assert full / 8 <= tp8 < full / 8 * 1.01
    int8 = sharding.bytes_per_device(PRESETS["27b"](), (1, 8), np.float32, int8=True)
    assert 27_227_128_320 / 8 <= int8 < 27_227_128_320 / 8 * 1.01  # a byte a weight; scales, norms besides
