"""Our checkpoint directory: Orbax params + gemma_config.json + tokenizer files; atomic writes.

Layout of a converted checkpoint:
    params/              Orbax (flat dict: "blocks/3/attn/q" -> array, layouts as in model.py)
    gemma_config.json    {"format": FORMAT, "param_dtype": ..., "config": GemmaConfig.to_dict(),
                          "params_files": {path under params/: size}}  (written last)
    tokenizer.model ...  copied from the HF directory when present

An int8 checkpoint (format QUANT_FORMAT, "quantization": "int8") stores each weight matrix as two
arrays, "NAME/values" (int8 [out..., in], HF's layout; see quant.py) and "NAME/scale" (float32
[out..., 1]); the norms stay float in param_dtype. Float checkpoints stay format FORMAT.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator

from typing import NamedTuple

import jax
import numpy as np
import tensorstore as ts
from flax import nnx
from orbax.checkpoint import v1 as ocp1

from gemma_jax import quant
from gemma_jax.config import GemmaConfig
from gemma_jax.errors import CheckpointError, ConfigError, GemmaError
from gemma_jax.model import weight_in_axis

FORMAT = 3  # 2: embedding stored [D, V], Orbax partial saves; 3: o and down stored [out, in]
QUANT_FORMAT = 4  # format 3 with int8 weights (NAME/values, NAME/scale): older readers refuse it
CONFIG_FILE = "gemma_config.json"
PARAMS_DIR = "params"
_STATE = "state"  # Orbax keeps the pytree's arrays under params/state/ (zarr3 in OCDBT)
_PAGE = 4096
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
DTYPE_NAMES = ("float32", "bfloat16")


def _save_context() -> ocp1.Context:
    """Uncompressed arrays (conversion and loading run at disk speed) in chunks of at most 64 MiB,
    so that a process restoring a sharded model reads little more than its own part of a tensor.
    Host arrays are written in place: save() hands over arrays nobody else modifies, and Orbax's
    defensive copy would double conversion's peak memory."""
    context = ocp1.Context()
    context.array.saving.use_compression = False
    context.array.saving.storage_options.chunk_byte_size = 64 << 20
    context.memory.deepcopy_host_arrays = False
    return context


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"blocks": {0: {"attn": {"q": x}}}} -> {"blocks/0/attn/q": x}; an int8 QArray q becomes
    "blocks/0/attn/q/values" and "blocks/0/attn/q/scale"."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, quant.QArray):
            out[f"{name}/values"], out[f"{name}/scale"] = value.values, value.scale
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any], int8_mode: str | None = None) -> dict:
    """Inverse of flatten (QArrays computed in int8_mode); path parts made of digits become ints
    (nnx list indices)."""
    flat = dict(flat)
    for name in [n for n in flat if n.endswith("/values")]:
        base = name[:-len("/values")]
        flat[base] = quant.QArray(flat.pop(name), flat.pop(f"{base}/scale"), weight_in_axis(base),
                                  int8_mode or "dynamic")
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


def _work_name(out_dir: Path, kind: str, pid: int | None = None) -> str:
    """Name of a sibling that a conversion into out_dir works in: `.NAME.partial-HOST-PID`."""
    return f".{out_dir.name}.{kind}-{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def is_work_dir(path: Path) -> bool:
    """Whether path is a conversion's temporary sibling (unfinished, or a replaced checkpoint)."""
    return re.fullmatch(r"\..+\.(partial|old)-(.+-)?\d+", Path(path).name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out_dir: Path) -> None:
    """Remove what killed conversions on this host left beside out_dir.

    A dead process's `.partial-*` is removed. A dead process's `.old-*` is the checkpoint it was
    replacing (it died between the two renames): it is put back when out_dir is missing.
    """
    prefix = f".{out_dir.name}."
    host = socket.gethostname()
    for path in sorted(out_dir.parent.glob(f"{glob.escape(prefix)}*")):
        m = re.fullmatch(re.escape(prefix) + r"(partial|old)-(.+)-(\d+)", path.name)
        if not m or m[2] != host or _pid_alive(int(m[3])):
            continue
        if m[1] == "old" and not (out_dir.exists() or out_dir.is_symlink()):
            os.rename(path, out_dir)
        else:
            _remove(path)


