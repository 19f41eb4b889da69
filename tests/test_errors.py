"""Every refused input: the exception type, a one-line message naming what is at fault, nothing on disk.

Each `@case` below is one refused input and one row of docs/errors.md. `test_refused` runs it;
`test_errors_doc_is_current` renders the table from the messages the cases produce and compares it
with docs/errors.md. To rewrite the doc after changing a message:

    GEMMA_JAX_UPDATE_ERRORS_DOC=1 python -m pytest tests/test_errors.py -k errors_doc

Paths in the messages are written as HF_DIR (the Hugging Face directory), OUT_DIR (convert's
output), CKPT (a converted checkpoint) and TMP (the test's scratch directory).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gemma_jax
from gemma_jax import checkpoint, cli, interp
from gemma_jax.chat import ChatSession
from gemma_jax.errors import (CheckpointError, ConfigError, DependencyError, EvaluationError, GemmaError, GemmaWarning,
                              GenerationError, TokenizerError)
from gemma_jax.sampler import Sampling
from hf_oracle import hf_model, save

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
UPDATE_ENV = "GEMMA_JAX_UPDATE_ERRORS_DOC"
TOKENIZER_DIR = os.environ.get("GEMMA_JAX_TOKENIZER_DIR")
INDEX_FILE = "model.safetensors.index.json"
VOCAB = 128       # tiny model (hf_oracle.TINY)
CONTEXT = 64      # its max_position_embeddings


# ----------------------------------------------------------------------------------------- fixtures
@dataclasses.dataclass
class Base:
    """Made once per module: good inputs that the cases copy and break."""
    hf: Path              # single-file HF directory
    hf_sharded: Path      # the same model in shards
    ckpt: Path            # converted
    model: gemma_jax.Gemma
    chat_ckpt: Path | None = None   # a converted model with the real Gemma 2 tokenizer
    chat_model: gemma_jax.Gemma | None = None


def _make_base(root: Path) -> Base:
    model = hf_model(seed=0)
    save(model, root / "hf")
    save(model, root / "hf_sharded", max_shard_size="40KB")
    gemma_jax.convert(root / "hf", root / "ckpt")
    base = Base(root / "hf", root / "hf_sharded", root / "ckpt", gemma_jax.load(root / "ckpt"))
    if TOKENIZER_DIR and (Path(TOKENIZER_DIR) / "tokenizer.model").is_file():
        # The real vocabulary needs vocab_size 256000; everything else stays tiny (~12 MB).
        big = hf_model(seed=1, vocab_size=256000, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8)
        save(big, root / "hf_chat")
        shutil.copy(Path(TOKENIZER_DIR) / "tokenizer.model", root / "hf_chat" / "tokenizer.model")
        gemma_jax.convert(root / "hf_chat", root / "chat_ckpt")
        base.chat_ckpt = root / "chat_ckpt"
        base.chat_model = gemma_jax.load(base.chat_ckpt)
    return base


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return _make_base(tmp_path_factory.mktemp("base"))


class Ctx:
    """One case's scratch directory, the shared good inputs and a monkeypatch."""

    def __init__(self, tmp: Path, base: Base, mp: pytest.MonkeyPatch):
        self.tmp, self.base, self.mp = tmp, base, mp
        self.hf_dir, self.out, self.ckpt_dir = tmp / "hf", tmp / "out", tmp / "ckpt"

    # inputs
    def hf(self, sharded: bool = False) -> Path:
        shutil.copytree(self.base.hf_sharded if sharded else self.base.hf, self.hf_dir)
        return self.hf_dir

    def ckpt(self) -> Path:
        shutil.copytree(self.base.ckpt, self.ckpt_dir)
        return self.ckpt_dir

    def convert(self, **kwargs):
        return gemma_jax.convert(self.hf_dir, self.out, **kwargs)

    def load(self, path: Path | None = None, **kwargs):
        return gemma_jax.load(self.ckpt_dir if path is None else path, **kwargs)

    def hf_config(self, **changes) -> None:
        """Edit the copied HF config.json (a value of None deletes the field)."""
        path = self.hf_dir / "config.json"
        cfg = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        path.write_text(json.dumps(cfg))

    def shards(self) -> list[Path]:
        return sorted(self.hf_dir.glob("*.safetensors"))

    def index(self) -> dict:
        return json.loads((self.hf_dir / INDEX_FILE).read_text())

    def write_index(self, index: dict) -> None:
        (self.hf_dir / INDEX_FILE).write_text(json.dumps(index))

    def shard_of(self, key: str) -> Path:
        return self.hf_dir / self.index()["weight_map"][key]

    def scrub(self, text: str) -> str:
        """Paths of this case -> placeholders, so the doc does not depend on where tests run."""
        for path, name in ((self.hf_dir, "HF_DIR"), (self.out, "OUT_DIR"), (self.ckpt_dir, "CKPT"),
                           (self.tmp, "TMP")):
            text = text.replace(str(path), name)
        text = re.sub(r"\.(partial|old)-[^/\s)]+-\d+", r".\1-HOST-PID", text)
        text = re.sub(r"ocdbt\.process_[0-9a-f]+", "ocdbt.process_HASH", text)
        text = re.sub(r"expected \d+; convert again", "expected SIZE; convert again", text)  # Orbax's sizes vary
        return re.sub(r"\b[0-9a-f]{32}\b", "HASH", text)     # Orbax's data file names


