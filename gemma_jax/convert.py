"""Hugging Face Gemma 2 safetensors -> our Orbax checkpoint, tensor by tensor, strictly."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from gemma_jax import checkpoint, quant
from gemma_jax.config import GemmaConfig
from gemma_jax.errors import CheckpointError, ConfigError, GemmaWarning
from gemma_jax.model import weight_in_axis
from gemma_jax.safetensors_io import TensorEntry, read_header, unique_keys

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BLOCK_BYTES = 8 << 20  # a tensor is read and transposed in blocks of this size
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Our param name -> (HF tensor names, how to build ours from them). HF weights are [out, in]; ours
# are [in, out] where the output is wide (transposed here) and [out, in] where it is narrow (o, down).
_LAYER_TABLE = {
    "pre_attn_norm/weight": (("input_layernorm.weight",), "copy"),
    "post_attn_norm/weight": (("post_attention_layernorm.weight",), "copy"),
    "pre_ffw_norm/weight": (("pre_feedforward_layernorm.weight",), "copy"),
    "post_ffw_norm/weight": (("post_feedforward_layernorm.weight",), "copy"),
    "attn/q": (("self_attn.q_proj.weight",), "transpose"),
    "attn/k": (("self_attn.k_proj.weight",), "transpose"),
    "attn/v": (("self_attn.v_proj.weight",), "transpose"),
    "attn/o": (("self_attn.o_proj.weight",), "copy"),
    "mlp/gate_up": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "stack_transpose"),
    "mlp/down": (("mlp.down_proj.weight",), "copy"),
}
_TIED_HEAD = "lm_head.weight"


def name_table(config: GemmaConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Every param of ours with the HF tensors it is made of."""
    table = {"embedder/embedding": (("model.embed_tokens.weight",), "transpose"),
             "final_norm/weight": (("model.norm.weight",), "copy")}
    for i in range(config.num_hidden_layers):
        for ours, (theirs, how) in _LAYER_TABLE.items():
            table[f"blocks/{i}/{ours}"] = (tuple(f"model.layers.{i}.{t}" for t in theirs), how)
    return table


