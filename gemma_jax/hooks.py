"""The catalogue of hook sites (TransformerLens names and meanings) and running the model with hooks.

Sites, in forward order (shapes for a forward over T tokens; * = computed only when a hook wants it):
    hook_embed                           [B, T, D]     after the sqrt(D) scale
    blocks.{L}.hook_resid_pre            [B, T, D]
    blocks.{L}.ln1.hook_scale *          [B, T, 1]     sqrt(mean(x^2) + eps), float32
    blocks.{L}.ln1.hook_normalized *     [B, T, D]     x / scale, float32 (before the (1 + w) weight)
    blocks.{L}.ln1.hook_out              [B, T, D]     normalized * (1 + w): the attention's input
    blocks.{L}.attn.hook_q / hook_k      [B, T, N|K, H] projections BEFORE RoPE
    blocks.{L}.attn.hook_v               [B, T, K, H]
    blocks.{L}.attn.hook_rot_q / rot_k   [B, T, N|K, H] after RoPE
    blocks.{L}.attn.hook_attn_scores     [B, N, T, S]  scaled, soft-capped, masked (masked = -2.38e38)
    blocks.{L}.attn.hook_pattern         [B, N, T, S]  softmax
    blocks.{L}.attn.hook_z               [B, T, N, H]  per-head values mix, before the output projection
    blocks.{L}.attn.hook_result *        [B, T, N, D]  per-head output projection (sums to attn.hook_out)
    blocks.{L}.attn.hook_out             [B, T, D]     output projection, before the post-attention norm
    blocks.{L}.ln1_post.hook_scale / hook_normalized *   (the post-attention norm)
    blocks.{L}.hook_attn_out             [B, T, D]     after the post-attention norm (added to the residual)
    blocks.{L}.hook_resid_mid            [B, T, D]
    blocks.{L}.ln2.hook_scale / hook_normalized *, ln2.hook_out   (the pre-MLP norm)
    blocks.{L}.mlp.hook_pre              [B, T, F]     gate pre-activation
    blocks.{L}.mlp.hook_pre_linear       [B, T, F]     up projection
    blocks.{L}.mlp.hook_post             [B, T, F]     gelu_tanh(gate) * up
    blocks.{L}.mlp.hook_out              [B, T, D]     down projection, before the post-MLP norm
    blocks.{L}.ln2_post.hook_scale / hook_normalized *   (the post-MLP norm)
    blocks.{L}.hook_mlp_out              [B, T, D]     after the post-MLP norm
    blocks.{L}.hook_resid_post           [B, T, D]
    ln_final.hook_scale / hook_normalized *, ln_final.hook_out   (the final norm)
    unembed.hook_out                     [B, T, V]     float32 logits before the final soft-cap
    hook_logits                          [B, T, V]     after the final soft-cap

ALIASES maps TransformerLens's other names for the same values (e.g. `blocks.L.ln1_post.hook_out`
is `blocks.L.hook_attn_out`) to these sites.
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

_BLOCK_SITES = (
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "ln1.hook_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "attn.hook_out",
    "ln1_post.hook_scale", "ln1_post.hook_normalized", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_scale", "ln2.hook_normalized", "ln2.hook_out",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "mlp.hook_out",
    "ln2_post.hook_scale", "ln2_post.hook_normalized", "hook_mlp_out", "hook_resid_post")


_BLOCK_ALIASES = {  # TransformerLens (TransformerBridge) name -> our site, within block L
    "hook_in": "hook_resid_pre", "ln1.hook_in": "hook_resid_pre", "attn.hook_in": "ln1.hook_out",
    "attn.q.hook_in": "ln1.hook_out", "attn.k.hook_in": "ln1.hook_out", "attn.v.hook_in": "ln1.hook_out",
    "attn.q.hook_out": "attn.hook_q", "attn.k.hook_out": "attn.hook_k", "attn.v.hook_out": "attn.hook_v",
    "attn.o.hook_in": "attn.hook_z", "attn.o.hook_out": "attn.hook_out", "ln1_post.hook_in": "attn.hook_out",
    "ln1_post.hook_out": "hook_attn_out", "ln2.hook_in": "hook_resid_mid", "mlp.hook_in": "ln2.hook_out",
    "mlp.gate.hook_in": "ln2.hook_out", "mlp.in.hook_in": "ln2.hook_out", "mlp.gate.hook_out": "mlp.hook_pre",
    "mlp.in.hook_out": "mlp.hook_pre_linear", "mlp.out.hook_in": "mlp.hook_post", "mlp.out.hook_out": "mlp.hook_out",
    "ln2_post.hook_in": "mlp.hook_out", "ln2_post.hook_out": "hook_mlp_out", "hook_out": "hook_resid_post"}


def site_names(config: GemmaConfig) -> list[str]:
    """Every hook site of a model, in the order the forward pass reaches them."""
    names = ["hook_embed"]
    for layer in range(config.num_hidden_layers):
        names += [f"blocks.{layer}.{site}" for site in _BLOCK_SITES]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized", "ln_final.hook_out",
                    "unembed.hook_out", "hook_logits"]


def aliases(config: GemmaConfig) -> dict[str, str]:
    """TransformerLens's other names for our sites: {alias: site}."""
    out = {f"blocks.{layer}.{a}": f"blocks.{layer}.{s}"
           for layer in range(config.num_hidden_layers) for a, s in _BLOCK_ALIASES.items()}
    out.update({"embed.hook_out": "hook_embed",
                "ln_final.hook_in": f"blocks.{config.num_hidden_layers - 1}.hook_resid_post",
                "unembed.hook_in": "ln_final.hook_out", "hook_unembed": "unembed.hook_out"})
    return out