def _write_error(e: BaseException, out_dir: Path) -> CheckpointError | None:
    """The one-line error for an I/O failure while writing: the OSError itself, or a full disk
    anywhere in the exception's chain (Orbax wraps I/O errors in its own)."""
    if isinstance(e, OSError):
        os_error = e
    else:
        os_error, seen = None, set()
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                os_error = e
                break
            e = e.__cause__ or e.__context__
        if os_error is None:
            return None
    if os_error.errno == errno.ENOSPC:
        return CheckpointError(f"{out_dir}: no space left on device while writing the checkpoint")
    if os_error.errno == errno.EDQUOT:
        return CheckpointError(f"{out_dir}: disk quota exceeded while writing the checkpoint")
    where = f": {os_error.filename}" if os_error.filename else ""
    return CheckpointError(f"{out_dir}: cannot write the checkpoint ({os_error.strerror or os_error}{where})")


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _looks_replaceable(path: Path) -> bool:
    """--force replaces a gemma_jax checkpoint (complete or not) or an empty directory, nothing else."""
    if not path.is_dir():
        return False
    return (path / CONFIG_FILE).exists() or (path / PARAMS_DIR).exists() or not any(path.iterdir())


def check_output_dir(out_dir: Path, force: bool) -> Path:
    """Refuse an output directory that cannot be (re)written, before any work is done.

    Also removes what conversions killed on this host left beside out_dir (see _clean_stale).
    Returns out_dir made absolute.
    """
    out_dir = Path(out_dir).absolute()
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise CheckpointError(f"{parent}: not a directory (cannot create {out_dir.name} in it)")
    if not parent.is_dir():
        raise CheckpointError(f"{parent}: output parent directory does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{parent}: not writable (cannot create {out_dir.name} in it)")
    try:
        _clean_stale(out_dir)
    except OSError:
        pass  # best effort; the conversion itself reports real write errors
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise CheckpointError(f"{out_dir}: already exists (use --force to replace it)")
        if not _looks_replaceable(out_dir):
            raise CheckpointError(f"{out_dir}: exists and is not a gemma_jax checkpoint; not replacing it "
                                  "even with --force (remove it yourself)")
    return out_dir


