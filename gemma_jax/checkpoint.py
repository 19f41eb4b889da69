"""Our checkpoint directory: Orbax params + gemma_config.json + tokenizer files; atomic writes.

Layout of a converted checkpoint:
    params/              Orbax (flat dict: "blocks/3/attn/q" -> array, layouts as in model.py)
    gemma_config.json    {"format": 1, "param_dtype": ..., "config": GemmaConfig.to_dict()}
    tokenizer.model ...  copied from the HF directory when present
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gemma_jax.config import GemmaConfig
from gemma_jax.errors import CheckpointError, ConfigError

FORMAT = 1
CONFIG_FILE = "gemma_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
DTYPE_NAMES = ("float32", "bfloat16")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"blocks": {0: {"attn": {"q": x}}}} -> {"blocks/0/attn/q": x}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of flatten; path parts made of digits become ints (nnx list indices)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def param_shapes(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat name -> ShapeDtypeStruct of a (possibly abstract) model's parameters."""
    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@contextlib.contextmanager
def atomic_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir that replaces it only once the block completes.

    An existing out_dir is refused without force; with force it is removed only after the new
    directory is complete. On any error the temporary directory is removed.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir}: already exists (use --force to replace it)")
    parent = out_dir.parent
    if not parent.is_dir():
        raise CheckpointError(f"{parent}: output parent directory does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{parent}: not writable")
    tmp = parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"{out_dir}: no space left on device while writing") from None
        raise CheckpointError(f"{out_dir}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(directory: Path, config: GemmaConfig, params: dict[str, np.ndarray], param_dtype: str) -> None:
    """Write params (flat dict) with Orbax, then gemma_config.json (written last)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute() / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    meta = {"format": FORMAT, "param_dtype": param_dtype, "config": config.to_dict()}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> tuple[GemmaConfig, str]:
    """(config, param dtype name) of a converted checkpoint; refuses anything else."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        hint = " (it looks like a Hugging Face directory: run 'gemma-jax convert' first)" \
            if (directory / "config.json").is_file() else ""
        raise CheckpointError(f"{directory}: not a gemma_jax checkpoint (no {CONFIG_FILE}){hint}")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
        dtype = meta["param_dtype"]
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: unsupported param_dtype {dtype!r}")
        config = GemmaConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {PARAMS_DIR}/ directory)")
    return config, dtype


def restore(directory: Path, expected: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore the flat params into `expected`'s shapes, dtypes (cast on read) and shardings."""
    path = Path(directory).absolute() / PARAMS_DIR
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(path).item_metadata.tree
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{path}: incomplete or corrupt Orbax checkpoint ({type(e).__name__})") from None
    missing = sorted(set(expected) - set(stored))
    unknown = sorted(set(stored) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{path}: params do not match the config: missing {missing[:3]}, "
                              f"unexpected {unknown[:3]}")
    for name, want in expected.items():
        if tuple(stored[name].shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: param {name!r} has shape {list(stored[name].shape)}, "
                                  f"the config needs {list(want.shape)}")
    try:
        return checkpointer.restore(path, expected)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore params ({type(e).__name__}: {e})".splitlines()[0]) from None
