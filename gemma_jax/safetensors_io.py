"""A strict, streaming safetensors reader: header checked against the file, tensors read in row blocks."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma_jax.errors import CheckpointError

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    key: str = ""

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor, read into a fresh array (no memory map, so a tensor read
        block by block never holds more than one block resident)."""
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        row_bytes = out.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        try:
            with open(self.file, "rb", buffering=0) as f:
                f.seek(self.offset + start * row_bytes)
                view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
                while done < out.nbytes:
                    got = f.readinto(view[done:])
                    if not got:
                        break
                    done += got
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {self.key!r} ({e.strerror or e})") from None
        if done != out.nbytes:
            raise CheckpointError(f"{self.file}: cannot read tensor {self.key!r} (the file is shorter than "
                                  "its header says; was it changed while converting?)")
        return out


def unique_keys(on_duplicate):
    """A json `object_pairs_hook` that raises `on_duplicate(key)` for a key seen twice."""
    def hook(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise on_duplicate(next(k for i, k in enumerate(keys) if k in keys[:i]))
        return dict(pairs)
    return hook


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a .safetensors header; every error names the file (and tensor)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: corrupt safetensors header (says it is {n} bytes long; "
                                      "not a safetensors file?)")
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file: the header needs {n + 8} bytes "
                                      f"but the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys(
            lambda key: CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} appears twice")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}") from None
        if not (isinstance(info["shape"], list) and all(map(_is_uint, shape)) and _is_uint(begin)
                and _is_uint(end)):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r} "
                                  f"(shape {info['shape']!r}, data_offsets {info['data_offsets']!r})")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype_name} "
                                  f"(supported: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype_name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin > end or end - begin != nbytes:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r} "
                                  f"(offsets {begin}..{end} do not fit shape {list(shape)} {dtype_name})")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {key!r} ends at byte "
                                  f"{data_start + end} but the file has {size} bytes")
        entries[key] = TensorEntry(Path(path), dtype, shape, data_start + begin, key)
    return entries
