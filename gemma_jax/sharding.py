"""Meshes and the logical axis rules that place parameters, activations and the KV cache.

Mesh axes: "fsdp" (batch of activations and cache; optionally the embedding axis D of weights)
and "tp" (tensor parallelism: attention heads, kv heads, MLP hidden, vocabulary). A weight axis
is sharded only when the mesh axis divides it (heads by whole heads), otherwise it is replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gemma_jax.config import GemmaConfig
from gemma_jax.errors import GemmaError

AXES = ("fsdp", "tp")


def make_mesh(fsdp: int = 1, tp: int = 1, devices=None) -> Mesh:
    """A (fsdp, tp) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp * tp != len(devices):
        raise GemmaError(f"mesh ({fsdp}, {tp}) needs {fsdp * tp} devices, {len(devices)} are available")
    return jax.make_mesh((fsdp, tp), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def parse_mesh(text: str) -> tuple[int, int]:
    """'2x4' or '2,4' -> (2, 4)."""
    try:
        fsdp, tp = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise GemmaError(f"--mesh {text!r}: expected FSDPxTP, e.g. 1x8") from None
    if fsdp < 1 or tp < 1:
        raise GemmaError(f"--mesh {text!r}: sizes must be >= 1")
    return fsdp, tp


def param_spec(name: str, config: GemmaConfig, mesh: Mesh, fsdp_params: bool = True) -> P:
    """PartitionSpec of one parameter (flat name as in checkpoint.flatten). An int8 weight's
    NAME/values ([out..., in], see quant.py) shard as the float NAME with its input axis moved
    last; NAME/scale ([out..., 1]) likewise with the last axis replicated: each device holds the
    scales of the output channels it holds."""
    base, _, part = name.rpartition("/")
    if part in ("values", "scale"):
        from gemma_jax.model import weight_in_axis
        axis = weight_in_axis(base)
        spec = list(param_spec(base, config, mesh, fsdp_params))
        spec += [None] * (axis + 1 - len(spec))
        moved = spec[:axis] + spec[axis + 1:] + [spec[axis] if part == "values" else None]
        return P(*moved)
    tp = mesh.shape["tp"]
    fsdp = "fsdp" if fsdp_params and config.hidden_size % mesh.shape["fsdp"] == 0 else None
    heads = "tp" if config.num_attention_heads % tp == 0 else None
    kv_heads = "tp" if config.num_key_value_heads % tp == 0 else None
    ffn = "tp" if config.intermediate_size % tp == 0 else None
    vocab = "tp" if config.vocab_size % tp == 0 else None
    leaf = name.split("/", 2)[-1] if name.startswith("blocks/") else name
    rules = {
        "embedder/embedding": P(fsdp, vocab),
        "attn/q": P(fsdp, heads), "attn/k": P(fsdp, kv_heads), "attn/v": P(fsdp, kv_heads),
        "attn/o": P(fsdp, heads),
        "mlp/gate_up": P(fsdp, None, ffn), "mlp/down": P(fsdp, ffn),
    }
    return rules.get(leaf, P())  # norms are replicated


def param_shardings(names, config: GemmaConfig, mesh: Mesh, fsdp_params: bool = True) -> dict[str, NamedSharding]:
    return {n: NamedSharding(mesh, param_spec(n, config, mesh, fsdp_params)) for n in names}


def cache_sharding(config: GemmaConfig, mesh: Mesh, batch: int) -> NamedSharding:
    """KV buffers [B, S, K, H]: batch over fsdp, kv heads over tp (where they divide)."""
    b = "fsdp" if batch % mesh.shape["fsdp"] == 0 else None
    k = "tp" if config.num_key_value_heads % mesh.shape["tp"] == 0 else None
    return NamedSharding(mesh, P(b, None, k, None))


def bytes_per_device(config: GemmaConfig, mesh_shape: tuple[int, int], dtype=np.float32,
                     fsdp_params: bool = True, int8: bool = False) -> int:
    """Parameter bytes held by the busiest device under a mesh shape (computed with eval_shape).
    int8: weights as int8 values + float32 scales (the norms in dtype)."""
    from gemma_jax import checkpoint
    from gemma_jax.model import abstract_model
    shapes = checkpoint.param_shapes(abstract_model(config, int8_mode="dynamic" if int8 else None))
    mesh = jax.sharding.AbstractMesh(mesh_shape, AXES)
    total = 0
    for name, shape in shapes.items():
        spec = param_spec(name, config, mesh, fsdp_params)
        parts = math.prod(mesh.shape[a] for a in spec if a is not None)
        itemsize = np.dtype(dtype if shape.dtype == np.float32 and not name.endswith("/scale") else shape.dtype).itemsize
        total += math.prod(shape.shape) * itemsize // parts
    return total


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize with explicit values, or the environment's defaults (TPU pods)."""
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                                     process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)
