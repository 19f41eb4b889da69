"""Research into model internals: capture and edit any hook site under jit, logit lens, direct
logit attribution, attribution patching and vectorized activation-patching sweeps.

Site names are those of `hooks.site_names` (TransformerLens style). Functions here take a loaded
`Gemma`; `forward` is the pure, differentiable building block (use it inside jax.grad / vmap).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.errors import GenerationError
from gemma_jax.hooks import Hooks, forward, resolve  # noqa: F401 (forward, resolve: public here too)

HookFn = Callable[[jax.Array], jax.Array]


def _inputs(model, tokens, attention_mask=None):
    """One prompt [T] or a batch [B, T] (and mask), checked as `Gemma.logits` checks them."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
        attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
    return model._prepare(tokens, attention_mask)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _run(graphdef, state, tokens, positions, names: tuple[str, ...], edits: Hooks):
    """Logits and the activations at `names` (after `edits`), in one compiled call."""
    store: dict = {}

    def hook(name, value):
        value = edits(name, value)
        if name in names:
            store[name] = value
        return value
    return forward(graphdef, state, tokens, positions, hook), store


def run_with_cache(model, tokens, names=None, attention_mask=None):
    """(logits, {site: activation}) for the requested sites, in one compiled call."""
    tokens, positions = _inputs(model, tokens, attention_mask)
    logits, store = _run(model.graphdef, model.state, tokens, positions, resolve(model.config, names), Hooks(()))
    return np.asarray(logits), {k: np.asarray(v) for k, v in store.items()}


def run_with_hooks(model, tokens, hooks: Mapping[str, HookFn], names=(), attention_mask=None):
    """Logits with `hooks[site](value) -> replacement` applied (patching, ablation, steering).

    Patterns are allowed as keys. With `names`, also returns the (edited) activations there.
    Hook functions are static under jit: reuse the same function objects to avoid recompiling.
    """
    tokens, positions = _inputs(model, tokens, attention_mask)
    logits, store = _run(model.graphdef, model.state, tokens, positions,
                         resolve(model.config, names) if names else (), Hooks.from_mapping(model.config, hooks))
    logits = np.asarray(logits)
    return (logits, {k: np.asarray(v) for k, v in store.items()}) if names else logits


# --------------------------------------------------------------------------------- edits
def head_ablation(config, head: int) -> HookFn:
    """Zero query head `head` at `blocks.L.attn.hook_z` (before the output projection)."""
    h, n = config.head_dim, config.num_attention_heads
    if not 0 <= head < n:  # an out-of-range .at[] update would be silently dropped
        raise GenerationError(f"head {head} is out of range: the model has {n} query heads")

    def fn(z):
        return z.reshape(*z.shape[:-1], -1, h).at[..., head, :].set(0).reshape(z.shape)
    return fn


def add_vector(vector, scale: float = 1.0) -> HookFn:
    """Add `scale * vector` at every position (a steering vector at a residual-stream site)."""
    vector = jnp.asarray(vector)

    def fn(x):
        return x + (scale * vector).astype(x.dtype)
    return fn


def patch_from(cache_value, positions: Iterable[int] | None = None, axis: int = 1) -> HookFn:
    """Replace the activation by `cache_value` (from another run), at all or some positions.

    positions index `axis`: 1 is the token axis of every site except hook_attn_scores and
    hook_pattern ([B, N, T, S]), whose query axis is 2.
    """
    cache_value = jnp.asarray(cache_value)
    pos = None if positions is None else np.asarray(list(positions), np.int64)

    def fn(x):
        if pos is None:
            return cache_value.astype(x.dtype)
        n = x.shape[axis]
        if pos.size and not (-n <= pos.min() and pos.max() < n):  # .at[] would drop it silently
            raise GenerationError(f"position {int(pos.min() if pos.min() < -n else pos.max())} is out of "
                                  f"range for axis {axis} of size {n}")
        index = (slice(None),) * axis + (pos,)
        return x.at[index].set(cache_value[index].astype(x.dtype))
    return fn


# ------------------------------------------------------------------------- lens and DLA
def logit_lens(model, tokens, attention_mask=None) -> np.ndarray:
    """[L, B, T, V] logits read from each layer's hook_resid_post through the exact final
    RMSNorm, unembedding and final soft-cap (nothing is linearized)."""
    names = resolve(model.config, "blocks.*.hook_resid_post")
    _, store = run_with_cache(model, tokens, names, attention_mask)
    return np.stack([np.asarray(_unembed(model.graphdef, model.state, jnp.asarray(store[n]))) for n in names])


@functools.partial(jax.jit, static_argnums=0)
def _unembed(graphdef, state, resid):
    # Parameters are arguments, not closed-over constants: no weights baked into the program.
    m = nnx.merge(graphdef, state)
    return m.logits(m.final_norm(resid))


