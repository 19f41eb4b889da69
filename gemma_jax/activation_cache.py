"""ActivationCache: one run's activations by hook-site name, with TransformerLens's helpers.

The helpers keep TransformerLens's names, arguments and meanings (stacks along axis 0, `pos_slice`
applied to the position axis, `apply_ln` dividing by the cached norm scale) wherever those are
exact for Gemma 2. Two are exact here where TransformerLens 4.3 is not:
- `stack_head_results`: each head's output passes through the post-attention norm with its scale
  frozen at the observed value, (result_h / scale) * (1 + w), so the heads sum to hook_attn_out
  (TransformerLens stacks attn.hook_result, which sums to the output *before* that norm).
- `logit_attrs`: the final norm's (1 + w) is folded into the unembedding, so the attributions of a
  complete decomposition sum to the pre-soft-cap logit; the final soft-cap is excluded (default) or
  linearized at the observed logit (softcap="linearize").
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import hooks as hooks_lib
from gemma_jax.errors import GenerationError
from gemma_jax.layers import softcap as apply_softcap


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's shorthand -> a site name: ('resid_pre', 3) -> 'blocks.3.hook_resid_pre',
    'pattern2' -> 'blocks.2.attn.hook_pattern', ('scale', 4, 'ln1') -> 'blocks.4.ln1.hook_scale'."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or None
    name = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
            "mlp_pre": "pre", "mlp_post": "post"}.get(name, name)
    if name in ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post", "pre_linear"):
        layer_type = "mlp"
    else:
        layer_type = {"a": "attn", "m": "mlp", "b": None, "block": None, "blocks": None,
                      "attention": "attn"}.get(layer_type, layer_type)
    full = (f"blocks.{layer}." if layer is not None else "") + (f"{layer_type}." if layer_type else "") + f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def take(x, index, axis: int):
    """TransformerLens's Slice on one axis: None keeps it, an int selects (and drops the axis), a
    tuple is slice(*tuple), a slice slices, a list/array gathers."""
    if index is None:
        return x
    if isinstance(index, tuple):
        index = slice(*index)
    elif not isinstance(index, (int, np.integer, slice)):
        index = np.asarray(index)
    where = [slice(None)] * x.ndim
    where[axis] = index
    return x[tuple(where)]


class ActivationCache(Mapping):
    """A mapping site name -> array (jax arrays from `Gemma.run_with_cache`; `to_numpy()` for NumPy),
    plus TransformerLens's analysis helpers. Keys may also be TransformerLens aliases
    ('blocks.0.ln1_post.hook_out') or shorthands (cache['resid_pre', 3], cache['z', -1]).
    Gradients from run_with_cache(incl_grad=...) are stored as '{site}_grad'."""

    def __init__(self, cache_dict: Mapping, model, has_batch_dim: bool = True):
        self.cache_dict = dict(cache_dict)
        self.model = model
        self.has_batch_dim = has_batch_dim
        self._n = model.config.num_hidden_layers
        self._aliases = hooks_lib.aliases(model.config)

    # ------------------------------------------------------------------------------ mapping
    def _name(self, key) -> str:
        if isinstance(key, tuple):
            name, layer, *rest = key
            if layer is not None and layer < 0:
                layer += self._n
            key = act_name(name, layer, *rest)
        elif key not in self.cache_dict and key not in self._aliases:
            key = act_name(key)
        if key.endswith("_grad"):
            return self._aliases.get(key[:-5], key[:-5]) + "_grad"
        return self._aliases.get(key, key)

    def __getitem__(self, key):
        name = self._name(key)
        if name not in self.cache_dict:
            raise KeyError(f"{key!r} is not in this cache (pass it in names= to run_with_cache)")
        return self.cache_dict[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def to_numpy(self) -> ActivationCache:
        """The same cache with NumPy arrays (copied to host)."""
        host = jax.device_get(self.cache_dict)
        return ActivationCache({k: np.asarray(v) for k, v in host.items()}, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-1 cache (in place, as in TransformerLens); returns self."""
        if not self.has_batch_dim:
            return self
        sizes = Counter(v.shape[0] for v in self.cache_dict.values() if v.ndim > 0)
        batch = sizes.most_common(1)[0][0] if sizes else 1
        if batch != 1:
            raise GenerationError(f"cannot remove the batch axis of a cache with batch size {batch}")
        self.cache_dict = {k: v[0] if v.ndim > 0 and v.shape[0] == 1 else v for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    # ----------------------------------------------------------------------------- weights
    @functools.cached_property
    def _weights(self) -> dict:
        m = self.model.model
        return {"final": jnp.asarray(m.final_norm.weight[...], jnp.float32),
                "embedding": jnp.asarray(m.embedder.embedding[...], jnp.float32),           # [D, V]
                "post_attn": [jnp.asarray(b.post_attn_norm.weight[...], jnp.float32) for b in m.blocks],
                "o": [b.attn.o[...] for b in m.blocks]}                                   # [D, N*H]

    def _layer(self, layer: int | None) -> int:
        return self._n if layer is None or layer == -1 else layer

    # -------------------------------------------------------------------------- residual stacks
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream entering each layer up to `layer` ([C, ..., D]; labels '0_pre', '1_mid',
        ..., 'final_post'); apply_ln: the final norm with recomputed statistics when `layer` is the
        unembed (the logit lens), else divided by the cached ln1 (ln2 with mlp_input) scale of `layer`."""
        layer = self._layer(layer)
        comps, labels = [], []
        for i in range(layer + 1):
            if i == self._n:
                comps.append(self[f"blocks.{self._n - 1}.hook_resid_post"])
                labels.append("final_post")
                continue
            comps.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                comps.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        stack = jnp.stack([take(jnp.asarray(c), pos_slice, -2) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice, has_batch_dim=self.has_batch_dim,
                                           recompute_ln=layer == self._n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual entering `layer` as its parts: 'embed', '{l}_attn_out', '{l}_mlp_out' (after the
        post-norms, so they sum exactly to the residual). mode 'attn' / 'mlp' keeps one kind."""
        if mode not in ("all", "attn", "mlp"):
            raise GenerationError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        comps, labels = [], []
        if incl_embeds:
            comps.append(self["hook_embed"])
            labels.append("embed")
        for i in range(layer):
            for kind in ("attn", "mlp"):
                if mode in ("all", kind):
                    comps.append(self[f"blocks.{i}.hook_{kind}_out"])
                    labels.append(f"{i}_{kind}_out")
        if mlp_input and mode != "mlp":
            comps.append(self[f"blocks.{layer}.hook_attn_out"])
            labels.append(f"{layer}_attn_out")
        stack = jnp.stack([take(jnp.asarray(c), pos_slice, -2) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> jax.Array:
        """[..., T, N, D] float32: each head's exact contribution to blocks.{layer}.hook_attn_out,
        attn.hook_result (or hook_z times its slice of W_O) through the post-attention norm with the
        scale frozen at its observed value: (result_h / scale) * (1 + w)."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self.cache_dict:
            result = jnp.asarray(self.cache_dict[name], jnp.float32)
        else:
            z = jnp.asarray(self._need(f"blocks.{layer}.attn.hook_z", "attn.hook_result"), jnp.float32)
            w_o = jnp.asarray(self._weights["o"][layer], jnp.float32).reshape(-1, *z.shape[-2:])   # [D, N, H]
            result = jnp.einsum("...NH,DNH->...ND", z, w_o)
        scale_name = f"blocks.{layer}.ln1_post.hook_scale"
        if scale_name in self.cache_dict:
            scale = jnp.asarray(self.cache_dict[scale_name], jnp.float32)
        else:  # recompute it from the norm's input
            out = jnp.asarray(self._need(f"blocks.{layer}.attn.hook_out", "ln1_post.hook_scale"), jnp.float32)
            scale = jnp.sqrt(jnp.mean(out * out, axis=-1, keepdims=True) + self.model.config.rms_norm_eps)
        return result / scale[..., None, :] * (1.0 + self._weights["post_attn"][layer])

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's contribution to the residual for layers before `layer`, [L*N, ..., D] with labels
        'L0H0', ...; exact for Gemma 2 (see head_results): layer l's heads sum to its hook_attn_out.
        incl_remainder adds the rest of resid_post[layer - 1]."""
        layer = self._layer(layer)
        heads = self.model.config.num_attention_heads
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(heads)]
        if layer > 0:
            stack = jnp.concatenate([take(self.head_results(i), pos_slice, -3) for i in range(layer)], axis=-2)
            stack = jnp.moveaxis(stack, -2, 0)
        else:
            stack = jnp.zeros((0, *take(jnp.asarray(self["hook_embed"]), pos_slice, -2).shape), jnp.float32)
        if incl_remainder:
            resid = take(jnp.asarray(self[f"blocks.{layer - 1}.hook_resid_post"], jnp.float32), pos_slice, -2)
            stack = jnp.concatenate([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # --------------------------------------------------------------------------------- norms
    def apply_ln_to_stack(self, residual_stack, layer: int | None = None, mlp_input: bool = False, pos_slice=None,
                          batch_slice=None, has_batch_dim: bool = True, recompute_ln: bool = False):
        """Treat each component as input to the norm before `layer` (ln1, or ln2 with mlp_input; the
        final norm for layer None / -1 / num_layers) and divide by that norm's cached scale: each
        component's exact share of its hook_normalized (the (1 + w) weight is not applied, as in
        TransformerLens). recompute_ln with the final norm: the whole final norm, weight included,
        applied to each component with its own statistics (the logit lens)."""
        layer = self._layer(layer)
        stack = jnp.asarray(residual_stack)
        if has_batch_dim:
            stack = take(stack, batch_slice, 1)
        if recompute_ln and layer == self._n:
            x = stack.astype(jnp.float32)
            eps = self.model.config.rms_norm_eps
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + self._weights["final"])
            return y.astype(stack.dtype)
        key = "ln_final.hook_scale" if layer == self._n else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = take(jnp.asarray(self._need(key, "apply_ln")), pos_slice, -2)
        if batch_slice is not None and self.has_batch_dim:
            scale = take(scale, batch_slice, 0)
        return stack / scale

    def _need(self, name: str, purpose: str):
        if name not in self.cache_dict:
            raise GenerationError(f"{purpose} needs {name} in the cache: add it to run_with_cache's names")
        return self.cache_dict[name]

    # ---------------------------------------------------------------------------- attribution
    def residual_directions(self, tokens) -> jax.Array:
        """tokens (int, str of one token, or an int array) -> tokens.shape + [D]: the unembedding
        columns with the final norm's (1 + w) folded in, so normalized . direction is the pre-cap logit."""
        if isinstance(tokens, str):
            tok = self.model.tokenizer
            ids = [] if tok is None else tok.encode(tokens, add_bos=False)
            if len(ids) != 1:
                raise GenerationError(f"{tokens!r} is not a single token")
            tokens = ids[0]
        ids = np.asarray(tokens)
        if not np.issubdtype(ids.dtype, np.integer) or (ids.size and not (0 <= ids.min() and ids.max() < self.model.config.vocab_size)):
            raise GenerationError(f"tokens must be ids in [0, {self.model.config.vocab_size}), got {tokens!r}")
        cols = jnp.take(self._weights["embedding"], jnp.asarray(ids), axis=1)             # [D, *ids.shape]
        return jnp.moveaxis(cols, 0, -1) * (1.0 + self._weights["final"])

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim: bool = True, softcap: str = "exclude"):
        """Each component's direct contribution to the logit of `tokens` (minus that of
        `incorrect_tokens`): (component / cached final-norm scale) . ((1 + w) E[token]).

        Exact for Gemma 2: for a complete decomposition (decompose_resid(), or stack_head_results with
        incl_remainder) the attributions sum to the pre-soft-cap logit (difference). softcap="exclude"
        (default) attributes that pre-cap logit; "linearize" multiplies each token's direction by the
        soft-cap's slope 1 - tanh^2(z / cap) at the observed pre-cap logit z: the sum is then the
        first-order change of the capped logit, not the capped logit itself.
        tokens: an int (or str) for all rows, [batch] one per row, or [batch, pos] after pos_slice."""
        if softcap not in ("exclude", "linearize"):
            raise GenerationError(f"softcap must be 'exclude' or 'linearize', got {softcap!r}")
        dirs = self.residual_directions(tokens)
        wrong = None if incorrect_tokens is None else self.residual_directions(incorrect_tokens)
        if wrong is not None and wrong.shape != dirs.shape:
            raise GenerationError(f"tokens and incorrect_tokens must have the same shape, got "
                                  f"{list(dirs.shape[:-1])} and {list(wrong.shape[:-1])}")
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)

        def per_row(d):  # [batch, D] directions broadcast over positions, not across the batch
            if has_batch_dim and scaled.ndim == 4 and d.ndim == 2 and d.shape[0] == scaled.shape[1]:
                return d[:, None, :]
            return d
        dirs = per_row(dirs)
        wrong = None if wrong is None else per_row(wrong)
        cap = self.model.config.final_logit_softcapping
        if softcap == "linearize" and cap is not None:
            final = take(jnp.asarray(self[f"blocks.{self._n - 1}.hook_resid_post"], jnp.float32), pos_slice, -2)
            normed = self.apply_ln_to_stack(final[None], -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                            has_batch_dim=has_batch_dim)[0]

            def slope(d):
                return (1.0 - jnp.tanh((normed * d).sum(-1) / cap) ** 2)[..., None] * d
            dirs = slope(dirs)
            wrong = None if wrong is None else slope(wrong)
        if wrong is not None:
            dirs = dirs - wrong
        return (scaled * dirs).sum(-1)

    def logit_lens(self, layers=None, incl_mid: bool = False, positions=-1, return_labels: bool = False):
        """TransformerLens's logit lens: each entry of accumulated_resid (incl_mid adds resid_mid)
        through the exact final norm (its own statistics), the unembedding and the final soft-cap.
        [C, B, (pos), V] float32; positions as pos_slice (default: the last position, axis dropped);
        layers: indices into the stack. The last entry is the model's logits."""
        stack, labels = self.accumulated_resid(None, incl_mid, apply_ln=True, pos_slice=positions, return_labels=True)
        if layers is not None:
            index = [i + len(labels) if i < 0 else i for i in layers]
            stack, labels = stack[np.asarray(index)], [labels[i] for i in index]
        logits = self.unembed(stack)
        return (logits, labels) if return_labels else logits

    def unembed(self, normalized) -> jax.Array:
        """Final-normed vectors [..., D] -> soft-capped float32 logits [..., V]."""
        logits = jnp.matmul(jnp.asarray(normalized, jnp.float32), self._weights["embedding"])
        return apply_softcap(logits, self.model.config.final_logit_softcapping)

    def readout(self, resid) -> jax.Array:
        """Residual-stream vectors [..., D] -> logits through the exact final norm (each vector's own
        statistics), the unembedding and the soft-cap: what the model would predict from them."""
        resid = jnp.asarray(resid)
        return self.unembed(self.apply_ln_to_stack(resid[None], recompute_ln=True, has_batch_dim=False)[0])
