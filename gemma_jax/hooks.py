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
import fnmatch
import functools
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.config import GemmaConfig
from gemma_jax.errors import GenerationError

_BLOCK_SITES = ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
                "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
                "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def site_names(config: GemmaConfig) -> list[str]:
    """Every hook site of a model, in the order the forward pass reaches them."""
    names = ["hook_embed"]
    for layer in range(config.num_hidden_layers):
        names += [f"blocks.{layer}.{site}" for site in _BLOCK_SITES]
    return names + ["ln_final.hook_normalized", "hook_logits"]


def resolve(config: GemmaConfig, names: str | Iterable[str] | None) -> tuple[str, ...]:
    """Exact site names for names/glob patterns ('blocks.*.hook_resid_post'); None means all."""
    every = site_names(config)
    if names is None:
        return tuple(every)
    patterns = [names] if isinstance(names, str) else list(names)
    out = []
    for pattern in patterns:
        hits = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise GenerationError(f"no hook site matches {pattern!r} (see gemma_jax.hooks.site_names)")
        out += [h for h in hits if h not in out]
    return tuple(sorted(out, key=every.index))


def forward(graphdef, state, tokens, positions, hook=None):
    """Pure forward (no jit of its own): soft-capped float32 logits [B, T, V] with an optional
    `hook(name, value) -> value` applied at every site."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, positions, hook=hook)
    return model.logits(hidden, hook=hook)


@functools.partial(jax.jit, static_argnums=0)
def finite_by_site(graphdef, state, tokens, positions) -> dict[str, jax.Array]:
    """Whether every value at each site is finite (one bool per site), in one compiled call."""
    flags = {}

    def hook(name, value):
        flags[name] = jnp.all(jnp.isfinite(value))
        return value

    forward(graphdef, state, tokens, positions, hook)
    return flags


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Edits at hook sites, `((site, fn), ...)`, as a hashable callable `hook(name, value)`: a
    static argument under jit (the same functions compile once). Every entry for a site applies,
    in order."""

    table: tuple[tuple[str, Callable], ...]

    @classmethod
    def from_mapping(cls, config: GemmaConfig, hooks: Mapping[str, Callable]) -> Hooks:
        """{site or pattern: fn(value) -> value} -> Hooks; a site matched by several keys gets each
        key's function, in the mapping's order."""
        return cls(tuple((site, fn) for key, fn in hooks.items() for site in resolve(config, key)))

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        for site, fn in self.table:
            if site == name:
                value = _checked(site, value, fn(value))
        return value


def _checked(site: str, value: jax.Array, out) -> jax.Array:
    """A hook's result must look like its input (checked while tracing: no cost at run time).
    Shapes are those of the traced call: generation pads T to a compile bucket."""
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != value.shape or dtype != value.dtype:
        got = f"{dtype}{list(shape)}" if shape is not None and dtype is not None else type(out).__name__
        raise GenerationError(f"the hook at {site} returned {got}, expected {value.dtype}{list(value.shape)} "
                              "(the shape and dtype it was given; generation pads the length axis to a compile "
                              "bucket)")
    return out