def direct_logit_attribution(model, tokens, token_ids, position: int = -1, attention_mask=None):
    """Each component's direct contribution to the logits of `token_ids` at `position` (row 0).

    The residual before the final norm is hook_embed + sum over layers of hook_attn_out and
    hook_mlp_out. Linearized: the final RMSNorm's scale 1/rms is frozen at its value on the full
    residual (so contributions sum exactly to the pre-soft-cap logit), and the final soft-cap is
    replaced by its tangent at the actual logit (multiplying by 1 - tanh^2(logit/cap)).
    Returns (labels, contributions [C, len(token_ids)] to the soft-capped logits, pre-cap sums).
    """
    cfg = model.config
    names = ["hook_embed"] + [f"blocks.{i}.{s}" for i in range(cfg.num_hidden_layers)
                              for s in ("hook_attn_out", "hook_mlp_out")]
    _, store = run_with_cache(model, tokens, names + [f"blocks.{cfg.num_hidden_layers - 1}.hook_resid_post"],
                              attention_mask)
    comps = np.stack([store[n][0, position] for n in names]).astype(np.float64)       # [C, D]
    resid = store[f"blocks.{cfg.num_hidden_layers - 1}.hook_resid_post"][0, position].astype(np.float64)
    weight = np.asarray(model.model.final_norm.weight[...], np.float64)
    scale = (1.0 + weight) / np.sqrt(np.mean(resid ** 2) + cfg.rms_norm_eps)
    embedding = np.asarray(model.model.embedder.embedding[...], np.float64)[:, list(token_ids)].T  # [K, D]
    pre_cap = (comps * scale) @ embedding.T                                                 # [C, K]
    total = pre_cap.sum(0)
    cap = cfg.final_logit_softcapping
    slope = np.ones_like(total) if cap is None else 1.0 - np.tanh(total / cap) ** 2
    return names, pre_cap * slope, total


# ------------------------------------------------------------------------------ patching
def attribution_patching(model, clean, corrupt, names, metric: Callable[[jax.Array], jax.Array]):
    """First-order estimate of patching each site from the clean into the corrupt run:
    (clean - corrupt) . d metric(corrupt logits) / d activation, summed over the feature axes.
    Returns {site: [B, T]} (attention sites: summed over all but batch and query position)."""
    names = resolve(model.config, names)
    clean_t, pos = _inputs(model, clean)
    corrupt_t, _ = _inputs(model, corrupt)
    _check_same_shape(clean_t, corrupt_t)
    _, clean_acts = run_with_cache(model, clean_t, names)
    _, corrupt_acts = run_with_cache(model, corrupt_t, names)
    grads = _site_grads(model.graphdef, model.state, corrupt_t, pos, names, metric)
    out = {}
    for n in names:
        prod = (clean_acts[n] - corrupt_acts[n]) * np.asarray(grads[n])
        out[n] = prod.sum(axis=tuple(range(2, prod.ndim))) if "attn_scores" not in n and "pattern" not in n \
            else prod.sum(axis=(1, 3))
    return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _site_grads(graphdef, state, tokens, positions, names, metric):
    zeros = {}

    def shapes_hook(name, value):
        zeros[name] = jnp.zeros_like(value)
        return value
    forward(graphdef, state, tokens, positions, shapes_hook)  # traced only to learn the shapes

    def f(deltas):
        return metric(forward(graphdef, state, tokens, positions,
                              lambda name, v: v + deltas[name] if name in deltas else v))
    return jax.grad(f)({n: zeros[n] for n in names})


def patching_sweep(model, clean, corrupt, site_pattern: str, metric: Callable[[jax.Array], jax.Array]):
    """metric of the corrupt run with the clean activation patched in at one (site, position) at a
    time: [sites, T]. Positions are vectorized with vmap; sites compile once each."""
    names = resolve(model.config, site_pattern)
    if any("attn_scores" in n or "pattern" in n for n in names):
        raise GenerationError("patching_sweep patches sites whose axis 1 is the position; "
                              "attention scores/patterns are [B, N, T, S]")
    clean_t, pos = _inputs(model, clean)
    corrupt_t, _ = _inputs(model, corrupt)
    _check_same_shape(clean_t, corrupt_t)
    _, clean_acts = run_with_cache(model, clean_t, names)
    rows = [np.asarray(_sweep_site(model.graphdef, model.state, corrupt_t, pos, name,
                                   jnp.asarray(clean_acts[name]), metric)) for name in names]
    return names, np.stack(rows)


def _check_same_shape(clean, corrupt):
    if clean.shape != corrupt.shape:
        raise GenerationError(f"clean and corrupt must have the same shape, got "
                              f"{list(clean.shape)} and {list(corrupt.shape)}")


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _sweep_site(graphdef, state, tokens, positions, name, clean_value, metric):
    def one(position):
        def hook(site, v):
            if site != name:
                return v
            at = (jnp.arange(v.shape[1]) == position).reshape(1, -1, *([1] * (v.ndim - 2)))
            return jnp.where(at, clean_value.astype(v.dtype), v)
        return metric(forward(graphdef, state, tokens, positions, hook))
    return jax.vmap(one)(jnp.arange(tokens.shape[1]))