def hf_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor ([out, in] layout)."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * h, config.num_key_value_heads * h
    per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "pre_feedforward_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
                 "mlp.down_proj.weight": (d, f)}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _read_json(path: Path, error: type) -> dict:
    """A JSON object from path; a missing, unreadable, non-JSON or duplicate-key file is `error`."""
    try:
        value = json.loads(path.read_bytes(), object_pairs_hook=unique_keys(
            lambda key: error(f"{path}: duplicate key {key!r}")))
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(value, dict):
        raise error(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def read_hf_config(hf_dir: Path) -> GemmaConfig:
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise ConfigError(f"{hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    path = hf_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: not found (is {hf_dir} a Hugging Face model directory?)")
    try:
        return GemmaConfig.from_hf(_read_json(path, ConfigError))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def tensor_entries(hf_dir: Path) -> dict[str, TensorEntry]:
    """HF tensor name -> where it lies, from the index (sharded) or the single file."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        headers: dict[str, dict[str, TensorEntry]] = {}
        entries = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index}: tensor {key!r} is mapped to {shard!r}, not a file name "
                                      "in this directory")
            shard_path = hf_dir / shard
            if shard not in headers:
                if not shard_path.is_file():
                    raise CheckpointError(f"{shard_path}: shard listed in {INDEX_FILE} is missing")
                headers[shard] = read_header(shard_path)
            if key not in headers[shard]:
                raise CheckpointError(f"{shard_path}: tensor {key!r} listed in {INDEX_FILE} is not in this shard")
            entries[key] = headers[shard][key]
        for shard, header in headers.items():
            for key in header:
                if key not in weight_map:
                    raise CheckpointError(f"{hf_dir / shard}: tensor {key!r} is not listed in {INDEX_FILE}")
                if weight_map[key] != shard:
                    raise CheckpointError(f"{hf_dir / shard}: duplicate tensor {key!r}: also in "
                                          f"{weight_map[key]}, where {INDEX_FILE} puts it")
        return entries
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return read_header(single)
    hint = " (PyTorch .bin weights are not supported: re-save with safe_serialization=True)" \
        if any(hf_dir.glob("*.bin")) else ""
    raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _check_names_and_shapes(config: GemmaConfig, entries: dict[str, TensorEntry], hf_dir: Path) -> None:
    expected = hf_shapes(config)
    unknown = sorted(set(entries) - set(expected) - {_TIED_HEAD})
    if unknown:
        raise CheckpointError(f"{entries[unknown[0]].file}: unknown tensor {unknown[0]!r} "
                              f"({len(unknown)} unknown in all; not part of a Gemma 2 model with this config.json)")
    missing = [k for k in expected if k not in entries]
    if missing:
        raise CheckpointError(f"{hf_dir}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for key, shape in expected.items():
        if entries[key].shape != shape:
            raise CheckpointError(f"{entries[key].file}: tensor {key!r} has shape {list(entries[key].shape)}, "
                                  f"config.json implies {list(shape)}")
    if _TIED_HEAD in entries:
        head, emb = entries[_TIED_HEAD], entries["model.embed_tokens.weight"]
        if not _same_tensor(head, emb):
            raise CheckpointError(f"{head.file}: tensor {_TIED_HEAD!r} differs from the embedding; "
                                  "Gemma 2 ties them and an untied head is not supported")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in NP_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported (choose float32 or bfloat16"
                              + ("; Gemma 2 overflows in float16)" if dtype == "float16" else ")"))


def _choose_dtype(entries: dict[str, TensorEntry], dtype: str | None, hf_dir: Path) -> str:
    if dtype is not None:
        return dtype
    on_disk = {e.dtype for e in entries.values()}
    if on_disk == {NP_DTYPES["bfloat16"]}:
        return "bfloat16"
    if np.dtype(np.float16) in on_disk:
        warnings.warn(f"{hf_dir}: float16 weights: converting to float32 (Gemma 2 overflows in float16; "
                      "pass --dtype bfloat16 for half the size)", GemmaWarning, stacklevel=3)
    return "float32"


def _blocks(source: TensorEntry | np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of a tensor in blocks of about BLOCK_BYTES: a tensor on disk is read block
    by block, so converting it never holds its whole source in memory."""
    n, row = source.shape[0], int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize
    step = max(1, BLOCK_BYTES // max(row, 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, source.rows(start, stop) if isinstance(source, TensorEntry) else np.asarray(source[start:stop])


def _assign(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, cast to dst's dtype. A same-dtype copy moves raw bits (ml_dtypes' bfloat16
    copies, transposed ones above all, are several times slower than uint16 ones)."""
    if src.dtype == dst.dtype:
        bits = np.dtype(f"u{dst.itemsize}")
        dst, src = dst.view(bits), src.view(bits)
    dst[...] = src


def build_param(how: str, sources: list[TensorEntry | np.ndarray], dtype: np.dtype, quantize: bool = False):
    """Our param from its HF tensors (on disk or in memory), built block by block.

    quantize: an int8 weight instead, as (values, scale), values in HF's own [out, in] layout
    (gate and up stacked: [2, F, D]) whatever `how` says (see quant.py), scale [out..., 1]. Each
    HF row is one output channel, so every block is quantized on its own (quant.quantize_rows) and
    no float copy of the whole tensor is ever made.
    """
    first = sources[0]
    if quantize:
        values = np.empty((len(sources), *first.shape), np.int8)
        scale = np.empty((len(sources), first.shape[0], 1), np.float32)
        for k, source in enumerate(sources):
            for start, block in _blocks(source):
                values[k, start:start + len(block)], scale[k, start:start + len(block), 0] = quant.quantize_rows(block)
        return (values[0], scale[0]) if len(sources) == 1 else (values, scale)
    if how == "copy":
        out = np.empty(first.shape, dtype)
        for start, block in _blocks(first):
            _assign(out[start:start + len(block)], block)
    elif how == "transpose":  # [out, in] -> [in, out]
        out = np.empty(first.shape[::-1], dtype)
        for start, block in _blocks(first):
            _assign(out[:, start:start + len(block)], block.T)
    else:  # stack_transpose: gate, up [F, D] -> [D, 2, F]
        out = np.empty((first.shape[1], len(sources), first.shape[0]), dtype)
        for k, source in enumerate(sources):
            for start, block in _blocks(source):
                _assign(out[:, k, start:start + len(block)], block.T)
    return out


def _same_tensor(a: TensorEntry, b: TensorEntry) -> bool:
    return a.shape == b.shape and all(np.array_equal(x, y) for (_, x), (_, y) in zip(_blocks(a), _blocks(b)))


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False,
            progress: Callable | None = None, quantize: str | None = None) -> Path:
    """Convert a HF Gemma 2 directory into a self-contained gemma_jax checkpoint at out_dir.

    dtype: "float32" or "bfloat16"; None keeps the dtype on disk. quantize="int8" stores every
    weight matrix as int8 with a float32 scale per output channel (the tied embedding per
    vocabulary entry); the norms stay in dtype. `progress(iterable, total)` wraps the tensor loop
    (a progress bar). The output appears only when complete.
    """
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    _check_dtype(dtype)
    if quantize not in (None, *quant.METHODS):
        raise CheckpointError(f"quantize {quantize!r} is not supported (choose {', '.join(quant.METHODS)})")
    checkpoint.check_output_dir(out_dir, force)  # fail fast, before reading any weights
    config = read_hf_config(hf_dir)
    entries = tensor_entries(hf_dir)
    _check_names_and_shapes(config, entries, hf_dir)
    dtype = _choose_dtype(entries, dtype, hf_dir)
    np_dtype = NP_DTYPES[dtype]
    table = name_table(config)
    items = table.items() if progress is None else progress(table.items(), len(table))
    with checkpoint.atomic_directory(out_dir, force) as tmp:
        for name in checkpoint.TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        groups = _one_ahead(_param_groups(items, entries, np_dtype, quantize is not None))
        checkpoint.save(tmp, config, groups, dtype, quantize)  # config last
    return out_dir


def _param_groups(items, entries, np_dtype, quantize: bool = False):
    """Converted params one layer (or top-level tensor) at a time: only one group is in memory.
    With quantize, each weight matrix is two arrays, NAME/values and NAME/scale."""
    group, key = {}, None
    for ours, (theirs, how) in items:
        k = "/".join(ours.split("/")[:2]) if ours.startswith("blocks/") else ours
        if group and k != key:
            yield group
            group = {}
        key = k
        sources = [entries[t] for t in theirs]
        if quantize and weight_in_axis(ours) is not None:
            group[f"{ours}/values"], group[f"{ours}/scale"] = build_param(how, sources, np_dtype, quantize=True)
        else:
            group[ours] = build_param(how, sources, np_dtype)
    if group:
        yield group


def _one_ahead(iterator: Iterator) -> Iterator:
    """The items of iterator, each next one made in a worker thread while the caller uses the current
    one (reading and transposing a layer overlaps Orbax writing the previous one; at most two groups
    are in memory)."""
    done = object()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gemma_jax-convert") as pool:
        upcoming = pool.submit(next, iterator, done)
        while (item := upcoming.result()) is not done:
            upcoming = pool.submit(next, iterator, done)
            yield item
            del item


def tqdm_progress(desc: str):
    """A progress wrapper for convert(): a bar on a terminal, nothing otherwise."""
    def wrap(iterable, total):
        if not sys.stderr.isatty():
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr)
    return wrap
