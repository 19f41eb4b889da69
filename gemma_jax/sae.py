"""Gemma Scope JumpReLU sparse autoencoders: load, encode/decode, splice into the forward, steer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import interp
from gemma_jax.errors import CheckpointError, GenerationError

# Gemma Scope release kinds -> our hook sites (layer filled in).
SITES = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
         "att": "blocks.{layer}.attn.hook_z"}


@dataclasses.dataclass(frozen=True, eq=False)
class JumpReLUSAE:
    """f = JumpReLU_theta(x @ W_enc + b_enc); x_hat = f @ W_dec + b_dec.

    JumpReLU_theta(z) = z if z > theta and z > 0, else 0 (Gemma Scope: (z > theta) * relu(z)).
    """

    W_enc: jax.Array      # [d, f]
    W_dec: jax.Array      # [f, d]
    b_enc: jax.Array      # [f]
    b_dec: jax.Array      # [d]
    threshold: jax.Array  # [f]

    @classmethod
    def load(cls, path: str | Path) -> JumpReLUSAE:
        """From a Gemma Scope `params.npz`."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such SAE file")
        try:
            data = np.load(path)
        except Exception as e:  # not .npz/.npy, truncated, or pickled (refused)
            raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: not an .npz archive (expected Gemma Scope params.npz)")
        with data:
            missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in data.files]
            if missing:
                raise CheckpointError(f"{path}: SAE params.npz lacks arrays {missing} (has {sorted(data.files)})")
            try:
                arrays = {k: jnp.asarray(data[k], jnp.float32)
                          for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        if arrays["W_enc"].ndim != 2:
            raise CheckpointError(f"{path}: W_enc has shape {list(arrays['W_enc'].shape)}, expected [d_in, d_sae]")
        d, f = arrays["W_enc"].shape
        want = {"W_dec": (f, d), "b_enc": (f,), "b_dec": (d,), "threshold": (f,)}
        for k, shape in want.items():
            if arrays[k].shape != shape:
                raise CheckpointError(f"{path}: {k} has shape {list(arrays[k].shape)}, expected {list(shape)}")
        return cls(**arrays)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    def encode(self, x: jax.Array) -> jax.Array:
        pre = x.astype(jnp.float32) @ self.W_enc + self.b_enc
        return jnp.where((pre > self.threshold) & (pre > 0), pre, 0.0)

    def decode(self, f: jax.Array) -> jax.Array:
        return f @ self.W_dec + self.b_dec

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def site_for(kind: str, layer: int) -> str:
    if kind not in SITES:
        raise GenerationError(f"SAE kind {kind!r} unknown; choose one of {sorted(SITES)}")
    return SITES[kind].format(layer=layer)


def splice_hook(sae: JumpReLUSAE, use_error_term: bool = False, edit=None):
    """A hook putting the SAE into the forward at its site.

    Without the error term the activation becomes the reconstruction decode(edit(encode(x))).
    With it the activation becomes x + decode(edit(f)) - decode(f): exactly x when nothing is
    edited, and x moved by the edit of the features otherwise.
    """
    def fn(value):
        x = value.astype(jnp.float32)
        feats = sae.encode(x)
        out = sae.decode(feats if edit is None else edit(feats))
        if use_error_term:
            out = x + (out - sae.decode(feats))
        return out.astype(value.dtype)
    return fn


def splice(model, tokens, sae: JumpReLUSAE, site: str, use_error_term: bool = False, edit=None):
    """Logits with the SAE spliced in at `site` (see splice_hook), and reconstruction stats:
    'l0' [B, T] (active features per token) and 'variance_explained' (1 - SSE / total variance)."""
    _, store = interp.run_with_cache(model, tokens, [site])
    x = jnp.asarray(store[site], jnp.float32)
    if x.shape[-1] != sae.d_in:
        raise GenerationError(f"SAE input width {sae.d_in} != width {x.shape[-1]} at {site}")
    feats = sae.encode(x)
    resid = np.asarray(x - sae.decode(feats)).reshape(-1, x.shape[-1])
    centred = np.asarray(x - x.mean(axis=(0, 1))).reshape(-1, x.shape[-1])
    stats = {"l0": np.asarray((feats > 0).sum(-1)),
             "variance_explained": float(1.0 - (resid ** 2).sum() / (centred ** 2).sum())}
    logits = interp.run_with_hooks(model, tokens, {site: splice_hook(sae, use_error_term, edit)})
    return logits, stats


def steering_hook(sae: JumpReLUSAE, feature: int, scale: float):
    """A hook adding `scale` times the feature's decoder row at the SAE's site."""
    width = sae.W_dec.shape[0]
    if not 0 <= feature < width:  # indexing would clamp to the last row silently
        raise GenerationError(f"feature {feature} is out of range: the SAE has {width} features")
    return interp.add_vector(sae.W_dec[feature], scale)