def tensors(path: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(path)


def write_tensors(path: Path, values: dict[str, np.ndarray]) -> None:
    safetensors.numpy.save_file(values, path, metadata={"format": "pt"})


def edit_tensors(path: Path, change: Callable[[dict], None]) -> None:
    values = tensors(path)
    change(values)
    write_tensors(path, values)


def header(path: Path) -> tuple[int, bytes, bytes]:
    """(header length, header JSON bytes, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n], raw[8 + n:]


def write_raw(path: Path, header_json: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)


def leftovers(directory: Path, name: str = "out") -> list[str]:
    """What a conversion into directory/name left: name itself and any `.name.*` work directory."""
    return sorted(p.name for p in directory.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    section: str
    what: str                      # the refused input, as the doc's first column
    error: type
    words: tuple[str, ...]         # must all appear in the (scrubbed) message
    run: Callable[[Ctx], object]
    after: Callable[[Ctx], None] | None
    tokenizer: bool


CASES: list[Case] = []
SECTIONS = {
    "hf": "Converting: the Hugging Face directory and its config.json",
    "tensors": "Converting: the safetensors files",
    "out": "Converting: the output directory",
    "load": "Loading a checkpoint",
    "generate": "Generating",
    "cli": "The command line (checked before a model is loaded or run)",
    "research": "Research: hook sites, activation caches, SAEs, activation capture",
    "evaluate": "Scoring and evaluation",
}


def case(section: str, what: str, error: type, *words: str, after=None, tokenizer: bool = False):
    def register(fn):
        CASES.append(Case(fn.__name__, section, what, error, words, fn, after, tokenizer))
        return fn
    return register


# ---------------------------------------------------------------- converting: the HF directory
@case("hf", "HF_DIR does not exist", ConfigError, "HF_DIR: no such directory")
def hf_missing(t):
    t.convert()


@case("hf", "HF_DIR is a file", ConfigError, "HF_DIR: not a directory")
def hf_is_file(t):
    t.hf_dir.write_text("hello")
    t.convert()


@case("hf", "HF_DIR has no config.json", ConfigError, "HF_DIR/config.json: not found")
def hf_no_config(t):
    t.hf()
    (t.hf_dir / "config.json").unlink()
    t.convert()


@case("hf", "config.json is not JSON", ConfigError, "HF_DIR/config.json: not valid JSON", "line 1")
def hf_config_not_json(t):
    t.hf()
    (t.hf_dir / "config.json").write_text('{"model_type": "gemma2",')
    t.convert()


@case("hf", "config.json holds a list, not an object", ConfigError, "HF_DIR/config.json", "JSON object")
def hf_config_not_object(t):
    t.hf()
    (t.hf_dir / "config.json").write_text("[1, 2]")
    t.convert()


@case("hf", "config.json has a key twice", ConfigError, "HF_DIR/config.json", "duplicate key 'hidden_size'")
def hf_config_duplicate_key(t):
    t.hf()
    path = t.hf_dir / "config.json"
    path.write_text(path.read_text().replace('"hidden_size": 32', '"hidden_size": 32, "hidden_size": 64'))
    t.convert()


@case("hf", "model_type gemma (Gemma 1)", ConfigError, "HF_DIR/config.json", "'gemma' (Gemma 1)", "'gemma2'")
def hf_gemma1(t):
    t.hf()
    t.hf_config(model_type="gemma")
    t.convert()


@case("hf", "model_type gemma3", ConfigError, "'gemma3' (Gemma 3)", "'gemma2'")
def hf_gemma3(t):
    t.hf()
    t.hf_config(model_type="gemma3")
    t.convert()


@case("hf", "model_type llama", ConfigError, "model_type is 'llama'", "'gemma2'")
def hf_llama(t):
    t.hf()
    t.hf_config(model_type="llama")
    t.convert()


@case("hf", "config.json without head_dim", ConfigError, "HF_DIR/config.json", "missing required field 'head_dim'")
def hf_no_head_dim(t):
    t.hf()
    t.hf_config(head_dim=None)
    t.convert()


@case("hf", "config.json hidden_size is a string", ConfigError, "'hidden_size'", "positive integer", "'32'")
def hf_hidden_size_string(t):
    t.hf()
    t.hf_config(hidden_size="32")
    t.convert()


@case("hf", "config.json rms_norm_eps is a string", ConfigError, "'rms_norm_eps'", "'1e-6'")
def hf_eps_string(t):
    t.hf()
    t.hf_config(rms_norm_eps="1e-6")
    t.convert()


@case("hf", "rope_theta contradicts rope_parameters.rope_theta", ConfigError,
      "rope_theta 500.0", "contradicts", "rope_parameters.rope_theta 10000.0")
def hf_rope_contradiction(t):
    t.hf()
    t.hf_config(rope_theta=500.0)
    t.convert()


@case("hf", "rope scaling (not the default rope)", ConfigError, "rope type 'linear'")
def hf_rope_linear(t):
    t.hf()
    t.hf_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    t.convert()


@case("hf", "num_attention_heads not a multiple of num_key_value_heads", ConfigError,
      "num_attention_heads (4)", "num_key_value_heads (3)")
def hf_heads_not_multiple(t):
    t.hf()
    t.hf_config(num_key_value_heads=3)
    t.convert()


@case("hf", "layer_types shorter than num_hidden_layers", ConfigError, "layer_types has 2 entries",
      "num_hidden_layers is 3")
def hf_layer_types_short(t):
    t.hf()
    t.hf_config(layer_types=["sliding_attention", "full_attention"])
    t.convert()


@case("hf", "layer_types with an unknown kind", ConfigError, "unknown kinds ['chunked_attention']")
def hf_layer_types_unknown(t):
    t.hf()
    t.hf_config(layer_types=["sliding_attention", "chunked_attention", "full_attention"])
    t.convert()


@case("hf", "tie_word_embeddings false", ConfigError, "tie_word_embeddings=false")
def hf_untied(t):
    t.hf()
    t.hf_config(tie_word_embeddings=False)
    t.convert()


@case("hf", "another activation", ConfigError, "hidden_activation 'relu'")
def hf_activation(t):
    t.hf()
    t.hf_config(hidden_activation="relu")
    t.convert()


@case("hf", "eos_token_id outside the vocabulary", ConfigError, "'eos_token_id'", f"[0, {VOCAB})", "500")
def hf_eos_outside(t):
    t.hf()
    t.hf_config(eos_token_id=[1, 500])
    t.convert()


@case("hf", "dtype float16 asked for (convert)", CheckpointError, "dtype 'float16'", "float32 or bfloat16", "overflows")
def hf_dtype_float16(t):
    t.hf()
    t.convert(dtype="float16")


# ---------------------------------------------------------------- converting: the safetensors files
@case("tensors", "no model.safetensors and no index", CheckpointError,
      "HF_DIR: no model.safetensors or model.safetensors.index.json")
def st_no_weights(t):
    t.hf()
    (t.hf_dir / "model.safetensors").unlink()
    t.convert()


@case("tensors", "PyTorch .bin weights only", CheckpointError, "no model.safetensors", "PyTorch .bin")
def st_bin_only(t):
    t.hf()
    (t.hf_dir / "model.safetensors").rename(t.hf_dir / "pytorch_model.bin")
    t.convert()


@case("tensors", "index is not JSON", CheckpointError, "HF_DIR/model.safetensors.index.json: not valid JSON")
def st_index_not_json(t):
    t.hf(sharded=True)
    (t.hf_dir / INDEX_FILE).write_text("{")
    t.convert()


@case("tensors", "index without weight_map", CheckpointError, "HF_DIR/model.safetensors.index.json",
      "no 'weight_map'")
def st_index_no_map(t):
    t.hf(sharded=True)
    t.write_index({"metadata": {}})
    t.convert()


@case("tensors", "index has a tensor twice", CheckpointError, "HF_DIR/model.safetensors.index.json",
      "duplicate key 'model.norm.weight'")
def st_index_duplicate_key(t):
    t.hf(sharded=True)
    path = t.hf_dir / INDEX_FILE
    text = path.read_text()
    shard = t.index()["weight_map"]["model.norm.weight"]
    path.write_text(text.replace('"weight_map": {', f'"weight_map": {{"model.norm.weight": "{shard}", ', 1))
    t.convert()


@case("tensors", "index maps a tensor outside HF_DIR", CheckpointError, "'model.norm.weight'",
      "'../x.safetensors'", "not a file name in this directory")
def st_index_escapes(t):
    t.hf(sharded=True)
    index = t.index()
    index["weight_map"]["model.norm.weight"] = "../x.safetensors"
    t.write_index(index)
    t.convert()


@case("tensors", "shard listed in the index is absent", CheckpointError, "HF_DIR/model-00002-of-",
      "shard listed in model.safetensors.index.json is missing")
def st_shard_missing(t):
    t.hf(sharded=True)
    t.shards()[1].unlink()
    t.convert()


@case("tensors", "tensor listed in the index is absent from its shard", CheckpointError,
      "tensor 'model.layers.1.mlp.down_proj.weight' listed in model.safetensors.index.json is not in this shard")
def st_tensor_not_in_shard(t):
    t.hf(sharded=True)
    key = "model.layers.1.mlp.down_proj.weight"
    edit_tensors(t.shard_of(key), lambda v: v.pop(key))
    t.convert()


@case("tensors", "tensor in a shard but not in the index", CheckpointError, "HF_DIR/model-",
      "tensor 'model.extra.weight' is not listed in model.safetensors.index.json")
def st_tensor_not_in_index(t):
    t.hf(sharded=True)
    edit_tensors(t.shards()[0], lambda v: v.update({"model.extra.weight": np.zeros(3, np.float32)}))
    t.convert()


@case("tensors", "same tensor in two shards", CheckpointError,
      "duplicate tensor 'model.norm.weight': also in model-")
def st_duplicate_across_shards(t):
    t.hf(sharded=True)
    key = "model.norm.weight"
    home = t.shard_of(key)
    value = tensors(home)[key]
    other = next(p for p in t.shards() if p != home)
    edit_tensors(other, lambda v: v.update({key: value}))
    t.convert()


@case("tensors", "same tensor twice in one safetensors header", CheckpointError,
      "HF_DIR/model.safetensors", "tensor 'model.norm.weight' appears twice")
def st_duplicate_json_key(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    _, head, data = header(path)
    entry = json.dumps(json.loads(head)["model.norm.weight"])
    write_raw(path, head.rstrip()[:-1] + f', "model.norm.weight": {entry}}}'.encode(), data)
    t.convert()


@case("tensors", "file shorter than 8 bytes", CheckpointError, "HF_DIR/model.safetensors", "truncated",
      "no header length")
def st_truncated_tiny(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5])
    t.convert()


@case("tensors", "file cut inside the header", CheckpointError, "HF_DIR/model.safetensors",
      "truncated safetensors file", "header needs")
def st_truncated_header(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    t.convert()


@case("tensors", "file cut inside the data", CheckpointError, "HF_DIR/model.safetensors",
      "truncated safetensors file: tensor", "ends at byte")
def st_truncated_data(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    t.convert()


@case("tensors", "header that is not JSON", CheckpointError, "HF_DIR/model.safetensors",
      "corrupt safetensors header (not JSON)")
def st_header_garbage(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    n, _, data = header(path)
    write_raw(path, b"#" * n, data)
    t.convert()


@case("tensors", "not a safetensors file at all (text)", CheckpointError, "HF_DIR/model.safetensors",
      "corrupt safetensors header", "not a safetensors file?")
def st_not_safetensors(t):
    t.hf()
    (t.hf_dir / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n" * 3)
    t.convert()


@case("tensors", "header entry with a malformed shape", CheckpointError, "HF_DIR/model.safetensors",
      "corrupt header entry for tensor 'model.norm.weight'")
def st_header_bad_entry(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    _, head, data = header(path)
    meta = json.loads(head)
    meta["model.norm.weight"]["shape"] = "32"
    write_raw(path, json.dumps(meta).encode(), data)
    t.convert()


@case("tensors", "header offsets that do not fit the shape", CheckpointError,
      "corrupt header entry for tensor 'model.norm.weight'", "do not fit shape [32] F32")
def st_header_bad_offsets(t):
    t.hf()
    path = t.hf_dir / "model.safetensors"
    _, head, data = header(path)
    meta = json.loads(head)
    begin, _ = meta["model.norm.weight"]["data_offsets"]
    meta["model.norm.weight"]["data_offsets"] = [begin, begin + 4]
    write_raw(path, json.dumps(meta).encode(), data)
    t.convert()


@case("tensors", "tensor of the wrong shape", CheckpointError, "HF_DIR/model.safetensors",
      "tensor 'model.norm.weight' has shape [33], config.json implies [32]")
def st_wrong_shape(t):
    t.hf()
    edit_tensors(t.hf_dir / "model.safetensors", lambda v: v.update({"model.norm.weight": np.ones(33, np.float32)}))
    t.convert()


@case("tensors", "int32 tensor", CheckpointError, "HF_DIR/model.safetensors", "tensor 'model.norm.weight'",
      "unsupported dtype I32")
def st_dtype_i32(t):
    t.hf()
    edit_tensors(t.hf_dir / "model.safetensors", lambda v: v.update({"model.norm.weight": np.ones(32, np.int32)}))
    t.convert()


@case("tensors", "float64 tensor", CheckpointError, "tensor 'model.layers.0.self_attn.q_proj.weight'",
      "unsupported dtype F64", "supported: F32, BF16, F16")
def st_dtype_f64(t):
    t.hf()
    key = "model.layers.0.self_attn.q_proj.weight"
    edit_tensors(t.hf_dir / "model.safetensors", lambda v: v.update({key: v[key].astype(np.float64)}))
    t.convert()


@case("tensors", "unknown extra tensor (a Gemma 3 q_norm)", CheckpointError, "HF_DIR/model.safetensors",
      "unknown tensor 'model.layers.0.self_attn.q_norm.weight'")
def st_unknown_tensor(t):
    t.hf()
    key = "model.layers.0.self_attn.q_norm.weight"
    edit_tensors(t.hf_dir / "model.safetensors", lambda v: v.update({key: np.ones(16, np.float32)}))
    t.convert()


@case("tensors", "missing tensor", CheckpointError, "HF_DIR: missing tensor 'model.layers.2.mlp.down_proj.weight'")
def st_missing_tensor(t):
    t.hf()
    edit_tensors(t.hf_dir / "model.safetensors", lambda v: v.pop("model.layers.2.mlp.down_proj.weight"))
    t.convert()


@case("tensors", "lm_head.weight that differs from the embedding", CheckpointError,
      "HF_DIR/model.safetensors", "'lm_head.weight' differs from the embedding")
def st_untied_head(t):
    t.hf()
    edit_tensors(t.hf_dir / "model.safetensors",
                 lambda v: v.update({"lm_head.weight": v["model.embed_tokens.weight"] + 1}))
    t.convert()


# ---------------------------------------------------------------- converting: the output directory
def _marker_intact(t):
    assert (t.out / "mine.txt").read_text() == "keep me"
    assert leftovers(t.tmp) == ["out"]


@case("out", "quantize with an unknown method (convert)", CheckpointError, "quantize 'int4' is not supported",
      "choose int8")
def convert_quantize_int4(t):
    t.hf()
    t.convert(quantize="int4")


@case("out", "OUT_DIR exists (no --force)", CheckpointError, "OUT_DIR: already exists", "--force",
      after=_marker_intact)
def out_exists(t):
    t.hf()
    t.out.mkdir()
    (t.out / "mine.txt").write_text("keep me")
    t.convert()


@case("out", "OUT_DIR is not a checkpoint (with --force)", CheckpointError,
      "OUT_DIR: exists and is not a gemma_jax checkpoint", after=_marker_intact)
def out_not_checkpoint_force(t):
    t.hf()
    t.out.mkdir()
    (t.out / "mine.txt").write_text("keep me")
    t.convert(force=True)


@case("out", "OUT_DIR made by someone else during the conversion (no --force)", CheckpointError,
      "OUT_DIR: already exists (created while converting", after=_marker_intact)
def out_created_meanwhile(t):
    t.hf()

    def progress(items, total):
        for i, item in enumerate(items):
            if i == 1:
                t.out.mkdir()
                (t.out / "mine.txt").write_text("keep me")
            yield item

    t.convert(progress=progress)


@case("out", "OUT_DIR's parent does not exist", CheckpointError, "TMP/missing: output parent directory does not exist")
def out_parent_missing(t):
    t.hf()
    gemma_jax.convert(t.hf_dir, t.tmp / "missing" / "out")


@case("out", "OUT_DIR's parent is a file", CheckpointError, "TMP/file: not a directory")
def out_parent_file(t):
    t.hf()
    (t.tmp / "file").write_text("")
    gemma_jax.convert(t.hf_dir, t.tmp / "file" / "out")


@case("out", "OUT_DIR's parent is not writable", CheckpointError, "TMP/readonly: not writable")
def out_parent_readonly(t):
    # Not root: a real chmod. Root writes through chmod, so there os.access is made to answer
    # "no" for that directory (what it answers to other users, or on a read-only mount).
    t.hf()
    parent = t.tmp / "readonly"
    parent.mkdir()
    if os.geteuid() == 0:
        real = os.access
        t.mp.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real(p, mode, **kw))
    else:
        parent.chmod(0o555)
    try:
        gemma_jax.convert(t.hf_dir, parent / "out")
    finally:
        parent.chmod(0o755)
        assert list(parent.iterdir()) == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@case("out", "disk full while writing", CheckpointError, "OUT_DIR: no space left on device")
def out_enospc(t):
    t.hf()
    real = checkpoint.save

    def save_until_full(directory, *args):
        real(directory, *args)            # params written ...
        _enospc()                         # ... then the disk fills

    t.mp.setattr(checkpoint, "save", save_until_full)
    t.convert()


@case("out", "disk full, reported by Orbax inside its own exception", CheckpointError,
      "OUT_DIR: no space left on device")
def out_enospc_wrapped(t):
    t.hf()

    def orbax_save(*args, **kwargs):
        try:
            _enospc()
        except OSError as e:
            raise RuntimeError("tensorstore write failed") from e

    t.mp.setattr(checkpoint.ocp1.partial, "save", orbax_save)
    t.convert()


@case("out", "write refused by the OS (EACCES)", CheckpointError, "OUT_DIR: cannot write the checkpoint",
      "Permission denied")
def out_write_refused(t):
    t.hf()

    def refuse(directory, *args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))

    t.mp.setattr(checkpoint, "save", refuse)
    t.convert()


# ---------------------------------------------------------------- loading
@case("load", "CKPT does not exist", CheckpointError, "CKPT: no such checkpoint directory")
def load_missing(t):
    t.load()


@case("load", "CKPT is a file", CheckpointError, "CKPT: not a directory")
def load_file(t):
    t.ckpt_dir.write_text("")
    t.load()


@case("load", "a Hugging Face directory (not converted)", CheckpointError,
      "HF_DIR: a Hugging Face model directory, not a gemma_jax checkpoint", "run 'gemma-jax convert HF_DIR OUT_DIR'")
def load_hf_dir(t):
    t.load(t.hf())


@case("load", "an empty directory", CheckpointError, "CKPT: not a gemma_jax checkpoint (no gemma_config.json)")
def load_empty(t):
    t.ckpt_dir.mkdir()
    t.load()


@case("load", "an interrupted conversion's .partial directory", CheckpointError,
      "TMP/.ckpt.partial-HOST-PID", "unfinished or replaced conversion", "not a checkpoint")
def load_partial(t):
    shutil.copytree(t.base.ckpt, t.tmp / ".ckpt.partial-host-123")   # complete, but never renamed
    t.load(t.tmp / ".ckpt.partial-host-123")


@case("load", "params/ removed", CheckpointError, "CKPT: incomplete checkpoint (no params/ directory")
def load_no_params(t):
    shutil.rmtree(t.ckpt() / "params")
    t.load()


@case("load", "params/ partly deleted (Orbax metadata)", CheckpointError,
      "CKPT: incomplete checkpoint: params/state/_METADATA is missing", "convert again")
def load_params_no_metadata(t):
    (t.ckpt() / "params" / "state" / "_METADATA").unlink()
    t.load()


@case("load", "params/ partly deleted (array data)", CheckpointError,
      "CKPT: incomplete checkpoint: params/state/ocdbt.process_HASH/d/HASH is missing")
def load_params_no_data(t):
    shutil.rmtree(sorted((t.ckpt() / "params" / "state").glob("ocdbt.process_*/d"))[0])
    t.load()


@case("load", "params/ file truncated", CheckpointError, "CKPT/params/state/manifest.ocdbt: truncated or corrupt",
      "(10 bytes, expected")
def load_params_truncated(t):
    path = t.ckpt() / "params" / "state" / "manifest.ocdbt"
    path.write_bytes(path.read_bytes()[:10])
    t.load()


@case("load", "params/ file overwritten with zeros (same size)", CheckpointError, "CKPT/params",
      "incomplete or corrupt Orbax checkpoint")
def load_params_zeroed(t):
    path = t.ckpt() / "params" / "state" / "_METADATA"
    path.write_bytes(bytes(path.stat().st_size))
    t.load()


@case("load", "params/ partly deleted, in a checkpoint without a file list", CheckpointError, "CKPT/params",
      "incomplete or corrupt Orbax checkpoint")
def load_params_unlisted(t):
    path = t.ckpt() / "gemma_config.json"
    meta = json.loads(path.read_text())
    del meta["params_files"]
    path.write_text(json.dumps(meta))
    (t.ckpt_dir / "params" / "state" / "_METADATA").unlink()
    t.load()


@case("load", "gemma_config.json missing", CheckpointError, "CKPT: incomplete checkpoint (no gemma_config.json")
def load_no_meta(t):
    (t.ckpt() / "gemma_config.json").unlink()
    t.load()


@case("load", "gemma_config.json corrupt", CheckpointError, "CKPT/gemma_config.json: corrupt checkpoint metadata",
      "not valid JSON")
def load_meta_corrupt(t):
    path = t.ckpt() / "gemma_config.json"
    path.write_text(path.read_text()[:40])
    t.load()


@case("load", "gemma_config.json without its config", CheckpointError, "CKPT/gemma_config.json",
      "no 'config'")
def load_meta_no_config(t):
    path = t.ckpt() / "gemma_config.json"
    meta = json.loads(path.read_text())
    del meta["config"]
    path.write_text(json.dumps(meta))
    t.load()


@case("load", "gemma_config.json of another format version", CheckpointError, "CKPT/gemma_config.json",
      "unsupported checkpoint format 99")
def load_meta_format(t):
    path = t.ckpt() / "gemma_config.json"
    meta = json.loads(path.read_text())
    meta["format"] = 99
    path.write_text(json.dumps(meta))
    t.load()


def _edit_meta_config(t, **changes):
    path = t.ckpt() / "gemma_config.json"
    meta = json.loads(path.read_text())
    meta["config"].update(changes)
    path.write_text(json.dumps(meta))


@case("load", "hidden_size edited in gemma_config.json", CheckpointError, "CKPT/params",
      "param 'blocks/0/attn/k' has shape [32, 32], gemma_config.json needs [48, 32]")
def load_hidden_size_edited(t):
    _edit_meta_config(t, hidden_size=48)
    t.load()


@case("load", "num_hidden_layers raised in gemma_config.json", CheckpointError, "CKPT/params",
      "params do not match gemma_config.json", "needs param 'blocks/3/")
def load_more_layers(t):
    _edit_meta_config(t, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    t.load()


@case("load", "num_hidden_layers lowered in gemma_config.json", CheckpointError, "CKPT/params",
      "params do not match gemma_config.json", "no place for stored param 'blocks/2/")
def load_fewer_layers(t):
    _edit_meta_config(t, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    t.load()


@case("load", "num_hidden_layers edited alone", CheckpointError, "CKPT/gemma_config.json",
      "layer_types has 3 entries but num_hidden_layers is 4")
def load_layers_contradiction(t):
    _edit_meta_config(t, num_hidden_layers=4)
    t.load()


@case("load", "tokenizer.model that is not SentencePiece", TokenizerError,
      "CKPT/tokenizer.model is not a SentencePiece model")
def load_bad_tokenizer(t):
    (t.ckpt() / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    t.load()


@case("load", "dtype float16 asked for (load)", GenerationError, "dtype 'float16' is not supported")
def load_dtype_float16(t):
    t.ckpt()
    t.load(dtype="float16")


@case("load", "quantize asked for with an unknown method", GenerationError, "quantize 'int4' is not supported")
def load_quantize_int4(t):
    t.ckpt()
    t.load(quantize="int4")


@case("load", "int8_mode asked for on float weights", GenerationError, "int8_mode 'dynamic'",
      "for int8 weights (an int8 checkpoint or quantize='int8')")
def load_int8_mode_float(t):
    t.ckpt()
    t.load(int8_mode="dynamic")


@case("load", "gemma_config.json of an int8 format without its quantization", CheckpointError,
      "CKPT/gemma_config.json: corrupt checkpoint metadata (format 4 with quantization None)")
def load_meta_quant_format(t):
    path = t.ckpt() / "gemma_config.json"
    meta = json.loads(path.read_text())
    meta["format"] = 4
    path.write_text(json.dumps(meta))
    t.load()


# ---------------------------------------------------------------- generating
@case("generate", "prompt + max_new_tokens > max_position_embeddings", GenerationError,
      "prompt: 60 tokens + max_new_tokens 10", f"max_position_embeddings {CONTEXT}")
def gen_too_long(t):
    t.base.model.generate_ids([[2] * 60], max_new_tokens=10)


@case("generate", "prompt alone longer than max_position_embeddings", GenerationError,
      f"prompt 1: {CONTEXT + 1} tokens + max_new_tokens 0", f"max_position_embeddings {CONTEXT}")
def gen_prompt_too_long(t):
    t.base.model.generate_ids([[2, 3], [2] * (CONTEXT + 1)], max_new_tokens=0)


@case("generate", "empty batch", GenerationError, "prompts is an empty batch")
def gen_empty_batch(t):
    t.base.model.generate_ids([], max_new_tokens=4)


@case("generate", "empty prompt", GenerationError, "prompt 1 must be a non-empty list of token ids")
def gen_empty_prompt(t):
    t.base.model.generate_ids([[2, 3], []], max_new_tokens=4)


@case("generate", "token id >= vocab_size", GenerationError, f"token id {VOCAB} is outside the vocabulary [0, {VOCAB})")
def gen_token_too_big(t):
    t.base.model.generate_ids([[2, VOCAB]], max_new_tokens=4)


@case("generate", "negative token id", GenerationError, f"token id -1 is outside the vocabulary [0, {VOCAB})")
def gen_token_negative(t):
    t.base.model.generate_ids([[2, -1]], max_new_tokens=4)


@case("generate", "token id outside the vocabulary (logits)", GenerationError, f"token id {VOCAB + 5} is outside")
def gen_logits_token(t):
    t.base.model.logits([[2, VOCAB + 5]])


@case("generate", "sequence longer than max_position_embeddings (logits)", GenerationError,
      f"sequence length {CONTEXT + 1} exceeds max_position_embeddings {CONTEXT}")
def gen_logits_too_long(t):
    t.base.model.logits([[2] * (CONTEXT + 1)])


@case("generate", "temperature < 0", GenerationError, "temperature must be a finite number >= 0, got -0.5")
def gen_temperature(t):
    t.base.model.generate_ids([[2]], max_new_tokens=4, temperature=-0.5)


@case("generate", "temperature NaN", GenerationError, "temperature must be a finite number >= 0, got nan")
def gen_temperature_nan(t):
    t.base.model.generate_ids([[2]], max_new_tokens=4, temperature=float("nan"))


@case("generate", "top_p = 0", GenerationError, "top_p must be in (0, 1], got 0")
def gen_top_p_zero(t):
    t.base.model.generate_ids([[2]], max_new_tokens=4, temperature=1.0, top_p=0.0)


@case("generate", "top_p > 1", GenerationError, "top_p must be in (0, 1], got 1.5")
def gen_top_p_big(t):
    t.base.model.generate_ids([[2]], max_new_tokens=4, temperature=1.0, top_p=1.5)


@case("generate", "top_k < 1", GenerationError, "top_k must be an integer >= 1, got 0")
def gen_top_k(t):
    t.base.model.generate_ids([[2]], max_new_tokens=4, temperature=1.0, top_k=0)


@case("generate", "max_new_tokens < 0", GenerationError, "max_new_tokens must be an integer >= 0, got -1")
def gen_max_new_negative(t):
    t.base.model.generate_ids([[2]], max_new_tokens=-1)


@case("generate", "text generation on a checkpoint without tokenizer.model", TokenizerError,
      "no tokenizer.model", "generate_ids")
def gen_no_tokenizer(t):
    t.base.model.generate("hello", max_new_tokens=4)


@case("generate", "chat whose roles do not alternate", TokenizerError, "chat message 1",
      "roles must alternate user/assistant", "'user'", tokenizer=True)
def chat_not_alternating(t):
    t.base.chat_model.chat([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
                           max_new_tokens=4)


@case("generate", "chat that starts with the model", TokenizerError, "chat message 0", "starting with user",
      "'model'", tokenizer=True)
def chat_starts_with_model(t):
    t.base.chat_model.chat([{"role": "model", "content": "hi"}, {"role": "user", "content": "hello"}],
                           max_new_tokens=4)


@case("generate", "chat with no messages", TokenizerError, "non-empty list", tokenizer=True)
def chat_empty(t):
    t.base.chat_model.chat([], max_new_tokens=4)


@case("generate", "chat + max_new_tokens > max_position_embeddings", GenerationError,
      "+ max_new_tokens 60", f"max_position_embeddings {CONTEXT}", tokenizer=True)
def chat_too_long(t):
    t.base.chat_model.chat([{"role": "user", "content": "hello"}], max_new_tokens=60)


@case("generate", "text + max_new_tokens > max_position_embeddings", GenerationError,
      "+ max_new_tokens 62", f"max_position_embeddings {CONTEXT}", tokenizer=True)
def text_too_long(t):
    t.base.chat_model.generate("hello world", max_new_tokens=62)


@case("generate", "max_new_tokens a bool", GenerationError, "max_new_tokens must be an integer >= 0, got True")
def gen_max_new_bool(t):
    t.base.model.generate_ids([[2]], max_new_tokens=True)


@case("generate", "stop_ids a single int", GenerationError, "stop_ids must be a list of token ids, got 6",
      "write [6]")
def gen_stop_ids_int(t):
    t.base.model.generate_ids([[2, 3]], max_new_tokens=4, stop_ids=6)


@case("generate", "stop id outside the vocabulary", GenerationError, f"stop_ids: token id {VOCAB}",
      f"[0, {VOCAB})")
def gen_stop_ids_outside(t):
    t.base.model.generate_ids([[2, 3]], max_new_tokens=4, stop_ids=[1, VOCAB])


@case("generate", "seed None", GenerationError, "seed must be an integer in [0, 4294967295], got None")
def gen_seed_none(t):
    t.base.model.generate_ids([[2, 3]], max_new_tokens=4, temperature=1.0, seed=None)


@case("generate", "a flat list of ids (generate_ids)", GenerationError, "list of token-id lists",
      "flat list of ids", "[[2, 651, ...]]")
def gen_flat_prompt(t):
    t.base.model.generate_ids([2, 3, 4], max_new_tokens=4)


@case("generate", "rows of different lengths (logits)", GenerationError,
      "token_ids has rows of different lengths [3, 2]", "attention_mask")
def gen_logits_ragged(t):
    t.base.model.logits([[2, 3, 4], [2, 3]])


@case("generate", "a hook that returns the wrong shape", GenerationError,
      "the hook at blocks.0.hook_resid_post returned float32[1, 1, 32], expected float32[1, 16, 32]",
      "generation pads the length axis to a compile bucket")
def gen_hook_shape(t):
    t.base.model.generate_ids([[2, 3, 4]], max_new_tokens=2, hooks={"blocks.0.hook_resid_post": lambda x: x[:, :1]})


@case("generate", "a hook that returns another dtype", GenerationError,
      "the hook at blocks.1.attn.hook_z returned bfloat16[1, 3, 4, 16], expected float32[1, 3, 4, 16]")
def gen_hook_dtype(t):
    import jax.numpy as jnp
    interp.run_with_hooks(t.base.model, [[2, 3, 4]], {"blocks.1.attn.hook_z": lambda z: z.astype(jnp.bfloat16)})


@case("generate", "stop_strings not text", GenerationError, "stop_strings must be a string or a list of strings, "
      "got 5", tokenizer=True)
def gen_stop_strings_int(t):
    t.base.chat_model.generate("hi", max_new_tokens=4, stop_strings=5)


@case("generate", "stream with a batch of prompts (generate)", GenerationError, "stream(piece) follows one prompt",
      "generate_ids(stream=...)", tokenizer=True)
def gen_stream_batch(t):
    t.base.chat_model.generate(["hi", "there"], max_new_tokens=4, stream=print)


@case("generate", "chat with a system message (no fold_system)", TokenizerError,
      "the 'system' role is not supported", "fold_system=True in Gemma.chat", "system= in ChatSession",
      tokenizer=True)
def chat_system(t):
    t.base.chat_model.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                           max_new_tokens=4)


@case("generate", "chat session message that leaves no room for a reply", GenerationError,
      "leaves no room for a reply", f"max_position_embeddings {CONTEXT}", "/reset", tokenizer=True)
def chat_session_full(t):
    ChatSession(t.base.chat_model, max_new_tokens=4).send("hello " * CONTEXT)


# ---------------------------------------------------------------- the command line
def _cli(*argv):
    """Run the CLI with --debug, which raises the GemmaError that it would print as one line."""
    cli.main(["--debug", "--no-compile-cache", *map(str, argv)])


def _without(t, module: str) -> None:
    """Make `module` look uninstalled to the CLI's up-front dependency checks."""
    import importlib.util
    real = importlib.util.find_spec
    t.mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


@case("cli", "bench --ckpt that does not exist", CheckpointError, "TMP/nope: no such checkpoint directory")
def cli_bench_no_ckpt(t):
    _cli("bench", "--ckpt", t.tmp / "nope")


@case("cli", "bench --hf-dir that does not exist", ConfigError, "TMP/nope: no such directory")
def cli_bench_no_hf_dir(t):
    _cli("bench", "--preset", "tiny", "--vs-hf", "--hf-dir", t.tmp / "nope")


@case("cli", "bench --vs-hf --ckpt without --hf-dir", GenerationError, "--vs-hf with --ckpt needs --hf-dir")
def cli_bench_vs_hf_no_hf_dir(t):
    _cli("bench", "--vs-hf", "--ckpt", t.base.ckpt)


@case("cli", "bench --vs-hf without torch", DependencyError,
      "--vs-hf needs torch, which is not installed (pip install 'gemma_jax[test]')")
def cli_bench_no_torch(t):
    _without(t, "torch")
    _cli("bench", "--preset", "tiny", "--vs-hf")


@case("cli", "bench --plot without matplotlib", DependencyError,
      "--plot needs matplotlib, which is not installed")
def cli_bench_no_matplotlib(t):
    _without(t, "matplotlib")
    _cli("bench", "--preset", "tiny", "--plot", t.tmp / "b.png")


@case("cli", "bench --json into a directory that does not exist", GenerationError,
      "--json TMP/missing/b.json: the directory TMP/missing does not exist")
def cli_bench_json_dir(t):
    _cli("bench", "--preset", "tiny", "--json", t.tmp / "missing" / "b.json")


@case("cli", "bench --batch that is not a list of integers", GenerationError,
      "--batch and --prompt-len take comma-separated integers")
def cli_bench_batch(t):
    _cli("bench", "--batch", "1,x")


@case("cli", "generate on a checkpoint without tokenizer.model", TokenizerError,
      "CKPT has no tokenizer.model, so it cannot read or write text")
def cli_generate_no_tokenizer(t):
    _cli("generate", "--ckpt", t.ckpt(), "--prompt", "hi")


@case("cli", "generate --max-new-tokens -1", GenerationError, "--max-new-tokens must be an integer >= 0, got -1")
def cli_generate_max_new(t):
    _cli("generate", "--ckpt", t.base.ckpt, "--prompt", "hi", "--max-new-tokens", "-1")


@case("cli", "generate --seed -1", GenerationError, "--seed must be an integer in [0, 4294967295], got -1")
def cli_generate_seed(t):
    _cli("generate", "--ckpt", t.base.ckpt, "--prompt", "hi", "--temperature", "1", "--seed", "-1")


@case("cli", "generate --system without --chat", GenerationError, "--system needs --chat")
def cli_generate_system(t):
    _cli("generate", "--ckpt", t.base.ckpt, "--prompt", "hi", "--system", "be brief")


@case("cli", "generate: prompt + --max-new-tokens > max_position_embeddings", GenerationError,
      "--prompt: 2 tokens + --max-new-tokens 100 exceeds", f"max_position_embeddings {CONTEXT}", tokenizer=True)
def cli_generate_too_long(t):
    _cli("generate", "--ckpt", t.base.chat_ckpt, "--prompt", "hello", "--max-new-tokens", "100")


@case("cli", "parity --hf that does not exist", ConfigError, "TMP/nope: no such directory")
def cli_parity_no_hf(t):
    _cli("parity", "--hf", t.tmp / "nope")


@case("cli", "parity without transformers", DependencyError, "parity needs transformers, which is not installed")
def cli_parity_no_transformers(t):
    _without(t, "transformers")
    _cli("parity", "--hf", t.hf())
# ---------------------------------------------------------------- research
IDS = [[2, 5, 9, 11]]


@case("research", "hook site pattern that matches nothing", GenerationError,
      "no hook site matches 'blocks.*.hook_resid'")
def research_no_site(t):
    t.base.model.run_with_cache(IDS, names=["blocks.*.hook_resid"])


@case("research", "stop_at_layer outside the model", GenerationError, "stop_at_layer must be an integer in [-3, 3], got 4")
def research_stop_at_layer(t):
    t.base.model.run_with_cache(IDS, stop_at_layer=4)


@case("research", "incl_grad with stop_at_layer", GenerationError, "incl_grad needs the logits")
def research_grad_and_stop(t):
    t.base.model.run_with_cache(IDS, incl_grad=lambda logits: logits.sum(), stop_at_layer=1)


@case("research", "a cache helper needing a site that was not cached", GenerationError,
      "needs blocks.0.attn.hook_z in the cache")
def research_uncached(t):
    t.base.model.run_with_cache(IDS, names=["hook_embed"])[1].stack_head_results()


@case("research", "logit_attrs for a token outside the vocabulary", GenerationError,
      f"tokens must be ids in [0, {VOCAB})")
def research_attr_token(t):
    _, cache = t.base.model.run_with_cache(IDS, names=["hook_embed", "ln_final.hook_scale"])
    cache.logit_attrs(cache.decompose_resid(layer=0), VOCAB)


def _saelens_dir(t, **cfg_changes):
    from gemma_jax import sae
    d = sae.SAE(np.ones((32, 4)), np.ones((4, 32)), np.zeros(4), np.zeros(32), np.zeros(4),
                hook_name="blocks.0.hook_resid_post").save(t.tmp / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, **cfg_changes}))
    return d


