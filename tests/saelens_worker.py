"""Run by tests/test_saelens.py in a subprocess whose path has SAELens (and the transformer-lens < 4 it
needs) in front: SAELens's own SAEs saved with SAELens's `save_model`, and SAELens's encodings of
them and of the SAEs gemma_jax wrote.

    python saelens_worker.py WORKDIR

WORKDIR/inputs.npz holds the inputs (x_res [N, d], x_z [N, heads, head_dim]); WORKDIR/ours/NAME are
SAE directories written by gemma_jax. Writes WORKDIR/saelens/NAME (SAELens's SAE, plus out.npz) and
WORKDIR/ours/NAME/saelens_out.npz ('feats' and 'out' as SAELens computes them).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch


def build(name, spec, d_res, d_z):
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata
    kind = spec["architecture"]
    d_in = d_z if spec.get("hook_z") else d_res
    meta = SAEMetadata(hook_name=spec["hook_name"], model_name="tiny-gemma2",
                          **({"hook_name_out": spec["hook_name_out"]} if "hook_name_out" in spec else {}))
    common = dict(d_in=d_in, d_sae=spec["d_sae"], dtype="float32", device="cpu", metadata=meta,
                  apply_b_dec_to_input=spec.get("apply_b_dec_to_input", False),
                  reshape_activations="hook_z" if spec.get("hook_z") else "none")
    if kind == "standard":
        sae = sl.StandardSAE(sl.StandardSAEConfig(**common))
    elif kind == "jumprelu":
        sae = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common))
    elif kind == "topk":
        sae = sl.TopKSAE(sl.TopKSAEConfig(**common, k=spec["k"], rescale_acts_by_decoder_norm=spec["rescale"]))
    elif kind == "jumprelu_transcoder":
        common["apply_b_dec_to_input"] = False
        sae = sl.JumpReLUTranscoder(sl.JumpReLUTranscoderConfig(**common, d_out=d_res))
    else:
        raise ValueError(kind)
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for pname, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if pname.startswith("W") else 0.1))
            if pname == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.6)
    return sae.eval()


def run(sae, x):
    with torch.no_grad():
        feats = sae.encode(torch.as_tensor(x))
        out = sae.decode(feats)
    return {"feats": feats.numpy(), "out": out.numpy()}


def main(work: Path) -> None:
    import sae_lens as sl
    inputs = dict(np.load(work / "inputs.npz"))
    specs = json.loads((work / "specs.json").read_text())
    d_res, d_z = inputs["x_res"].shape[-1], int(np.prod(inputs["x_z"].shape[-2:]))
    for name, spec in specs.items():
        sae = build(name, spec, d_res, d_z)
        target = work / "saelens" / name
        sae.save_model(target)
        np.savez(target / "out.npz", **run(sae, inputs["x_z" if spec.get("hook_z") else "x_res"]))
    for directory in sorted((work / "ours").iterdir()):
        sae = sl.SAE.load_from_disk(directory).eval()
        x = inputs["x_z" if sae.cfg.reshape_activations == "hook_z" else "x_res"]
        np.savez(directory / "saelens_out.npz", **run(sae, x), architecture=sae.cfg.architecture(),
                 hook_name=str(sae.cfg.metadata.hook_name))
    print(f"sae_lens {sl.__version__} from {sl.__file__}")


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
