"""Activation datasets for SAE training: text files -> fixed-length token rows -> the activations at
chosen hook sites, written as safetensors shards of bounded size with a manifest.

Rows are SAELens-style: the files' tokens form one stream, documents separated by BOS, cut into rows
of `seq_len` tokens that each start with BOS (an incomplete last row is dropped). Every shard holds
`tokens` [rows, seq_len] int32 and one tensor per site [rows, seq_len, ...] (float32 or float16).

Memory is bounded by one batch whatever the corpus size: text is read and tokenized in chunks,
each batch's activations are written straight into their place in the shard file, and nothing is
kept. Every batch has the same shape (the last is padded), so the run compiles once. The manifest
is rewritten (atomically) after each finished shard, so an interrupted capture resumes where it
stopped: the same command skips the rows already written and produces the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gemma_jax import hooks as hooks_lib
from gemma_jax.errors import CheckpointError, GenerationError, TokenizerError

MANIFEST = "manifest.json"
FORMAT = 1
_NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}
_CHUNK = 1 << 16   # characters of text read and tokenized at a time


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """What to capture: sites (names or patterns), row length, rows per forward, storage dtype, the
    largest shard in bytes, and optionally a cap on the number of rows."""

    sites: tuple[str, ...]
    seq_len: int = 128
    batch_size: int = 8
    dtype: str = "float32"
    shard_bytes: int = 256 << 20
    max_rows: int | None = None

    def check(self) -> None:
        if self.dtype not in _NP:
            raise GenerationError(f"capture dtype must be float32 or float16, got {self.dtype!r}")
        for name, value, low in (("seq_len", self.seq_len, 2), ("batch_size", self.batch_size, 1),
                                 ("shard_bytes", self.shard_bytes, 1)):
            if not isinstance(value, int) or value < low:
                raise GenerationError(f"capture {name} must be an integer >= {low}, got {value!r}")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise GenerationError(f"capture max_rows must be an integer >= 1, got {self.max_rows!r}")


# ------------------------------------------------------------------------------------ rows
def _text_chunks(path: Path) -> Iterator[tuple[str, int]]:
    """(text, bytes) in chunks of about _CHUNK characters, cut after a blank line where there is one
    (else after a newline): only text across a cut is tokenized differently from the whole file."""
    try:
        with open(path, encoding="utf-8") as f:
            carry = ""
            while True:
                block = f.read(_CHUNK)
                text = carry + block
                if not block:
                    if text:
                        yield text, len(text.encode())
                    return
                cut = text.rfind("\n\n") + 2
                cut = cut if cut > 1 else text.rfind("\n") + 1
                if cut == 0:
                    carry = text
                    continue
                carry = text[cut:]
                yield text[:cut], len(text[:cut].encode())
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GenerationError(f"{path}: cannot read ({e.strerror or e})") from None


def token_rows(tokenizer, files: Iterable[Path], seq_len: int,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """[seq_len] int32 rows: BOS, then the next seq_len - 1 tokens of the BOS-separated files."""
    bos = np.asarray([tokenizer.bos_id], np.int32)
    buffer = np.zeros(0, np.int32)
    for i, path in enumerate(files):
        if i:
            buffer = np.concatenate([buffer, bos])
        for text, nbytes in _text_chunks(Path(path)):
            buffer = np.concatenate([buffer, np.asarray(tokenizer.encode(text, add_bos=False), np.int32)])
            if on_bytes is not None:
                on_bytes(nbytes)
            n = (len(buffer) // (seq_len - 1)) * (seq_len - 1)
            for start in range(0, n, seq_len - 1):
                yield np.concatenate([bos, buffer[start:start + seq_len - 1]])
            buffer = buffer[n:]


# --------------------------------------------------------------------------------- shards
class _ShardFile:
    """A safetensors file written in place: the header for `rows` rows first, then each batch's rows
    at their offsets. `finish(n)` keeps n rows (copying into a smaller file when n < rows)."""

    def __init__(self, path: Path, specs: dict[str, tuple[np.dtype, tuple[int, ...]]], rows: int):
        self.path, self.specs, self.rows = path, specs, rows
        self.partial = path.with_name(path.name + ".partial")
        self.header, self.offsets = _header(specs, rows)
        self.file = open(self.partial, "wb")
        self.file.write(self.header)
        self.file.truncate(len(self.header) + sum(_row_bytes(s) for s in specs.values()) * rows)

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            self.file.seek(len(self.header) + self.offsets[name] + start * _row_bytes(self.specs[name]))
            self.file.write(memoryview(np.ascontiguousarray(array)).cast("B"))

    def finish(self, rows: int) -> None:
        self.file.close()
        if rows < self.rows:   # the last shard: copy each tensor's first rows into a file sized for them
            header, offsets = _header(self.specs, rows)
            with open(self.partial, "rb") as src, open(self.path.with_name(self.path.name + ".tmp"), "wb") as dst:
                dst.write(header)
                for name, spec in self.specs.items():
                    src.seek(len(self.header) + self.offsets[name])
                    left = rows * _row_bytes(spec)
                    while left:
                        block = src.read(min(left, 8 << 20))
                        dst.write(block)
                        left -= len(block)
            os.replace(self.path.with_name(self.path.name + ".tmp"), self.partial)
        os.replace(self.partial, self.path)


def _row_bytes(spec) -> int:
    dtype, shape = spec
    return dtype.itemsize * int(np.prod(shape, dtype=np.int64))


def _header(specs, rows: int) -> tuple[bytes, dict[str, int]]:
    meta, offsets, at = {}, {}, 0
    for name, spec in specs.items():
        size = _row_bytes(spec) * rows
        meta[name] = {"dtype": _ST[spec[0]], "shape": [rows, *spec[1]], "data_offsets": [at, at + size]}
        offsets[name], at = at, at + size
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------- capture
def _stop_layer(config, sites) -> int | None:
    """The first layer no site needs (so the forward can stop there), or None for the full run."""
    layers = []
    for site in sites:
        if site.startswith("blocks."):
            layers.append(int(site.split(".")[1]))
        elif site != "hook_embed":
            return None
    return max(layers, default=-1) + 1


def capture(model, texts, out_dir, spec: CaptureSpec, progress: bool = False,
            on_batch: Callable[[dict], None] | None = None) -> dict:
    """Capture `spec.sites` over the text files into out_dir (see the module docstring); returns
    the manifest. Re-running with the same arguments resumes an interrupted capture; different
    arguments on an existing out_dir are refused. on_batch(state) is called after every batch."""
    from gemma_jax import interp
    spec.check()
    if model.tokenizer is None:
        raise TokenizerError("capture tokenizes text files: this checkpoint has no tokenizer.model")
    tokenizer = model.tokenizer
    files = [Path(t) for t in texts]
    if not files:
        raise GenerationError("capture needs at least one text file")
    for f in files:
        if not f.is_file():
            raise GenerationError(f"{f}: no such text file")
        next(_text_chunks(f), None)  # a binary or mis-encoded file is refused before anything is written
    sites = hooks_lib.resolve(model.config, spec.sites)
    if spec.seq_len > model.config.max_position_embeddings:
        raise GenerationError(f"seq_len {spec.seq_len} exceeds max_position_embeddings "
                              f"{model.config.max_position_embeddings}")
    out_dir = Path(out_dir)
    storage = _NP[spec.dtype]
    import jax
    import jax.numpy as jnp
    rows_shape = jax.ShapeDtypeStruct((spec.batch_size, spec.seq_len), jnp.int32)
    shapes = jax.eval_shape(lambda t: interp._run(model.graphdef, model.state, t, t, sites, hooks_lib.Hooks(()),
                                                  _stop_layer(model.config, sites), None)[1], rows_shape)
    specs = {"tokens": (np.dtype(np.int32), (spec.seq_len,))}
    specs.update({s: (storage, tuple(shapes[s].shape[1:])) for s in sites})
    per_row = sum(_row_bytes(s) for s in specs.values())
    shard_rows = spec.batch_size * max(1, spec.shard_bytes // (per_row * spec.batch_size))
    settings = {"format": FORMAT, "model": dataclasses.asdict(model.config), "model_dtype": str(np.dtype(model.dtype)),
                "texts": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
                "sites": list(sites), "seq_len": spec.seq_len, "batch_size": spec.batch_size, "dtype": spec.dtype,
                "shard_rows": shard_rows, "max_rows": spec.max_rows,
                "shapes": {s: [int(d) for d in specs[s][1]] for s in sites}}
    manifest = _start(out_dir, json.loads(json.dumps(settings)))   # as the manifest will read back
    if manifest["complete"]:
        return manifest
    done = sum(s["rows"] for s in manifest["shards"])

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(t["bytes"] for t in settings["texts"]), unit="B", unit_scale=True,
                   desc=f"capturing {len(sites)} site(s)", file=sys.stderr)
    rows = token_rows(tokenizer, files, spec.seq_len, None if bar is None else bar.update)
    for _ in range(done):  # resume: the rows already written (the stream is deterministic)
        next(rows, None)
    stop = _stop_layer(model.config, sites)
    shard, in_shard, total = None, 0, done
    try:
        while spec.max_rows is None or total < spec.max_rows:
            want = spec.batch_size if spec.max_rows is None else min(spec.batch_size, spec.max_rows - total)
            batch = [r for _, r in zip(range(want), rows)]
            if not batch:
                break
            tokens = np.stack(batch + [batch[-1]] * (spec.batch_size - len(batch)))
            _, store, _ = interp._run(model.graphdef, model.state, jnp.asarray(tokens), jnp.asarray(
                np.broadcast_to(np.arange(spec.seq_len, dtype=np.int32), tokens.shape)), sites,
                hooks_lib.Hooks(()), stop, None)
            arrays = {"tokens": tokens[:len(batch)]}
            for s in sites:
                value = np.asarray(store[s][:len(batch)])
                stored = value.astype(storage)
                if storage != value.dtype and not np.isfinite(stored).all() and np.isfinite(value).all():
                    raise GenerationError(f"{s}: activations overflow float16 (max |x| {float(np.abs(value).max()):.3g}); "
                                          "capture with --store-dtype float32")
                arrays[s] = stored
            if shard is None:
                shard = _ShardFile(out_dir / f"shard_{len(manifest['shards']):05d}.safetensors", specs, shard_rows)
            shard.write(in_shard, arrays)
            in_shard += len(batch)
            total += len(batch)
            if in_shard == shard_rows:
                _close_shard(out_dir, manifest, shard, in_shard)
                shard, in_shard = None, 0
            if on_batch is not None:
                on_batch({"rows": total, "shards": len(manifest["shards"])})
        if shard is not None:
            _close_shard(out_dir, manifest, shard, in_shard)
            shard = None
    finally:
        if shard is not None:  # interrupted mid-shard: drop it; a resumed run writes it again
            shard.file.close()
            shard.partial.unlink(missing_ok=True)
        if bar is not None:
            bar.close()
    manifest.update(complete=True, rows=total, tokens=total * spec.seq_len)
    _write_json(out_dir / MANIFEST, manifest)
    return manifest


def _start(out_dir: Path, settings: dict) -> dict:
    """A new manifest, or the existing one when its settings match (resume); stray partial files go."""
    path = out_dir / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable capture manifest ({e})") from None
        for key, value in settings.items():
            if manifest.get(key) != value:
                raise GenerationError(f"{out_dir} holds a capture with different {key!r}: resume it with the "
                                      "same arguments, or choose another --out")
        for stray in list(out_dir.glob("*.partial")) + list(out_dir.glob("*.tmp")):
            stray.unlink()
        return manifest
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GenerationError(f"{out_dir}: exists and is not a capture directory (no {MANIFEST})")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {**settings, "complete": False, "shards": []}
    _write_json(path, manifest)
    return manifest


def _close_shard(out_dir: Path, manifest: dict, shard: _ShardFile, rows: int) -> None:
    shard.finish(rows)
    manifest["shards"].append({"file": shard.path.name, "rows": rows})
    _write_json(out_dir / MANIFEST, manifest)


# --------------------------------------------------------------------------------- reading
class ActivationDataset:
    """A capture directory read lazily: one shard slice in memory at a time."""

    def __init__(self, directory):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable capture manifest ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: capture format {self.manifest.get('format')!r}, expected {FORMAT}")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def __len__(self) -> int:
        """Rows (sequences) in the finished shards."""
        return sum(s["rows"] for s in self.manifest["shards"])

    def shards(self) -> Iterator[Path]:
        for s in self.manifest["shards"]:
            yield self.directory / s["file"]

    def iter_rows(self, name: str, rows: int = 64) -> Iterator[np.ndarray]:
        """`name` ('tokens' or a site) in blocks of up to `rows` rows, [n, seq_len, ...]."""
        from safetensors import safe_open
        if name != "tokens" and name not in self.manifest["sites"]:
            raise GenerationError(f"{name!r} was not captured (sites: {self.sites})")
        for path in self.shards():
            with safe_open(str(path), framework="numpy") as f:
                part = f.get_slice(name)
                n = part.get_shape()[0]
                for start in range(0, n, rows):
                    yield part[start:min(start + rows, n)]

    def iter_batches(self, site: str, batch_tokens: int = 4096, skip_bos: bool = True,
                     dtype=np.float32) -> Iterator[np.ndarray]:
        """Token activations [batch_tokens, *site shape] in capture order (the last batch may be
        smaller), for SAE training; skip_bos drops each row's first position (BOS activations are
        outliers)."""
        pending, have = [], 0
        for block in self.iter_rows(site, rows=max(1, batch_tokens // self.manifest["seq_len"]) + 1):
            flat = (block[:, 1:] if skip_bos else block).reshape(-1, *block.shape[2:]).astype(dtype)
            pending.append(flat)
            have += len(flat)
            while have >= batch_tokens:
                joined = np.concatenate(pending)
                yield joined[:batch_tokens]
                pending, have = [joined[batch_tokens:]], have - batch_tokens
        if have:
            yield np.concatenate(pending)