def is_optional(name: str) -> bool:
    """Whether a site costs extra work and is computed only when a hook wants it (layers.wants):
    per-head results and the norms' statistics."""
    return name.endswith((".hook_result", ".hook_scale", ".hook_normalized"))


def resolve(config: GemmaConfig, names: str | Iterable[str] | Callable[[str], bool] | None) -> tuple[str, ...]:
    """Exact site names, in forward order, for site names, TransformerLens aliases, glob patterns
    ('blocks.*.hook_resid_post') or a predicate `fn(name) -> bool`; None means every site."""
    every = site_names(config)
    if names is None:
        return tuple(every)
    alias = aliases(config)
    if callable(names):
        hits = {n for n in every if names(n)} | {alias[a] for a in alias if names(a)}
        return tuple(n for n in every if n in hits)
    patterns = [names] if isinstance(names, str) else list(names)
    out = set()
    for pattern in patterns:
        hits = [n for n in every if fnmatch.fnmatchcase(n, pattern)]
        hits += [alias[a] for a in alias if fnmatch.fnmatchcase(a, pattern)]
        if not hits:
            raise GenerationError(f"no hook site matches {pattern!r} (see gemma_jax.hooks.site_names)")
        out.update(hits)
    return tuple(n for n in every if n in out)


def canonical(config: GemmaConfig, name: str) -> str:
    """Our site name for a site or a TransformerLens alias (unknown names come back unchanged)."""
    return aliases(config).get(name, name)


def forward(graphdef, state, tokens, positions, hook=None, stop_at_layer: int | None = None):
    """Pure forward (no jit of its own): soft-capped float32 logits [B, T, V] with an optional
    `hook(name, value) -> value` applied at every site; with stop_at_layer=L, the residual
    entering layer L [B, T, D] instead (layers L.. are not computed)."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, positions, hook=hook, stop_at_layer=stop_at_layer)
    return hidden if stop_at_layer is not None else model.logits(hidden, hook=hook)


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
    in order. `sites` tells the model which optional sites to compute."""

    table: tuple[tuple[str, Callable], ...]

    @classmethod
    def from_mapping(cls, config: GemmaConfig, hooks: Mapping[str, Callable] | Iterable) -> Hooks:
        """{site or pattern: fn(value) -> value} (or a list of (site, fn) pairs, TransformerLens's
        fwd_hooks) -> Hooks; a site matched by several keys gets each key's function, in order."""
        pairs = hooks.items() if isinstance(hooks, Mapping) else hooks
        return cls(tuple((site, fn) for key, fn in pairs for site in resolve(config, key)))

    @property
    def sites(self) -> frozenset[str]:
        return frozenset(site for site, _ in self.table)

    @property
    def sites(self) -> frozenset[str]:
        """The sites these hooks touch (attention runs dense only where scores/pattern are hooked)."""
        return frozenset(site for site, _ in self.table)

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
