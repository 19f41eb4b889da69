"""The converter's layout and the loader's two read paths, element by element against HF's tensors."""

import importlib

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

import gemma_jax
from gemma_jax import checkpoint
from gemma_jax.api import DTYPES
from gemma_jax.model import abstract_model
from hf_oracle import hf_model, save

convert = importlib.import_module("gemma_jax.convert")  # the package exports convert(), the function


def _hf_tensors(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _expected_params(hf: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """Our params built independently of convert.py: q, k, v, embedding [out, in] -> [in, out];
    gate/up stacked; o and down as they are."""
    out = {"embedder/embedding": hf["model.embed_tokens.weight"].T, "final_norm/weight": hf["model.norm.weight"]}
    for i in range(layers):
        p, q = f"blocks/{i}/", f"model.layers.{i}."
        for ours, theirs in [("pre_attn_norm/weight", "input_layernorm"), ("post_attn_norm/weight",
                             "post_attention_layernorm"), ("pre_ffw_norm/weight", "pre_feedforward_layernorm"),
                             ("post_ffw_norm/weight", "post_feedforward_layernorm")]:
            out[p + ours] = hf[q + theirs + ".weight"]
        for ours in "qkv":
            out[p + f"attn/{ours}"] = hf[q + f"self_attn.{ours}_proj.weight"].T
        out[p + "attn/o"] = hf[q + "self_attn.o_proj.weight"]
        out[p + "mlp/gate_up"] = np.stack([hf[q + "mlp.gate_proj.weight"].T, hf[q + "mlp.up_proj.weight"].T], 1)
        out[p + "mlp/down"] = hf[q + "mlp.down_proj.weight"]
    return out


def _restore(ckpt, dtype: str, orbax: bool) -> dict[str, np.ndarray]:
    """Flat params read by the single-device fast path, or through Orbax (a one-device mesh)."""
    config, _ = checkpoint.read_meta(ckpt)
    shapes = checkpoint.param_shapes(abstract_model(config, param_dtype=DTYPES[dtype], dtype=DTYPES[dtype]))
    device = jax.devices()[0]
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh([device], ("x",)), jax.sharding.PartitionSpec()) \
        if orbax else jax.sharding.SingleDeviceSharding(device)
    expected = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in shapes.items()}
    return {k: np.asarray(v) for k, v in checkpoint.restore(ckpt, expected).items()}


@pytest.mark.parametrize("block_bytes", [convert.BLOCK_BYTES, 100])
def test_converted_params_are_hf_tensors_relaid(tmp_path, monkeypatch, block_bytes):
    """Read in blocks that split every tensor (block_bytes=100: a few rows), or whole: exact."""
    monkeypatch.setattr(convert, "BLOCK_BYTES", block_bytes)
    model = hf_model(seed=7, vocab_size=203, intermediate_size=56)
    save(model, tmp_path / "hf", max_shard_size="20KB")
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    want = _expected_params(_hf_tensors(model), model.config.num_hidden_layers)
    got = _restore(tmp_path / "ckpt", "float32", orbax=False)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_bfloat16_conversion_in_blocks_rounds_like_numpy(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "BLOCK_BYTES", 64)
    model = hf_model(seed=8)
    save(model, tmp_path / "hf")
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    want = _expected_params(_hf_tensors(model), model.config.num_hidden_layers)
    got = _restore(tmp_path / "ckpt", "bfloat16", orbax=False)
    for name, value in want.items():
        assert got[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[name].view(np.uint16), value.astype(ml_dtypes.bfloat16).view(np.uint16),
                                      err_msg=name)


@pytest.mark.parametrize("stored, loaded", [("float32", "float32"), ("bfloat16", "float32"),
                                            ("float32", "bfloat16")])
def test_fast_and_orbax_restore_agree(tmp_path, stored, loaded):
    """The single-device read (TensorStore into aligned buffers) equals Orbax's restore, casts included."""
    save(hf_model(seed=9), tmp_path / "hf")
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt", dtype=stored)
    fast, slow = (_restore(tmp_path / "ckpt", loaded, orbax) for orbax in (False, True))
    assert set(fast) == set(slow)
    for name in fast:
        assert fast[name].dtype == slow[name].dtype == np.dtype(DTYPES[loaded])
        np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)


def test_loaded_params_are_page_aligned_on_cpu(tmp_path):
    """On CPU the fast path hands its buffers to XLA without a copy (what keeps loading near read speed)."""
    if jax.default_backend() != "cpu":
        pytest.skip("needs the CPU backend (zero-copy adoption is a CPU property)")
    save(hf_model(seed=10), tmp_path / "hf")
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    model = gemma_jax.load(tmp_path / "ckpt")
    for leaf in jax.tree.leaves(model.state):
        assert leaf.unsafe_buffer_pointer() % checkpoint._PAGE == 0


def test_tied_lm_head_is_accepted_and_checked_in_blocks(tmp_path, monkeypatch):
    """A checkpoint that stores lm_head.weight equal to the embedding converts (compared block by
    block); the same file with one element changed is refused."""
    monkeypatch.setattr(convert, "BLOCK_BYTES", 64)
    save(hf_model(seed=11), tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    tensors["lm_head.weight"][-1, -1] += 1
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(gemma_jax.CheckpointError, match="differs from the embedding"):
        gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt2")


def test_bf16_hf_weights_copy_bit_exact(tmp_path):
    """bf16 on disk -> bf16 checkpoint moves raw bits (the uint16 fast path), transposed."""
    model = hf_model(seed=12, dtype=torch.bfloat16)
    save(model, tmp_path / "hf")
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    hf = {k: v.view(torch.int16).numpy().view(np.uint16) for k, v in model.state_dict().items()}
    got = _restore(tmp_path / "ckpt", "bfloat16", orbax=False)
    np.testing.assert_array_equal(got["embedder/embedding"].view(np.uint16), hf["model.embed_tokens.weight"].T)
    np.testing.assert_array_equal(got["blocks/1/mlp/gate_up"].view(np.uint16)[:, 1],
                                  hf["model.layers.1.mlp.up_proj.weight"].T)


def test_tensor_read_after_the_file_shrank_names_file_and_tensor(tmp_path):
    from gemma_jax.safetensors_io import read_header
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"a": np.ones((4, 8), np.float32), "b": np.ones((16, 8), np.float32)}, path)
    entry = read_header(path)["b"]
    np.testing.assert_array_equal(entry.rows(3, 9), np.ones((6, 8), np.float32))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 40)
    with pytest.raises(gemma_jax.CheckpointError, match=r"t\.safetensors: cannot read tensor 'b' \(the file is shorter"):
        entry.rows(8, 16)
