"""`gemma-jax parity --hf HF_DIR`: check our numbers against HF transformers on one's own weights.

The same weights go through our converter and forward pass first, then through HF (eager attention,
float32), one model in memory at a time. Reported: max |difference| of the residual stream entering
every layer, of the final-normed state and of the logits, and the argmax agreement. A checkpoint
that stores bfloat16 while the HF directory holds wider weights differs by bf16 rounding, and the
report says so.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np

from gemma_jax import checks


def hf_activations(hf_dir: Path, ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(hidden states entering each layer + final-normed state, logits) from HF in float32."""
    checks.importable(("torch", "transformers"), "parity")
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    model = transformers.Gemma2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    logits = out.logits.float().numpy()
    del model, out
    gc.collect()
    return hidden, logits


def prompt_ids(model, texts: list[str], length: int, seed: int) -> np.ndarray:
    """Token ids [B, T]: the texts' tokens when there is a tokenizer, else random ids."""
    rng = np.random.default_rng(seed)
    if model.tokenizer is not None and texts:
        rows = [model.tokenizer.encode(" ".join([t] * length))[:length] for t in texts]  # repeated to length
        width = min(map(len, rows))
        return np.asarray([r[:width] for r in rows])
    return rng.integers(3, model.config.vocab_size, (2, length))


def check(hf_dir: str | Path, ckpt: str | Path | None = None, texts=("The capital of Japan is", "日本の首都は東京です。"),
          length: int = 64, seed: int = 0) -> dict:
    """Figures comparing HF and gemma_jax on the same weights (float32 on both sides)."""
    import gemma_jax
    from gemma_jax import checkpoint, interp
    from gemma_jax.convert import read_hf_config, tensor_entries
    hf_dir = Path(hf_dir).expanduser()
    checks.importable(("torch", "transformers"), "parity")      # before any work, as the paths
    read_hf_config(hf_dir)
    hf_dtypes = sorted({str(e.dtype) for e in tensor_entries(hf_dir).values()})
    ckpt_dtype = "float32" if ckpt is None else checkpoint.read_meta(Path(ckpt).expanduser())[1]
    with tempfile.TemporaryDirectory(prefix="gemma_jax_parity_") as tmp:
        if ckpt is None:
            ckpt = Path(tmp) / "ckpt"
            gemma_jax.convert(hf_dir, ckpt, dtype="float32")
        ckpt = Path(ckpt).expanduser()
        ours = gemma_jax.load(ckpt, dtype="float32")
        ids = prompt_ids(ours, list(texts), length, seed)
        names = [f"blocks.{i}.hook_resid_pre" for i in range(ours.config.num_hidden_layers)]
        logits, acts = interp.run_with_cache(ours, ids, names + ["ln_final.hook_out"])
        del ours
        gc.collect()
    hidden, hf_logits = hf_activations(hf_dir, ids)
    layers = [float(np.abs(acts[n] - h).max()) for n, h in zip(names, hidden)]
    return {"tokens": list(ids.shape), "layers": layers,
            "final_norm": float(np.abs(acts["ln_final.hook_out"] - hidden[-1]).max()),
            "logits": float(np.abs(logits - hf_logits).max()),
            "logit_scale": float(np.abs(hf_logits).max()),
            "argmax_agreement": float((logits.argmax(-1) == hf_logits.argmax(-1)).mean()),
            "ckpt_dtype": ckpt_dtype, "hf_dtypes": hf_dtypes}


def explanation(figures: dict) -> str:
    """A note when the checkpoint was rounded to bfloat16 and the HF weights were not ('' otherwise)."""
    if figures.get("ckpt_dtype") == "bfloat16" and figures.get("hf_dtypes", ["bfloat16"]) != ["bfloat16"]:
        return (f" (the checkpoint stores bfloat16 and the HF directory {'/'.join(figures['hf_dtypes'])}: "
                "bf16 rounding of the weights explains a difference of this size; convert with --dtype float32, "
                "or omit --ckpt, to compare exactly)")
    return ""


def format_report(figures: dict, tolerance: float) -> str:
    lines = [f"parity with HF transformers (eager, float32) on {figures['tokens'][0]} x {figures['tokens'][1]} tokens"]
    for i, d in enumerate(figures["layers"]):
        lines.append(f"  residual entering layer {i:>2}: max |diff| {d:.2e}")
    lines.append(f"  final norm:                max |diff| {figures['final_norm']:.2e}")
    lines.append(f"  logits:                    max |diff| {figures['logits']:.2e} (largest |logit| "
                 f"{figures['logit_scale']:.1f}), argmax agreement {100 * figures['argmax_agreement']:.2f}%")
    ok = figures["logits"] <= tolerance
    lines.append((f"PASS: logits within {tolerance:g}" if ok else
                  f"FAIL: logits differ by more than {tolerance:g}") + explanation(figures))
    return "\n".join(lines)
