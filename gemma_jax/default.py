"""The default model shipped in the package: a tiny Gemma 2 trained on the Python standard
library by scripts/train_tiny.py, stored in Hugging Face format so that the default run goes
through the real path: convert (once, into a cache directory) -> load -> generate."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gemma_jax.errors import CheckpointError

HF_DIR = Path(__file__).parent / "default_model"
DESCRIPTION = "the built-in default model (a tiny Gemma 2 trained on the Python standard library)"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma_jax"


def fingerprint() -> str:
    """A short hash of the shipped files and the checkpoint format: a changed model, or a gemma_jax
    that stores params differently, converts into a new directory."""
    from gemma_jax.checkpoint import FORMAT
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        path = HF_DIR / name
        if not path.is_file():
            raise CheckpointError(f"{path}: the default model is missing from this installation")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def checkpoint_dir(progress=None) -> Path:
    """The converted default model's directory, converting it on first use (a second or two)."""
    from gemma_jax.convert import convert
    out = cache_root() / f"default-{fingerprint()}"
    if not (out / "gemma_config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(HF_DIR, out, force=True, progress=progress)
    return out


def load_default(dtype: str = "float32"):
    """The built-in default model, loaded (converted on first use): `gemma_jax.load_default()`."""
    from gemma_jax.api import load
    return load(checkpoint_dir(), dtype=dtype)
