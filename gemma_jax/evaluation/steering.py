"""Evaluating an edited model: hooks plus an SAE splice, from Python or from command-line options.

An SAE is any object with encode(x) -> features and decode(features) -> x (Gemma Scope's
JumpReLUSAE, or any other format loaded elsewhere): nothing here depends on its class.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp

from gemma_jax import hooks as hooks_lib
from gemma_jax.errors import EvaluationError


def with_sae(config, hooks: Mapping[str, Callable] | None, sae=None, site: str | None = None,
             use_error_term: bool = True, edit: Callable | None = None) -> dict[str, Callable] | None:
    """`hooks` plus `sae` spliced in at `site` (sae.splice_hook). With the error term the splice
    alone changes nothing and `edit(features) -> features` moves the activation by
    decode(edit(f)) - decode(f); without it the model runs on the SAE's reconstruction. A hook
    already keyed by `site` runs first."""
    table = dict(hooks or {})
    if sae is None:
        if site is not None or edit is not None:
            raise EvaluationError("sae_site / sae_edit given without an sae")
        return table or None
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise EvaluationError(f"sae must have encode() and decode() methods, got {type(sae).__name__}")
    if site is None:
        raise EvaluationError("an sae needs sae_site, the hook site it reads and writes "
                              "(e.g. blocks.3.hook_resid_post)")
    hooks_lib.resolve(config, site)   # an unknown site fails here, not at the first forward
    from gemma_jax.sae import splice_hook
    splice = splice_hook(sae, use_error_term, edit)
    before = table.get(site)
    table[site] = splice if before is None else (lambda x, first=before: splice(first(x)))
    return table


def add_to_features(adds: Mapping[int, float], width: int) -> Callable:
    """An SAE edit adding `scale` to feature `f`'s activation for each f: scale; with the error term
    this moves the activation by scale * W_dec[f] (steering)."""
    for feature in adds:
        if not 0 <= feature < width:
            raise EvaluationError(f"feature {feature} is out of range: the SAE has {width} features")
    index = jnp.asarray(list(adds), jnp.int32)
    scales = jnp.asarray(list(adds.values()), jnp.float32)

    def edit(features):
        return features.at[..., index].add(scales.astype(features.dtype))
    return edit


def parse_steer(specs: Sequence[str]) -> dict[int, float]:
    """["123=4.5", ...] -> {123: 4.5}: the command line's --sae-steer FEATURE=SCALE."""
    out = {}
    for spec in specs:
        feature, _, scale = spec.partition("=")
        try:
            out[int(feature)] = float(scale)
        except ValueError:
            raise EvaluationError(f"--sae-steer takes FEATURE=SCALE (e.g. 1234=8.0), got {spec!r}") from None
    return out