@contextlib.contextmanager
def atomic_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside out_dir that replaces it only once the block completes.

    An existing out_dir is refused without force; with force it is replaced only after the new
    directory is complete (and only if it is a checkpoint or empty). On any error the temporary
    directory is removed; one left by a killed process is removed by the next conversion.
    """
    out_dir = check_output_dir(out_dir, force)
    parent = out_dir.parent
    tmp = parent / _work_name(out_dir, "partial")
    _remove(tmp)
    try:
        tmp.mkdir()
        yield tmp
        if out_dir.exists() or out_dir.is_symlink():
            if not force:  # made by someone else while this conversion ran
                raise CheckpointError(f"{out_dir}: already exists (created while converting; use --force "
                                      "to replace it)")
            old = parent / _work_name(out_dir, "old")
            _remove(old)
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            _remove(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException as e:
        _remove(tmp)
        error = _write_error(e, out_dir) if isinstance(e, Exception) and not isinstance(e, GemmaError) else None
        if error is None:
            raise
        raise error from None


def save(directory: Path, config: GemmaConfig, groups: Iterable[dict[str, np.ndarray]], param_dtype: str,
         quantization: str | None = None) -> None:
    """Write params (flat dicts, one group at a time: Orbax partial saves, so memory holds one
    group), then gemma_config.json (written last). quantization: None or "int8" (what the groups
    hold)."""
    path = (Path(directory) / PARAMS_DIR).absolute()
    with _save_context():
        for group in groups:
            ocp1.partial.save(path, group)
        ocp1.partial.finalize(path)
    meta = {"format": QUANT_FORMAT if quantization else FORMAT, "param_dtype": param_dtype,
            **({"quantization": quantization} if quantization else {}), "config": config.to_dict(),
            "params_files": _list_files(Path(directory) / PARAMS_DIR)}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _list_files(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under directory (what load checks before Orbax reads)."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _check_files(directory: Path, listed: Any, meta_path: Path) -> None:
    """Every file save() wrote under params/ is there with its size: a deleted or truncated file is
    named here, before Orbax meets it. (Checkpoints without the list skip this check.)"""
    if listed is None:
        return
    if not isinstance(listed, dict) or not all(isinstance(v, int) for v in listed.values()):
        raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata (bad 'params_files')")
    params = directory / PARAMS_DIR
    missing = [name for name in listed if not (params / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint: {PARAMS_DIR}/{missing[0]} is missing "
                              "(convert again)")
    for name, size in listed.items():
        actual = (params / name).stat().st_size
        if actual != size:
            raise CheckpointError(f"{params / name}: truncated or corrupt ({actual} bytes, expected {size}; "
                                  "convert again)")


class CheckpointInfo(NamedTuple):
    config: GemmaConfig
    param_dtype: str                # of the float params (all of them, or the norms of an int8 one)
    quantization: str | None        # None (float) or "int8"


def read_meta(directory: Path) -> tuple[GemmaConfig, str]:
    """(config, param dtype name) of a converted checkpoint; refuses anything else."""
    info = read_info(directory)
    return info.config, info.param_dtype


def read_info(directory: Path) -> CheckpointInfo:
    """Config, param dtype and quantization of a converted checkpoint; refuses anything else."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a checkpoint made by 'gemma-jax convert')")
    if is_work_dir(directory):
        raise CheckpointError(f"{directory}: an unfinished or replaced conversion's temporary directory, "
                              "not a checkpoint (convert again)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        if (directory / PARAMS_DIR).exists():
            raise CheckpointError(f"{directory}: incomplete checkpoint (no {CONFIG_FILE}; convert again)")
        if (directory / "config.json").is_file():
            raise CheckpointError(f"{directory}: a Hugging Face model directory, not a gemma_jax checkpoint "
                                  f"(run 'gemma-jax convert {directory} OUT_DIR' first, then load OUT_DIR)")
        raise CheckpointError(f"{directory}: not a gemma_jax checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (not valid JSON: {e.msg}: line "
                              f"{e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (not UTF-8 text)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (not a JSON object)")
    if meta.get("format") not in (FORMAT, QUANT_FORMAT):
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"(this gemma_jax reads formats {FORMAT} and {QUANT_FORMAT}; convert again)")
    quantization = meta.get("quantization")
    if (meta["format"] == QUANT_FORMAT) != (quantization is not None) or \
            quantization not in (None, *quant.METHODS):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (format {meta['format']} with "
                              f"quantization {quantization!r})")
    for key in ("param_dtype", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: corrupt checkpoint metadata (no {key!r})")
    dtype = meta["param_dtype"]
    if dtype not in DTYPE_NAMES:
        raise CheckpointError(f"{path}: unsupported param_dtype {dtype!r}")
    try:
        config = GemmaConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {PARAMS_DIR}/ directory; convert again)")
    _check_files(directory, meta.get("params_files"), path)
    return CheckpointInfo(config, dtype, quantization)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _checked_params_path(directory: Path, expected: dict[str, jax.ShapeDtypeStruct]) -> Path:
    """params/ of a checkpoint whose stored names and shapes are exactly `expected`'s."""
    path = Path(directory).absolute() / PARAMS_DIR
    try:
        with _quiet_absl():  # Orbax logs its own warning for a damaged directory; ours is the error below
            stored = ocp1.metadata(path).metadata
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{path}: incomplete or corrupt Orbax checkpoint ({_first_line(e)})") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: incomplete or corrupt Orbax checkpoint (cannot read its list of "
                              "params; convert again)")
    missing = sorted(set(expected) - set(stored))
    unknown = sorted(set(stored) - set(expected))
    if missing or unknown:
        first = f"needs param {missing[0]!r}, which is not stored" if missing else \
            f"has no place for stored param {unknown[0]!r}"
        raise CheckpointError(f"{path}: params do not match {CONFIG_FILE}: the config {first} "
                              f"({len(missing)} missing, {len(unknown)} unexpected)")
    for name, want in expected.items():
        if tuple(stored[name].shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: param {name!r} has shape {list(stored[name].shape)}, "
                                  f"{CONFIG_FILE} needs {list(want.shape)}")
    return path


