"""Logit parity with HF transformers (eager) through the real path:
HF model -> save_pretrained -> convert -> load -> logits."""

import numpy as np
import pytest
import torch

import gemma_jax
from hf_oracle import hf_logits, hf_model, save

# Each case exercises something that broke other ports; windows of a few tokens, sequences >= 3x.
CASES = {
    "gqa2_odd_layers": dict(),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "heads_x_dim_ne_hidden": dict(hidden_size=40, num_attention_heads=4, head_dim=16),
    "scalar_27b_style": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             query_pre_attn_scalar=12),
    "scalar_jpn_it_style": dict(query_pre_attn_scalar=14, num_hidden_layers=4),
    "caps_theta_eps": dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0, rope_theta=500.0,
                           rms_norm_eps=1e-3, sliding_window=3),
    "no_softcaps": dict(attn_logit_softcapping=None, final_logit_softcapping=None),
    "explicit_layer_types": dict(num_hidden_layers=5, layer_types=["full_attention", "sliding_attention",
                                 "sliding_attention", "full_attention", "sliding_attention"]),
}
SEQ = 19  # >= 3x every window above


def _converted(tmp_path_factory, name, dtype=torch.float32, out_dtype=None, **overrides):
    root = tmp_path_factory.mktemp(name)
    model = hf_model(seed=len(name), dtype=dtype, **overrides)
    save(model, root / "hf", max_shard_size="20KB" if hash(name) % 2 else None)
    gemma_jax.convert(root / "hf", root / "ckpt", dtype=out_dtype)
    return model, gemma_jax.load(root / "ckpt")


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(tmp_path_factory, name, report):
    hf, ours = _converted(tmp_path_factory, name, **CASES[name])
    assert ours.config.sliding_window * 3 <= SEQ
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, SEQ))
    diff = np.abs(ours.logits(ids) - hf_logits(hf, ids)).max()
    report(f"parity float32 max|dlogit| {name}", diff)
    assert diff <= 2e-4


def test_config_comes_from_checkpoint(tmp_path_factory):
    _, ours = _converted(tmp_path_factory, "cfg", **CASES["caps_theta_eps"])
    c = ours.config
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.rope_theta, c.rms_norm_eps,
            c.sliding_window) == (5.0, 3.0, 500.0, 1e-3, 3)


def test_sharded_and_single_file_agree(tmp_path):
    model = hf_model(seed=3)
    save(model, tmp_path / "one")
    save(model, tmp_path / "many", max_shard_size="10KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    outs = []
    for d in ("one", "many"):
        gemma_jax.convert(tmp_path / d, tmp_path / f"{d}-ckpt")
        outs.append(gemma_jax.load(tmp_path / f"{d}-ckpt").logits([[5, 6, 7, 8, 9, 10]]))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_unpadded(tmp_path_factory, side, report):
    hf, ours = _converted(tmp_path_factory, f"pad_{side}")
    rng = np.random.default_rng(1)
    lengths = [SEQ, 13, 5, 1]
    rows = [rng.integers(1, ours.config.vocab_size, n) for n in lengths]
    ids = np.zeros((len(rows), SEQ), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(SEQ - len(row), SEQ)
        ids[i, sl], mask[i, sl] = row, 1
    batched = ours.logits(ids, attention_mask=mask)
    assert np.isfinite(batched).all()
    worst = 0.0
    for i, row in enumerate(rows):
        alone = ours.logits(row[None])[0]
        real = batched[i][mask[i].astype(bool)]
        np.testing.assert_allclose(real, alone, atol=1e-5, rtol=0)
        worst = max(worst, float(np.abs(real - hf_logits(hf, row[None])[0]).max()))
    report(f"parity padded ({side}) max|dlogit| vs HF unpadded", worst)
    assert worst <= 2e-4


def test_bfloat16_argmax_agreement(tmp_path_factory, report):
    hf, ours = _converted(tmp_path_factory, "bf16", dtype=torch.bfloat16, vocab_size=256, num_hidden_layers=4)
    assert ours.model.embedder.embedding[...].dtype == np.dtype("bfloat16")  # kept the dtype on disk
    ids = np.random.default_rng(2).integers(0, 256, (4, 64))
    a, b = ours.logits(ids), hf_logits(hf, ids)
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    report("parity bfloat16 argmax agreement", agree)
    report("parity bfloat16 max|dlogit|", float(np.abs(a - b).max()))
    assert agree >= 0.99


def test_parity_command(tmp_path, capsys):
    """`gemma-jax parity` passes on a faithful conversion and fails (exit 2) on a damaged one."""
    import json

    from gemma_jax import cli
    model = hf_model(seed=9, embed_std=0.1)
    save(model, tmp_path / "hf")
    assert cli.main(["--no-compile-cache", "parity", "--hf", str(tmp_path / "hf"), "--length", "19"]) == 0
    out = capsys.readouterr().out
    assert "residual entering layer  2" in out and "PASS" in out
    # a checkpoint whose final norm was damaged: the report says where the numbers part
    gemma_jax.convert(tmp_path / "hf", tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "gemma_config.json").read_text())
    meta["config"]["rms_norm_eps"] = 0.5
    (tmp_path / "ckpt" / "gemma_config.json").write_text(json.dumps(meta))
    assert cli.main(["--no-compile-cache", "parity", "--hf", str(tmp_path / "hf"), "--ckpt",
                     str(tmp_path / "ckpt"), "--length", "19"]) == 2
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "parity: logits differ" in captured.err
