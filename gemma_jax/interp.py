"""Research into model internals: capture and edit any hook site under jit (with gradients),
logit lens, direct logit attribution, attribution patching and vectorized activation-patching sweeps.

Site names are those of `hooks.site_names` (TransformerLens names and meanings). `run` is the one
compiled entry point behind `Gemma.run_with_cache` / `Gemma.run_with_hooks` and the functions here;
`forward` is the pure, differentiable building block (use it inside jax.grad / vmap).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.activation_cache import ActivationCache
from gemma_jax.errors import GenerationError
from gemma_jax.hooks import Hooks, forward, resolve  # noqa: F401 (forward, resolve: public here too)

HookFn = Callable[[jax.Array], jax.Array]


def _inputs(model, tokens, attention_mask=None):
    """Text (with a tokenizer), one prompt [T] or a batch [B, T] (and mask), checked as
    `Gemma.logits` checks them."""
    if isinstance(tokens, str):
        tokens = model._need_tokenizer().encode(tokens)
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
        attention_mask = None if attention_mask is None else np.asarray(attention_mask)[None]
    return model._prepare(tokens, attention_mask)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _run(graphdef, state, tokens, positions, names: tuple[str, ...], edits: Hooks, stop_at_layer, metric):
    """The output (logits, or the residual entering stop_at_layer), the activations at `names`
    (after `edits`), and with `metric` the gradient of metric(logits) at each of them; one program."""
    sites = frozenset(names) | edits.sites

    def make_hook(store, deltas=None):
        def hook(name, value):
            value = edits(name, value)
            if name in names:
                store[name] = value
                if deltas is not None:  # adding zero: d metric / d delta is d metric / d value
                    value = value + deltas[name]
            return value
        hook.sites = sites  # optional sites (per-head results, norm statistics) only when asked for
        return hook

    if metric is None:
        store: dict = {}
        return forward(graphdef, state, tokens, positions, make_hook(store), stop_at_layer), store, {}
    shapes: dict = {}
    jax.eval_shape(lambda s: forward(graphdef, s, tokens, positions, make_hook(shapes)), state)
    zeros = {n: jnp.zeros(shapes[n].shape, shapes[n].dtype) for n in names}

    def f(deltas):
        store: dict = {}
        logits = forward(graphdef, state, tokens, positions, make_hook(store, deltas))
        return metric(logits), (logits, store)
    grads, (logits, store) = jax.grad(f, has_aux=True)(zeros)
    return logits, store, grads


def run(model, tokens, names=None, hooks=None, stop_at_layer: int | None = None, incl_grad=None,
        attention_mask=None):
    """(output, ActivationCache): one compiled forward with `hooks` ({site or pattern: fn(value) ->
    value}, or (site, fn) pairs) applied and the (edited) activations at `names` kept (site names,
    aliases, patterns or a predicate; None = every site; () = none).

    stop_at_layer=L: run layers 0..L-1 only (negative counts from the end); the output is then the
    residual entering layer L. incl_grad=fn: also '{site}_grad', the gradient of the scalar
    fn(logits) with respect to each kept activation (fn is a static argument: reuse the object)."""
    cfg = model.config
    tokens, positions = _inputs(model, tokens, attention_mask)
    names = () if isinstance(names, (list, tuple)) and not names else resolve(cfg, names)
    edits = Hooks.from_mapping(cfg, hooks) if hooks else Hooks(())
    if stop_at_layer is not None:
        n = cfg.num_hidden_layers
        if not isinstance(stop_at_layer, int) or not -n <= stop_at_layer <= n:
            raise GenerationError(f"stop_at_layer must be an integer in [{-n}, {n}], got {stop_at_layer!r}")
        if incl_grad is not None:
            raise GenerationError("incl_grad needs the logits: it cannot be combined with stop_at_layer")
        stop_at_layer = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
    if incl_grad is not None and not callable(incl_grad):
        raise GenerationError("incl_grad must be a function of the logits returning a scalar")
    out, store, grads = _run(model.graphdef, model.state, tokens, positions, names, edits, stop_at_layer, incl_grad)
    return out, ActivationCache({**store, **{f"{k}_grad": v for k, v in grads.items()}}, model)


def run_with_cache(model, tokens, names=None, attention_mask=None):
    """(logits, {site: activation}) for the requested sites, in one compiled call, as NumPy."""
    logits, cache = run(model, tokens, names, attention_mask=attention_mask)
    return np.asarray(logits), cache.to_numpy()


def run_with_hooks(model, tokens, hooks: Mapping[str, HookFn], names=(), attention_mask=None):
    """Logits with `hooks[site](value) -> replacement` applied (patching, ablation, steering).

    Patterns are allowed as keys. With `names`, also returns the (edited) activations there.
    Hook functions are static under jit: reuse the same function objects to avoid recompiling.
    """
    logits, cache = run(model, tokens, names if names else (), hooks, attention_mask=attention_mask)
    logits = np.asarray(logits)
    return (logits, cache.to_numpy()) if names else logits


# --------------------------------------------------------------------------------- edits
def head_ablation(config, head: int) -> HookFn:
    """Zero query head `head` at `blocks.L.attn.hook_z` ([B, T, N, H], before the output projection)."""
    n = config.num_attention_heads
    if not 0 <= head < n:  # an out-of-range .at[] update would be silently dropped
        raise GenerationError(f"head {head} is out of range: the model has {n} query heads")

    def fn(z):
        return z.at[..., head, :].set(0)
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
    _, cache = run(model, tokens, "blocks.*.hook_resid_post", attention_mask=attention_mask)
    stack = jnp.stack([cache[f"blocks.{i}.hook_resid_post"] for i in range(model.config.num_hidden_layers)])
    return np.asarray(cache.readout(stack))


def direct_logit_attribution(model, tokens, token_ids, position: int = -1, attention_mask=None):
    """Each component's direct contribution to the logits of `token_ids` at `position` (row 0).

    The residual before the final norm is hook_embed + sum over layers of hook_attn_out and
    hook_mlp_out. Linearized: the final RMSNorm's scale 1/rms is frozen at its value on the full
    residual (so contributions sum exactly to the pre-soft-cap logit), and the final soft-cap is
    replaced by its tangent at the actual logit (multiplying by 1 - tanh^2(logit/cap)).
    Returns (labels, contributions [C, len(token_ids)] to the soft-capped logits, pre-cap sums).
    For any batch, position or token layout use ActivationCache.decompose_resid + logit_attrs.
    """
    cfg = model.config
    names = ["hook_embed"] + [f"blocks.{i}.{s}" for i in range(cfg.num_hidden_layers)
                              for s in ("hook_attn_out", "hook_mlp_out")]
    _, cache = run(model, tokens, names + ["ln_final.hook_scale"], attention_mask=attention_mask)
    stack = cache.apply_ln_to_stack(cache.decompose_resid(pos_slice=position), pos_slice=position)[:, 0]  # [C, D]
    pre_cap = np.asarray(stack @ cache.residual_directions(np.asarray(token_ids)).T, np.float64)  # [C, K]
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
    clean_t, _ = _inputs(model, clean)
    corrupt_t, _ = _inputs(model, corrupt)
    _check_same_shape(clean_t, corrupt_t)
    # one program for both runs, so activations the two share cancel exactly
    _, clean_acts = run(model, clean_t, names, incl_grad=metric)
    _, corrupt_acts = run(model, corrupt_t, names, incl_grad=metric)
    out = {}
    for n in names:
        prod = np.asarray(clean_acts[n] - corrupt_acts[n]) * np.asarray(corrupt_acts[f"{n}_grad"])
        out[n] = prod.sum(axis=tuple(range(2, prod.ndim))) if "attn_scores" not in n and "pattern" not in n \
            else prod.sum(axis=(1, 3))
    return out


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
        hook.sites = frozenset({name})
        return metric(forward(graphdef, state, tokens, positions, hook))
    return jax.vmap(one)(jnp.arange(tokens.shape[1]))