@case("research", "SAELens directory without sae_weights.safetensors", CheckpointError,
      "TMP/sae/sae_weights.safetensors: missing")
def research_sae_no_weights(t):
    from gemma_jax import sae
    (_saelens_dir(t) / "sae_weights.safetensors").unlink()
    sae.SAE.load(t.tmp / "sae")


@case("research", "SAELens architecture we do not run", CheckpointError, "architecture 'gated' is not supported")
def research_sae_gated(t):
    from gemma_jax import sae
    sae.SAE.load(_saelens_dir(t, architecture="gated"))


@case("research", "saving an SAE over an existing directory", CheckpointError, "TMP/sae: already exists")
def research_sae_exists(t):
    from gemma_jax import sae
    sae.SAE.load(_saelens_dir(t)).save(t.tmp / "sae")


@case("research", "capture with a model without a tokenizer", TokenizerError,
      "capture tokenizes text files: this checkpoint has no tokenizer.model")
def research_capture_no_tokenizer(t):
    from gemma_jax import capture
    (t.tmp / "a.txt").write_text("def f():\n    return 1\n")
    capture.capture(t.base.model, [t.tmp / "a.txt"], t.out, capture.CaptureSpec(("hook_embed",), seq_len=8))


@case("research", "capture of a text file that is not UTF-8", GenerationError, "TMP/a.txt: not UTF-8 text",
      tokenizer=True)
