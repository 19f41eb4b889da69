"""Tiny random HF Gemma 2 models as the oracle: every weight randomized, norms included."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            sliding_window=4, max_position_embeddings=64, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, rope_theta=10000.0, rms_norm_eps=1e-6)


def hf_model(seed: int = 0, dtype=torch.float32, embed_std: float = 1.0, **overrides) -> transformers.Gemma2ForCausalLM:
    """A randomly initialised Gemma2ForCausalLM with eager attention; weights large enough that the
    soft-caps and the (1 + w) norm convention matter."""
    kwargs = {**TINY, **overrides}
    rope_theta = kwargs.pop("rope_theta")
    config = transformers.Gemma2Config(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                                       attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "embed" in name:
                p.copy_(torch.randn_like(p) * embed_std)
            else:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5) * 1.5)
    return model.to(dtype)


def save(model, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return Path(directory)


def hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        ids = torch.as_tensor(ids, dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def hf_generate(hf, prompt, n, eos=None):
    """HF greedy continuation of one prompt alone (includes eos when it stops on it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          temperature=None, top_k=None, top_p=None)
    return out[0, len(prompt):].tolist()


# A tiny shape whose sampled text over the real vocabulary is varied (Japanese included)
TINY_REAL_VOCAB = dict(embed_std=0.1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8)


def with_real_tokenizer(root: Path, **overrides) -> Path:
    """A tiny HF model with the real Gemma 2 vocabulary (tokenizer.model copied in), converted;
    skips the calling test when GEMMA_JAX_TOKENIZER_DIR is not set."""
    import pytest

    import gemma_jax
    source = Path(os.environ.get("GEMMA_JAX_TOKENIZER_DIR") or "/nonexistent") / "tokenizer.model"
    if not source.is_file():
        pytest.skip("needs GEMMA_JAX_TOKENIZER_DIR (the real Gemma 2 tokenizer.model)")
    save(hf_model(**{"vocab_size": 256000, **overrides}), root / "hf")
    shutil.copy(source, root / "hf" / "tokenizer.model")
    gemma_jax.convert(root / "hf", root / "ckpt")
    return root / "ckpt"
