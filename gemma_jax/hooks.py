"""The catalogue of hook sites (TransformerLens names) and running the model with hooks.

Sites, in forward order (shapes for a forward over T tokens):
    hook_embed                        [B, T, D]  after the sqrt(D) scale
    blocks.{L}.hook_resid_pre         [B, T, D]
    blocks.{L}.attn.hook_q / hook_k   [B, T, N|K, H] after RoPE
    blocks.{L}.attn.hook_v            [B, T, K, H]
    blocks.{L}.attn.hook_attn_scores  [B, N, T, S] scaled, soft-capped, masked (masked = -2.38e38)
    blocks.{L}.attn.hook_pattern      [B, N, T, S] softmax
    blocks.{L}.attn.hook_z            [B, T, N*H] heads concatenated before the output projection
    blocks.{L}.hook_attn_out          [B, T, D]  after the post-attention norm (added to the residual)
    blocks.{L}.hook_resid_mid         [B, T, D]
    blocks.{L}.mlp.hook_pre           [B, T, F]  gate pre-activation
    blocks.{L}.mlp.hook_pre_linear    [B, T, F]  up projection
    blocks.{L}.mlp.hook_post          [B, T, F]  gelu_tanh(gate) * up
    blocks.{L}.hook_mlp_out           [B, T, D]  after the post-feedforward norm
    blocks.{L}.hook_resid_post        [B, T, D]
    ln_final.hook_normalized          [B, T, D]
    hook_logits                       [B, T, V]  after the final soft-cap
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.config import GemmaConfig

_BLOCK_SITES = ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
                "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
                "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def site_names(config: GemmaConfig) -> list[str]:
    """Every hook site of a model, in the order the forward pass reaches them."""
    names = ["hook_embed"]
    for layer in range(config.num_hidden_layers):
        names += [f"blocks.{layer}.{site}" for site in _BLOCK_SITES]
    return names + ["ln_final.hook_normalized", "hook_logits"]


@functools.partial(jax.jit, static_argnums=0)
def finite_by_site(graphdef, state, tokens, positions) -> dict[str, jax.Array]:
    """Whether every value at each site is finite (one bool per site), in one compiled call."""
    model = nnx.merge(graphdef, state)
    flags = {}

    def hook(name, value):
        flags[name] = jnp.all(jnp.isfinite(value))
        return value

    hidden, _ = model(tokens, positions, hook=hook)
    model.logits(hidden, hook=hook)
    return flags


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Edits at hook sites, `((site, fn), ...)`, as a hashable callable `hook(name, value)`: a
    static argument under jit (the same functions compile once)."""

    table: tuple[tuple[str, Callable], ...]

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        for site, fn in self.table:
            if site == name:
                value = fn(value)
        return value