def research_capture_not_utf8(t):
    from gemma_jax import capture
    (t.tmp / "a.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    capture.capture(t.base.chat_model, [t.tmp / "a.txt"], t.out, capture.CaptureSpec(("hook_embed",), seq_len=8))


@case("research", "capture into a directory that is not a capture", GenerationError,
      "OUT_DIR: exists and is not a capture directory", tokenizer=True, after=lambda t: None)
def research_capture_busy(t):
    from gemma_jax import capture
    (t.tmp / "a.txt").write_text("def f():\n    return 1\n")
    t.out.mkdir()
    (t.out / "notes.txt").write_text("mine")
    capture.capture(t.base.chat_model, [t.tmp / "a.txt"], t.out, capture.CaptureSpec(("hook_embed",), seq_len=8))


@case("research", "resuming a capture with other settings", GenerationError,
      "TMP/acts holds a capture with different 'seq_len'", tokenizer=True)
def research_capture_other_settings(t):
    from gemma_jax import capture
    (t.tmp / "a.txt").write_text("def f():\n    return 1\n" * 20)
    capture.capture(t.base.chat_model, [t.tmp / "a.txt"], t.tmp / "acts", capture.CaptureSpec(("hook_embed",), seq_len=8))
    capture.capture(t.base.chat_model, [t.tmp / "a.txt"], t.tmp / "acts", capture.CaptureSpec(("hook_embed",), seq_len=9))


# ---------------------------------------------------------------- scoring and evaluation
@case("evaluate", "request longer than max_position_embeddings (score_pairs)", EvaluationError,
      "request 0: context + continuation feed 69 tokens", f"max_position_embeddings {CONTEXT}", "truncate_pair")
def eval_pair_too_long(t):
    from gemma_jax.evaluation import scoring
    scoring.score_pairs(t.base.model, [([2] * 60, [3] * 10)])


@case("evaluate", "empty continuation (score_pairs)", EvaluationError,
      "request 1: the continuation must be a non-empty list of token ids")
def eval_pair_empty(t):
    from gemma_jax.evaluation import scoring
    scoring.score_pairs(t.base.model, [([2], [3]), ([2], [])])


@case("evaluate", "window longer than max_position_embeddings (score)", EvaluationError,
      f"window must be an integer in [1, max_position_embeddings={CONTEXT}], got {CONTEXT + 1}")
def eval_window_too_long(t):
    t.base.model.score([2, 3, 4], window=CONTEXT + 1)


@case("evaluate", "stride larger than the window (score)", EvaluationError,
      "stride must be an integer in [1, window=8], got 9")
def eval_stride(t):
    t.base.model.score([2, 3, 4], window=8, stride=9)


@case("evaluate", "continuation that adds no token (loglikelihood)", EvaluationError,
      "request 0: the continuation '' adds no token to the context", tokenizer=True)
def eval_empty_continuation(t):
    t.base.chat_model.loglikelihood("hello", "")


@case("evaluate", "file to score does not exist", EvaluationError, "TMP/missing.txt: no such file")
def eval_file_missing(t):
    from gemma_jax.evaluation import perplexity
    perplexity.read_text(t.tmp / "missing.txt")


@case("evaluate", "file to score is not UTF-8", EvaluationError, "TMP/latin1.txt: not UTF-8 text (byte 3)")
def eval_file_not_utf8(t):
    from gemma_jax.evaluation import perplexity
    path = t.tmp / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    perplexity.read_text(path)


@case("evaluate", "file to score is empty", EvaluationError, "TMP/empty.txt: empty file, nothing to score")
def eval_file_empty(t):
    from gemma_jax.evaluation import perplexity
    (t.tmp / "empty.txt").write_text("")
    perplexity.read_text(t.tmp / "empty.txt")


@case("evaluate", "an SAE without its hook site", EvaluationError, "an sae needs sae_site")
def eval_sae_no_site(t):
    from gemma_jax.evaluation import steering
    from gemma_jax.sae import JumpReLUSAE
    d, f = t.base.model.config.hidden_size, 4
    sae = JumpReLUSAE(np.zeros((d, f)), np.zeros((f, d)), np.zeros(f), np.zeros(d), np.zeros(f))
    steering.with_sae(t.base.model.config, None, sae)


@case("evaluate", "--sae-steer without FEATURE=SCALE", EvaluationError, "--sae-steer takes FEATURE=SCALE", "'12'")
def eval_steer_format(t):
    from gemma_jax.evaluation import steering
    steering.parse_steer(["12"])


@case("evaluate", "unknown lm-eval model argument", EvaluationError,
      "gemma_jax model: unknown argument(s) ['temperature']")
def eval_unknown_model_arg(t):
    from gemma_jax.evaluation.harness import GemmaLM
    GemmaLM(t.base.model, temperature=0.5)


@case("evaluate", "lm-eval model pretrained= a Hugging Face directory", EvaluationError,
      "HF_DIR is a Hugging Face directory: convert it first")
def eval_pretrained_hf_dir(t):
    from gemma_jax.evaluation.harness import GemmaLM
    GemmaLM(str(t.hf()))


@case("evaluate", "generation argument lm-eval passes that gemma_jax lacks", EvaluationError,
      "generation argument(s) ['num_beams'] are not supported", tokenizer=True)
def eval_gen_kwarg(t):
    from lm_eval.api.instance import Instance

    from gemma_jax.evaluation.harness import GemmaLM
    lm = GemmaLM(t.base.chat_model)
    lm.generate_until([Instance("generate_until", {}, ("hi", {"num_beams": 4, "max_gen_toks": 2}), 0)],
                      disable_tqdm=True)


# ----------------------------------------------------------------------------------------- running
RESULTS: dict[str, str] = {}   # case name -> scrubbed message, filled by test_refused


def run_case(c: Case, tmp: Path, base: Base) -> str:
    """Run one case; check type, words, one line and the disk; return the scrubbed message."""
    with pytest.MonkeyPatch.context() as mp:
        t = Ctx(tmp, base, mp)
        with pytest.raises(GemmaError) as info:
            c.run(t)
    assert type(info.value) is c.error, f"{c.name}: {type(info.value).__name__}: {info.value}"
    message = t.scrub(str(info.value))
    assert message and "\n" not in message, repr(message)
    assert "Traceback" not in message
    for word in c.words:
        assert word in message, f"{c.name}: {word!r} not in {message!r}"
    if c.after is not None:
        c.after(t)
    else:
        assert leftovers(tmp) == [], f"{c.name} left {leftovers(tmp)} on disk"
    RESULTS[c.name] = message
    return message


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_refused(c: Case, tmp_path, base):
    if c.tokenizer and base.chat_model is None:
        pytest.skip("needs GEMMA_JAX_TOKENIZER_DIR (the real Gemma 2 tokenizer.model)")
    run_case(c, tmp_path, base)


def test_every_error_class_has_a_case():
    assert {c.error for c in CASES} == {ConfigError, CheckpointError, TokenizerError, GenerationError,
                                        DependencyError, EvaluationError}
    assert len({c.what for c in CASES}) == len(CASES), "two cases with the same description"


# ----------------------------------------------------------------------------------------- the doc
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(c: Case, message: str) -> str:
    return f"| {_cell(c.what)} | `{c.error.__name__}` | `{_cell(message)}` |"


DOC_HEAD = f"""\
# Errors

<!-- Generated from the cases in tests/test_errors.py, which also checks that this file is current.
     After changing a message: {UPDATE_ENV}=1 python -m pytest tests/test_errors.py -k errors_doc -->

Every refused input raises a subclass of `gemma_jax.errors.GemmaError` whose message is one line
naming the file, tensor, argument or limit at fault:

| Exception | Raised for |
|---|---|
| `ConfigError` | a `config.json` that is not a usable Gemma 2 config |
| `CheckpointError` | a missing, corrupt, incomplete or mismatched checkpoint or safetensors file; an \
output directory that cannot be written |
| `TokenizerError` | a tokenizer file that cannot be used, or a chat that cannot be rendered |
| `GenerationError` | generation arguments or prompts that cannot be honoured |
| `DependencyError` | an optional package a command needs (torch, transformers, matplotlib) that is not installed |
| `EvaluationError` | scoring or evaluation requests, files, tasks or options that cannot be used |

The command line prints `gemma-jax: error: <message>` on stderr (one line, no traceback) and exits
with status 2; `gemma-jax --debug ...` raises the exception instead. Command-line usage mistakes
are reported the same way. Anything else is a bug: its traceback is printed and the exit status
is 1. A conversion writes into a hidden sibling `.OUT_DIR.partial-HOST-PID` and renames it into
place only when complete, so a failed or killed conversion never leaves a directory at OUT_DIR
that `load` would take; the next conversion into OUT_DIR on the same host removes what a killed one
left (and puts back a checkpoint that `--force` had moved aside when it was killed).

Paths in the messages below: `HF_DIR` is the Hugging Face model directory, `OUT_DIR` the
conversion's output, `CKPT` a converted checkpoint, `TMP` a scratch directory.
"""


def render_doc(messages: dict[str, str]) -> str:
    parts = [DOC_HEAD]
    for key, title in SECTIONS.items():
        parts.append(f"\n## {title}\n\n| Input | Exception | Message |\n|---|---|---|\n")
        parts.extend(_row(c, messages[c.name]) + "\n" for c in CASES if c.section == key)
    return "".join(parts)


def test_errors_doc_is_current(base, tmp_path_factory):
    """docs/errors.md is the table of the messages the cases produce (run here if not yet run)."""
    current = DOC.read_text() if DOC.is_file() else ""
    messages = {}
    for c in CASES:
        if c.name in RESULTS:
            messages[c.name] = RESULTS[c.name]
        elif c.tokenizer and base.chat_model is None:
            # Cannot run here: keep the doc's row for it, which must exist.
            prefix = f"| {_cell(c.what)} | `{c.error.__name__}` | `"
            row = next((line for line in current.splitlines() if line.startswith(prefix)), None)
            if row is None or os.environ.get(UPDATE_ENV):
                pytest.skip("needs GEMMA_JAX_TOKENIZER_DIR (the real Gemma 2 tokenizer.model) to render every row")
            messages[c.name] = row[len(prefix):-3].replace("\\|", "|")
        else:
            messages[c.name] = run_case(c, tmp_path_factory.mktemp(c.name), base)
    expected = render_doc(messages)
    if os.environ.get(UPDATE_ENV):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(expected)
        current = expected
    assert current == expected, (f"{DOC} is out of date with tests/test_errors.py; regenerate it with "
                                 f"{UPDATE_ENV}=1 python -m pytest tests/test_errors.py -k errors_doc")


# ----------------------------------------------------------------------------------------- accepted
def test_float16_weights_convert_to_float32_loudly(tmp_path):
    half = hf_model(seed=5, dtype=torch.float16)
    save(half, tmp_path / "hf16")
    save(hf_model(seed=5, dtype=torch.float16).float(), tmp_path / "hf32")   # the same values in float32
    with pytest.warns(GemmaWarning, match="float16 weights: converting to float32"):
        gemma_jax.convert(tmp_path / "hf16", tmp_path / "ckpt16")
    gemma_jax.convert(tmp_path / "hf32", tmp_path / "ckpt32")
    meta = json.loads((tmp_path / "ckpt16" / "gemma_config.json").read_text())
    assert meta["param_dtype"] == "float32"
    a, b = gemma_jax.load(tmp_path / "ckpt16"), gemma_jax.load(tmp_path / "ckpt32")
    assert a.model.embedder.embedding[...].dtype == np.float32
    ids = [[2, 17, 99, 5, 64]]
    logits = a.logits(ids)
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, b.logits(ids))