def restore(directory: Path, expected: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore the flat params into `expected`'s shapes, dtypes (cast on read) and shardings."""
    path = _checked_params_path(directory, expected)
    try:
        if all(isinstance(want.sharding, jax.sharding.SingleDeviceSharding) for want in expected.values()):
            return _read_single_device(path, expected)
        with _quiet_absl():
            return ocp1.load(path, expected)
    except Exception as e:
        raise _restore_error(path, e) from None


def _restore_error(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: incomplete or corrupt Orbax checkpoint, cannot restore params "
                           f"({_first_line(e)})")


def restore_quantizing(directory: Path, expected: dict[str, jax.ShapeDtypeStruct], int8_mode: str,
                       shardings: dict[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Restore a float checkpoint as int8, one layer at a time: each layer's float params are read
    on the host (the weights as float32), every weight matrix is quantized (quant.quantize; the
    norms are not), and the arrays are placed per `shardings` (flat storage names: NAME/values and
    NAME/scale for a weight). Memory holds one float layer."""
    path = _checked_params_path(directory, expected)
    groups: dict[str, list[str]] = {}
    for name in expected:
        groups.setdefault("/".join(name.split("/")[:2]) if name.startswith("blocks/") else name, []).append(name)
    params = {}
    for names in groups.values():
        try:
            host = _read_host(path, {n: expected[n] for n in names})
        except Exception as e:
            raise _restore_error(path, e) from None
        for name in names:
            axis = weight_in_axis(name)
            parts = {name: host.pop(name)} if axis is None else \
                flatten({name: quant.quantize(host.pop(name), axis, int8_mode)})
            for part, array in parts.items():
                params[part] = _place(array, shardings[part])
    return params


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array as a jax.Array laid out per sharding (each process supplies its own shards)."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array at a page boundary: XLA's CPU client adopts such a buffer without a copy."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _PAGE, np.uint8)
    start = -raw.ctypes.data % _PAGE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _read_host(path: Path, expected: dict[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
    """TensorStore reads each stored array (Orbax's zarr3-in-OCDBT layout, cast on read) straight
    into a page-aligned host buffer."""
    context = ts.Context()
    state = f"{path.as_uri()}/{_STATE}/"
    stores = {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": state, "path": name}},
                            open=True, read=True, context=context) for name in expected}
    pending = {}
    for name, want in expected.items():
        store = stores[name].result()
        if store.dtype.numpy_dtype != np.dtype(want.dtype):
            store = ts.cast(store, np.dtype(want.dtype))
        out = _aligned_empty(tuple(want.shape), np.dtype(want.dtype))
        pending[name] = (out, ts.array(out, copy=False, write=True).write(store))
    for out, written in pending.values():
        written.result()
    return {name: out for name, (out, _) in pending.items()}


def _read_single_device(path: Path, expected: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore onto one device without Orbax's intermediate copies: host buffers (_read_host) that
    the device then adopts (on CPU without a copy: loading costs one pass over the bytes)."""
    host = _read_host(path, expected)
    return {name: jax.device_put(out, expected[name].sharding, may_alias=True) for name, out in host.items()}
