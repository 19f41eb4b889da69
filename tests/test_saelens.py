"""SAEs in SAELens's on-disk format: our round trip, SAEs saved by SAELens itself (loaded and encoded
identically), our files read back by SAELens, Gemma Scope transcoders (ln2.hook_normalized ->
hook_mlp_out) and attention SAEs on hook_z (head-major flattening) spliced into the forward.

SAELens 6 needs transformer-lens < 4, which cannot be installed next to the 4.3 of the test extra,
so SAELens runs in a subprocess with GEMMA_JAX_SAELENS_PATH (a `pip install --target` directory
holding sae-lens and transformer-lens 3.x, made by .ci/run) in front of this venv's packages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax import interp
from gemma_jax import sae as saelib
from gemma_jax.errors import CheckpointError, GenerationError
from hf_oracle import hf_model, save

T = 16
SAELENS = os.environ.get("GEMMA_JAX_SAELENS_PATH")
# name -> the SAE SAELens builds (tests/saelens_worker.py) and the one we build, alike in kind
SPECS = {
    "jumprelu_res": dict(architecture="jumprelu", hook_name="blocks.1.hook_resid_post", d_sae=64, seed=1),
    "standard_res": dict(architecture="standard", hook_name="blocks.1.hook_resid_post", d_sae=64, seed=2,
                         apply_b_dec_to_input=True),
    "topk_res": dict(architecture="topk", hook_name="blocks.1.hook_resid_post", d_sae=64, seed=3, k=8, rescale=False),
    "topk_rescaled": dict(architecture="topk", hook_name="blocks.1.hook_resid_post", d_sae=64, seed=4, k=8,
                          rescale=True),
    "jumprelu_att": dict(architecture="jumprelu", hook_name="blocks.1.attn.hook_z", d_sae=64, seed=5, hook_z=True),
    "transcoder": dict(architecture="jumprelu_transcoder", hook_name="blocks.1.ln2.hook_normalized",
                       hook_name_out="blocks.1.hook_mlp_out", d_sae=64, seed=6),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_model")
    save(hf_model(seed=21, embed_std=0.1), root / "hf")
    gemma_jax.convert(root / "hf", root / "ckpt")
    return gemma_jax.load(root / "ckpt")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(0, 128, (2, T))


@pytest.fixture(scope="module")
def acts(tiny, ids):
    _, cache = tiny.run_with_cache(ids, names=["blocks.1.hook_resid_post", "blocks.1.attn.hook_z",
                                               "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    return {k: np.asarray(v) for k, v in cache.items()}


def _ours(spec, d_res, z_shape, seed=None) -> saelib.SAE:
    """A random SAE of ours shaped like `spec`."""
    rng = np.random.default_rng(100 + (seed if seed is not None else spec["seed"]))
    d_in = int(np.prod(z_shape)) if spec.get("hook_z") else d_res
    f = spec["d_sae"]
    arrays = dict(W_enc=rng.normal(size=(d_in, f)) * 0.3, W_dec=rng.normal(size=(f, d_in if spec["architecture"] !=
                  "jumprelu_transcoder" else d_res)) * 0.3, b_enc=rng.normal(size=f) * 0.1)
    arrays["b_dec"] = rng.normal(size=arrays["W_dec"].shape[1]) * 0.1
    if "jumprelu" in spec["architecture"]:
        arrays["threshold"] = rng.uniform(0, 0.6, f)
    return saelib.SAE(**arrays, architecture=spec["architecture"], k=spec.get("k"),
                      apply_b_dec_to_input=spec.get("apply_b_dec_to_input", False),
                      rescale_acts_by_decoder_norm=spec.get("rescale", False), hook_name=spec["hook_name"],
                      hook_name_out=spec.get("hook_name_out"))


def _inputs(acts):
    return {"x_res": acts["blocks.1.hook_resid_post"].reshape(-1, acts["blocks.1.hook_resid_post"].shape[-1]),
            "x_z": acts["blocks.1.attn.hook_z"].reshape(-1, *acts["blocks.1.attn.hook_z"].shape[-2:])}


def _x(inputs, sae):
    return inputs["x_z"] if sae.hook_z else inputs["x_res"]


def test_saelens_format_round_trip(tmp_path, acts):
    inputs = _inputs(acts)
    for name, spec in SPECS.items():
        ours = _ours(spec, inputs["x_res"].shape[-1], inputs["x_z"].shape[1:])
        back = saelib.SAE.load(ours.save(tmp_path / name, model_name="tiny"))
        for field in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            a, b = getattr(ours, field), getattr(back, field)
            assert (a is None) == (b is None), field
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name}.{field}")
        for field in ("architecture", "k", "apply_b_dec_to_input", "rescale_acts_by_decoder_norm", "hook_name",
                      "hook_name_out"):
            assert getattr(back, field) == getattr(ours, field), f"{name}.{field}"
        assert back.metadata["model_name"] == "tiny"
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        assert cfg["architecture"] == spec["architecture"] and cfg["metadata"]["hook_name"] == spec["hook_name"]
        assert cfg["reshape_activations"] == ("hook_z" if spec.get("hook_z") else "none")
        x = _x(inputs, ours)
        np.testing.assert_array_equal(np.asarray(back.encode(x)), np.asarray(ours.encode(x)))
        feats = np.asarray(ours.encode(x))
        assert 0 < (feats > 0).mean() < 1, name
        if spec["architecture"] == "topk":
            assert ((feats > 0).sum(-1) <= spec["k"]).all() and ((feats > 0).sum(-1) == spec["k"]).any()
    with pytest.raises(CheckpointError, match="already exists"):
        ours.save(tmp_path / name)


@pytest.fixture(scope="module")
def saelens_run(tmp_path_factory, acts):
    """SAELens itself: saves its SAEs and encodes them and ours (tests/saelens_worker.py)."""
    if not SAELENS:
        pytest.skip("needs GEMMA_JAX_SAELENS_PATH: a directory with sae-lens and transformer-lens 3.x "
                    "(.ci/run makes it; see docs/interpretability.md)")
    work = tmp_path_factory.mktemp("saelens")
    inputs = _inputs(acts)
    np.savez(work / "inputs.npz", **inputs)
    (work / "specs.json").write_text(json.dumps(SPECS))
    for name, spec in SPECS.items():
        _ours(spec, inputs["x_res"].shape[-1], inputs["x_z"].shape[1:], seed=spec["seed"] + 50).save(
            work / "ours" / name)
    env = {**os.environ, "PYTHONPATH": SAELENS, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("saelens_worker.py")), str(work)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    where = done.stdout.split(" from ")[-1].strip()          # SAELens itself, from that directory
    assert any(where.startswith(str(Path(p).resolve())) for p in SAELENS.split(os.pathsep) if p), done.stdout
    return work, inputs


def test_sae_saved_by_saelens_loads_and_encodes_identically(saelens_run, report):
    work, inputs = saelens_run
    worst = {}
    for name, spec in SPECS.items():
        sae = saelib.SAE.load(work / "saelens" / name)
        assert (sae.architecture, sae.hook_name, sae.k) == (spec["architecture"], spec["hook_name"], spec.get("k"))
        assert sae.apply_b_dec_to_input == spec.get("apply_b_dec_to_input", False)
        assert sae.hook_name_out == spec.get("hook_name_out")
        ref = np.load(work / "saelens" / name / "out.npz")
        x = _x(inputs, sae)
        feats = np.asarray(sae.encode(x))
        assert ((feats > 0) == (ref["feats"] > 0)).all(), name          # the same features fire
        out = np.asarray(sae.decode(feats)).reshape(ref["out"].shape)   # hook_z: SAELens gives [.., N, H]
        worst[name] = max(float(np.abs(feats - ref["feats"]).max()), float(np.abs(out - ref["out"]).max()))
        assert 0 < (ref["feats"] > 0).mean() < 1, name
    for name, value in worst.items():
        report(f"SAELens-saved SAE vs SAELens encode/decode max|diff| {name}", value)
    assert max(worst.values()) <= 1e-5


def test_saelens_reads_our_files_identically(saelens_run):
    work, inputs = saelens_run
    for name, spec in SPECS.items():
        ours = saelib.SAE.load(work / "ours" / name)
        ref = np.load(work / "ours" / name / "saelens_out.npz")
        assert str(ref["architecture"]) == spec["architecture"] and str(ref["hook_name"]) == spec["hook_name"]
        feats = np.asarray(ours.encode(_x(inputs, ours)))
        assert ((feats > 0) == (ref["feats"] > 0)).all(), name
        np.testing.assert_allclose(feats, ref["feats"], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(np.asarray(ours.decode(feats)).reshape(ref["out"].shape), ref["out"],
                                   atol=1e-5, rtol=0, err_msg=name)


# -------------------------------------------------------------------------------- in the forward
def test_transcoder_splices_ln2_normalized_into_mlp_out(tmp_path, tiny, ids, acts):
    """A Gemma Scope transcoder (params.npz; site_for('transcoder', L)) reads ln2.hook_normalized and
    replaces hook_mlp_out; with the error term the run is unchanged."""
    spec = SPECS["transcoder"]
    made = _ours(spec, acts["blocks.1.hook_resid_post"].shape[-1], None)
    np.savez(tmp_path / "params.npz", **{k: np.asarray(getattr(made, k)) for k in
                                         ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    site = saelib.site_for("transcoder", 1)
    sae = saelib.SAE.load(tmp_path / "params.npz", hook_name=site)
    assert (sae.architecture, sae.hook_name_out) == ("jumprelu_transcoder", "blocks.1.hook_mlp_out")
    hooks = saelib.splice_hooks(sae)
    assert list(hooks) == [site, "blocks.1.hook_mlp_out"]
    logits, cache = interp.run(tiny, ids, ["blocks.1.hook_mlp_out"], hooks)
    want = np.asarray(sae.decode(sae.encode(acts[site])))
    np.testing.assert_allclose(np.asarray(cache["blocks.1.hook_mlp_out"]), want, atol=1e-5, rtol=0)
    plain = tiny.logits(ids)
    assert np.abs(np.asarray(logits) - plain).max() > 1e-2
    exact, stats = saelib.splice(tiny, ids, sae, use_error_term=True)
    np.testing.assert_allclose(exact, plain, atol=1e-5, rtol=0)
    target = acts["blocks.1.hook_mlp_out"].reshape(-1, want.shape[-1])
    ve = 1 - ((target - want.reshape(target.shape)) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    np.testing.assert_allclose(stats["variance_explained"], ve, rtol=1e-4)


def test_attention_sae_on_hook_z(tiny, ids, acts):
    """hook_z [B, T, N, H] is flattened head-major for the SAE and the reconstruction put back in
    that shape; steering adds the decoder row as [N, H]."""
    spec = SPECS["jumprelu_att"]
    z = acts["blocks.1.attn.hook_z"]
    sae = _ours(spec, None, z.shape[-2:])
    assert sae.d_in == z.shape[-2] * z.shape[-1] and sae.hook_z
    feats = np.asarray(sae.encode(z))
    np.testing.assert_array_equal(feats, np.asarray(sae.encode(z.reshape(*z.shape[:2], -1))))
    _, cache = interp.run(tiny, ids, ["blocks.1.attn.hook_z"], saelib.splice_hooks(sae))
    np.testing.assert_allclose(np.asarray(cache["blocks.1.attn.hook_z"]), np.asarray(sae(z)), atol=1e-5, rtol=0)
    assert np.asarray(sae(z)).shape == z.shape
    _, steered = interp.run(tiny, ids, ["blocks.1.attn.hook_z"],
                            {"blocks.1.attn.hook_z": saelib.steering_hook(sae, 3, 2.0)})
    np.testing.assert_allclose(np.asarray(steered["blocks.1.attn.hook_z"]),
                               z + 2.0 * np.asarray(sae.W_dec[3]).reshape(z.shape[-2:]), atol=1e-5, rtol=0)
    logits, stats = saelib.splice(tiny, ids, sae, use_error_term=True)
    np.testing.assert_allclose(logits, tiny.logits(ids), atol=1e-5, rtol=0)
    assert stats["l0"].shape == (2, T)


def test_saelens_load_errors(tmp_path, acts):
    inputs = _inputs(acts)
    good = _ours(SPECS["jumprelu_res"], inputs["x_res"].shape[-1], None).save(tmp_path / "good")
    cfg = json.loads((good / "cfg.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "cfg.json").write_text(json.dumps({**cfg, **changes}))
        (d / "sae_weights.safetensors").write_bytes((good / "sae_weights.safetensors").read_bytes())
        return d
    with pytest.raises(CheckpointError, match="architecture 'gated' is not supported"):
        saelib.SAE.load(variant("gated", architecture="gated"))
    with pytest.raises(CheckpointError, match="normalize_activations 'layer_norm' is not supported"):
        saelib.SAE.load(variant("ln", normalize_activations="layer_norm"))
    with pytest.raises(CheckpointError, match="sae_weights.safetensors: missing"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "cfg.json").write_text("{}")
        saelib.SAE.load(tmp_path / "empty")
    standard = _ours(SPECS["standard_res"], inputs["x_res"].shape[-1], None).save(tmp_path / "standard")
    (standard / "cfg.json").write_text((standard / "cfg.json").read_text().replace('"standard"', '"jumprelu"'))
    with pytest.raises(CheckpointError, match="threshold has shape None, expected"):
        saelib.SAE.load(standard)
    with pytest.raises(CheckpointError, match="topk SAE needs 0 < k"):
        saelib.SAE.load(variant("topk", architecture="topk", k=0))
    with pytest.raises(GenerationError, match="SAE input width"):
        _ours(SPECS["jumprelu_res"], inputs["x_res"].shape[-1], None).encode(jnp.zeros((3, 5)))