# ----------------------------------------------------------------------------------------- replacing
def _embedding(ckpt: Path) -> np.ndarray:
    return np.asarray(gemma_jax.load(ckpt).model.embedder.embedding[...]).T  # stored [D, V]


def _hf_embedding(hf_dir: Path) -> np.ndarray:
    return tensors(hf_dir / "model.safetensors")["model.embed_tokens.weight"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("two")
    save(hf_model(seed=9), root / "hf_new")
    return base.hf, root / "hf_new"


def test_force_replaces_only_when_complete(tmp_path, two_models, base):
    old_hf, new_hf = two_models
    out = tmp_path / "out"
    shutil.copytree(base.ckpt, out)

    def fail_midway(items, total):
        for i, item in enumerate(items):
            if i == 3:
                raise RuntimeError("simulated crash in the middle of the conversion")
            yield item

    with pytest.raises(RuntimeError, match="simulated crash"):
        gemma_jax.convert(new_hf, out, force=True, progress=fail_midway)
    assert leftovers(tmp_path) == ["out"]
    np.testing.assert_array_equal(_embedding(out), _hf_embedding(old_hf))   # old one intact, loadable

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", _enospc)
        with pytest.raises(CheckpointError, match="no space left"):
            gemma_jax.convert(new_hf, out, force=True)
    assert leftovers(tmp_path) == ["out"]
    np.testing.assert_array_equal(_embedding(out), _hf_embedding(old_hf))

    gemma_jax.convert(new_hf, out, force=True)
    assert leftovers(tmp_path) == ["out"]
    np.testing.assert_array_equal(_embedding(out), _hf_embedding(new_hf))   # replaced


KILL_SCRIPT = textwrap.dedent("""\
    import os, signal, sys
    from gemma_jax import checkpoint
    from gemma_jax.convert import convert

    hf, out, where, force = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "force"

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def progress(items, total):
        for i, item in enumerate(items):
            if where == "tensors" and i == 3:
                kill()
            yield item

    real_save = checkpoint.save

    def save(*args):
        real_save(*args)
        if where == "before_rename":
            kill()     # the temporary directory is complete, gemma_config.json and all

    checkpoint.save = save
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if where == "between_renames" and ".old-" in str(dst):
            kill()     # the old checkpoint moved aside, the new one not yet in place

    os.rename = rename
    convert(hf, out, force=force, progress=progress)
""")


@pytest.mark.parametrize("where,force", [("tensors", False), ("before_rename", False), ("tensors", True),
                                         ("before_rename", True), ("between_renames", True)])
def test_killed_conversion_leaves_nothing_loadable(tmp_path, two_models, base, where, force):
    old_hf, new_hf = two_models
    out = tmp_path / "out"
    if force:
        shutil.copytree(base.ckpt, out)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(new_hf), str(out), where,
                           "force" if force else "new"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and partial[0].name.startswith(f".out.partial-{socket.gethostname()}-")
    with pytest.raises(CheckpointError, match="unfinished or replaced conversion"):
        gemma_jax.load(partial[0])              # even when complete, it is never taken for a checkpoint
    if where == "between_renames":
        assert not out.exists()                 # the old checkpoint is aside, at .out.old-HOST-PID
        with pytest.raises(CheckpointError, match="no such checkpoint directory"):
            gemma_jax.load(out)
    elif force:
        np.testing.assert_array_equal(_embedding(out), _hf_embedding(old_hf))   # old one intact
    else:
        with pytest.raises(CheckpointError, match="no such checkpoint directory"):
            gemma_jax.load(out)
    # The next conversion into out removes what the killed one left (and puts a moved-aside old
    # checkpoint back first, so without --force it refuses to overwrite it).
    if where == "between_renames":
        with pytest.raises(CheckpointError, match="already exists"):
            gemma_jax.convert(new_hf, out)
        np.testing.assert_array_equal(_embedding(out), _hf_embedding(old_hf))
    gemma_jax.convert(new_hf, out, force=True)
    assert leftovers(tmp_path) == ["out"]
    np.testing.assert_array_equal(_embedding(out), _hf_embedding(new_hf))


def test_stale_work_dirs_of_live_or_other_hosts_are_kept(tmp_path, base):
    not_ours = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-x"   # not our name pattern
    other_host = tmp_path / f".out.partial-elsewhere-{dead_pid()}"
    mine_alive = tmp_path / f".out.partial-{socket.gethostname()}-{os.getppid()}"
    mine_dead = tmp_path / f".out.partial-{socket.gethostname()}-{dead_pid()}"
    for d in (not_ours, other_host, mine_alive, mine_dead):
        d.mkdir()
    gemma_jax.convert(base.hf, tmp_path / "out")
    assert not mine_dead.exists()
    assert not_ours.exists() and other_host.exists() and mine_alive.exists()


# ----------------------------------------------------------------------------------------- properties
finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(temperature=st.floats(0, 1e6) | st.integers(0, 10**6),
       top_k=st.none() | st.integers(1, 10**9),
       top_p=st.none() | st.floats(0, 1, exclude_min=True) | st.just(1))
def test_sampling_accepts_valid(temperature, top_k, top_p):
    s = Sampling(temperature, top_k, top_p)
    assert (s.temperature, s.top_k, s.top_p) == (temperature, top_k, top_p)
    assert s.greedy == (temperature == 0 or top_k == 1)


bad_temperature = (st.floats(min_value=1e-300, allow_nan=False).map(lambda x: -x) | st.just(float("nan"))
                   | st.just(float("inf")) | st.integers(max_value=-1) | st.text() | st.none())
bad_top_k = st.integers(max_value=0) | finite | st.text()
bad_top_p = (st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True) | st.just(float("nan"))
             | st.text())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_sampling_refuses_invalid(data):
    which = data.draw(st.sampled_from(["temperature", "top_k", "top_p"]))
    kwargs = {"temperature": data.draw(st.floats(0, 10)), "top_k": None, "top_p": None}
    bad = data.draw({"temperature": bad_temperature, "top_k": bad_top_k, "top_p": bad_top_p}[which])
    kwargs[which] = bad
    with pytest.raises(GenerationError, match=which):
        Sampling(**kwargs)


@settings(max_examples=100, deadline=None)
@given(prompt=st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=20),
       max_new_tokens=st.integers(-5, 2 * CONTEXT))
def test_generate_ids_validation(base, prompt, max_new_tokens):
    """Every prompt/length combination is either refused with GenerationError before any compute, or
    valid (the valid ones are not run here: that would compile)."""
    valid = all(0 <= t < VOCAB for t in prompt) and max_new_tokens >= 0 and len(prompt) + max_new_tokens <= CONTEXT
    if valid:
        base.model._check_prompts([prompt], max_new_tokens)
    else:
        with pytest.raises(GenerationError):
            base.model.generate_ids([prompt], max_new_tokens)
