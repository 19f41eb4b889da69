"""The public entry point: `load` a converted checkpoint and run it."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import checkpoint
from gemma_jax.config import GemmaConfig
from gemma_jax.errors import GenerationError
from gemma_jax.model import Transformer, abstract_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """[B, T] 0/1 mask -> positions counting real tokens from 0, -1 at padding (any side)."""
    mask = np.asarray(mask).astype(bool)
    return np.where(mask, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, state, tokens, positions):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, positions)
    return model.logits(hidden)


class Gemma:
    """A loaded model: config, parameters (an nnx State), compute dtype and optional tokenizer."""

    def __init__(self, model: Transformer, tokenizer=None):
        self.config: GemmaConfig = model.config
        self.dtype = model.dtype
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer

    @property
    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)

    def check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = int(tokens.min() if tokens.min() < 0 else tokens.max())
            raise GenerationError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def logits(self, token_ids, attention_mask=None) -> np.ndarray:
        """int [B, T] ids (and optional 0/1 mask for padding) -> float32 logits [B, T, V]."""
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise GenerationError(f"token_ids must be a non-empty [batch, length] array, got shape {list(tokens.shape)}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise GenerationError(f"token_ids must be integers, got {tokens.dtype}")
        mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != tokens.shape:
            raise GenerationError(f"attention_mask shape {list(mask.shape)} != token_ids shape {list(tokens.shape)}")
        self.check_tokens(tokens[mask.astype(bool)])
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise GenerationError(f"sequence length {tokens.shape[1]} exceeds max_position_embeddings "
                                  f"{self.config.max_position_embeddings}")
        tokens = np.where(mask.astype(bool), tokens, self.config.pad_token_id).astype(np.int32)
        out = _forward_logits(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(positions_from_mask(mask)))
        return np.asarray(out, dtype=np.float32)


def load(ckpt_dir: str | Path, dtype: str | None = None) -> Gemma:
    """Load a converted checkpoint. dtype: 'float32' | 'bfloat16' | None (the stored dtype)."""
    ckpt_dir = Path(ckpt_dir)
    config, stored = checkpoint.read_meta(ckpt_dir)
    dtype = dtype or stored
    if dtype not in DTYPES:
        raise GenerationError(f"dtype {dtype!r} is not supported (float32 or bfloat16)")
    jdtype = DTYPES[dtype]
    abstract = abstract_model(config, param_dtype=jdtype, dtype=jdtype)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    expected = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in checkpoint.param_shapes(abstract).items()}
    params = checkpoint.restore(ckpt_dir, expected)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, checkpoint.unflatten(params))
    model = nnx.merge(graphdef, state)
    tokenizer = None
    if (ckpt_dir / "tokenizer.model").is_file():
        from gemma_jax.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(ckpt_dir / "tokenizer.model")
    return Gemma(model, tokenizer)
