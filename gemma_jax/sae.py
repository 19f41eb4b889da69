"""Sparse autoencoders and transcoders: Gemma Scope's params.npz and SAELens's on-disk format
(cfg.json + sae_weights.safetensors), encode/decode, splicing into the forward, steering.

Architectures (SAELens's names): 'standard' (ReLU), 'jumprelu', 'topk', and the transcoders
'transcoder' (ReLU) and 'jumprelu_transcoder', which read one site and write another (Gemma Scope's
read blocks.L.ln2.hook_normalized and write blocks.L.hook_mlp_out). SAEs on attn.hook_z see it
flattened head-major, [..., N, H] -> [..., N*H] (SAELens's reshape_activations='hook_z').
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import interp
from gemma_jax.errors import CheckpointError, GenerationError

# Gemma Scope release kinds -> our hook sites (layer filled in).
SITES = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
         "att": "blocks.{layer}.attn.hook_z", "transcoder": "blocks.{layer}.ln2.hook_normalized"}
TRANSCODER_OUT = "blocks.{layer}.hook_mlp_out"
ARCHITECTURES = ("standard", "jumprelu", "topk", "transcoder", "jumprelu_transcoder")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"  # the SAELens cfg.json layout we read and write (SAELens >= 6)


@dataclasses.dataclass(frozen=True, eq=False)
class SAE:
    """f = act(x' @ W_enc + b_enc) with x' = x - b_dec if apply_b_dec_to_input else x;
    x_hat = f @ W_dec + b_dec. act: ReLU ('standard', 'transcoder'); JumpReLU, (z > threshold) * relu(z)
    ('jumprelu', 'jumprelu_transcoder'); the k largest pre-activations, ReLU'd ('topk'). Float32."""

    W_enc: jax.Array                 # [d_in, d_sae]
    W_dec: jax.Array                 # [d_sae, d_out]
    b_enc: jax.Array                 # [d_sae]
    b_dec: jax.Array                 # [d_out]
    threshold: jax.Array | None = None   # [d_sae] (JumpReLU)
    architecture: str = "jumprelu"
    k: int | None = None             # topk
    apply_b_dec_to_input: bool = False
    rescale_acts_by_decoder_norm: bool = False   # topk: select on pre * |W_dec row|
    hook_name: str | None = None     # the site it reads
    hook_name_out: str | None = None  # transcoders: the site it writes
    metadata: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(f"SAE architecture {self.architecture!r} is not supported "
                                  f"(supported: {', '.join(ARCHITECTURES)})")
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, jnp.asarray(value, jnp.float32))
        if self.W_enc.ndim != 2:
            raise CheckpointError(f"W_enc has shape {list(self.W_enc.shape)}, expected [d_in, d_sae]")
        d, f = self.W_enc.shape
        if self.W_dec.ndim != 2 or self.W_dec.shape[0] != f or (not self.is_transcoder and self.W_dec.shape[1] != d):
            raise CheckpointError(f"W_dec has shape {list(self.W_dec.shape)}, expected "
                                  f"[{f}, {'d_out' if self.is_transcoder else d}]")
        want = {"b_enc": (f,), "b_dec": (self.W_dec.shape[1],)}
        if "jumprelu" in self.architecture:
            want["threshold"] = (f,)
        for name, shape in want.items():
            value = getattr(self, name)
            if value is None or value.shape != shape:
                raise CheckpointError(f"{name} has shape {None if value is None else list(value.shape)}, "
                                      f"expected {list(shape)}")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= f):
            raise CheckpointError(f"topk SAE needs 0 < k <= d_sae ({f}), got k={self.k!r}")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise CheckpointError("apply_b_dec_to_input needs d_out == d_in")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def is_transcoder(self) -> bool:
        return self.architecture.endswith("transcoder")

    @property
    def hook_z(self) -> bool:
        return bool(self.hook_name) and self.hook_name.endswith("hook_z")

    # ------------------------------------------------------------------------------ compute
    def _flat(self, x: jax.Array) -> jax.Array:
        """[..., N, H] hook_z -> [..., N*H] (head-major); other inputs as they are."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != self.d_in and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.d_in:
            x = x.reshape(*x.shape[:-2], self.d_in)
        if x.shape[-1] != self.d_in:
            raise GenerationError(f"SAE input width {self.d_in} != activation shape {list(x.shape)}")
        return x

    def encode(self, x: jax.Array) -> jax.Array:
        """Activations [..., d_in] (or hook_z [..., N, H]) -> features [..., d_sae]."""
        x = self._flat(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if "jumprelu" in self.architecture:
            return jnp.where(pre > self.threshold, jax.nn.relu(pre), 0.0)
        if self.architecture == "topk":
            score = pre * jnp.linalg.norm(self.W_dec, axis=-1) if self.rescale_acts_by_decoder_norm else pre
            _, top = jax.lax.top_k(score, self.k)
            keep = jnp.put_along_axis(jnp.zeros(score.shape, bool), top, True, axis=-1, inplace=False)
            return jnp.where(keep, jax.nn.relu(score), 0.0)
        return jax.nn.relu(pre)

    def decode(self, f: jax.Array) -> jax.Array:
        """Features [..., d_sae] -> [..., d_out] (flat for hook_z SAEs)."""
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f / jnp.linalg.norm(self.W_dec, axis=-1)
        return f @ self.W_dec + self.b_dec

    def __call__(self, x: jax.Array) -> jax.Array:
        """decode(encode(x)), in x's shape (hook_z: [..., N, H]) unless this is a transcoder."""
        out = self.decode(self.encode(x))
        return out if self.is_transcoder else out.reshape(jnp.shape(x))

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, hook_name: str | None = None) -> SAE:
        """A SAELens directory (cfg.json + sae_weights.safetensors) or a Gemma Scope params.npz
        (JumpReLU; pass hook_name, e.g. site_for('res', 20), to record the site it reads)."""
        path = Path(path).expanduser()
        if path.is_dir():
            return load_saelens(path)
        return load_gemma_scope(path, hook_name)

    def save(self, path: str | Path, model_name: str | None = None) -> Path:
        """Write SAELens's on-disk format; see save_saelens."""
        return save_saelens(self, path, model_name)


JumpReLUSAE = SAE  # the name of round 1, when only Gemma Scope's JumpReLU SAEs were read


def load_gemma_scope(path: str | Path, hook_name: str | None = None) -> SAE:
    """A Gemma Scope `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold): a JumpReLU SAE, or a
    JumpReLU transcoder when hook_name is an ln2.hook_normalized site (it then writes hook_mlp_out)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such SAE file")
    try:
        data = np.load(path)
    except Exception as e:  # not .npz/.npy, truncated, or pickled (refused)
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not an .npz archive (expected Gemma Scope params.npz)")
    keys = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    with data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise CheckpointError(f"{path}: SAE params.npz lacks arrays {missing} (has {sorted(data.files)})")
        try:
            arrays = {k: np.asarray(data[k], np.float32) for k in keys}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    transcoder = bool(hook_name) and hook_name.endswith("ln2.hook_normalized")
    out = hook_name.replace("ln2.hook_normalized", "hook_mlp_out") if transcoder else None
    try:
        return SAE(**arrays, architecture="jumprelu_transcoder" if transcoder else "jumprelu",
                   hook_name=hook_name, hook_name_out=out)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _cfg_get(cfg: dict, key: str, default=None):
    """A field of a SAELens cfg.json: top level, or (SAELens >= 6) its metadata."""
    if key in cfg:
        return cfg[key]
    return (cfg.get("metadata") or {}).get(key, default)


def load_saelens(directory: str | Path) -> SAE:
    """An SAE saved by SAELens (`SAE.save_model`, or a Hub download): cfg.json and
    sae_weights.safetensors. Old (< 6) field names (hook_point, activation_fn_str) are accepted."""
    from gemma_jax import safetensors_io
    directory = Path(directory).expanduser()
    cfg_path, weights = directory / CFG_FILE, directory / WEIGHTS_FILE
    for f in (cfg_path, weights):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a SAELens SAE directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    architecture = cfg.get("architecture", "topk" if activation == "topk" else "standard")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"{cfg_path}: architecture {architecture!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    if activation not in ("relu", "topk", None):
        raise CheckpointError(f"{cfg_path}: activation_fn {activation!r} is not supported (relu or topk)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):  # the latter is the identity at inference
        raise CheckpointError(f"{cfg_path}: normalize_activations {norm!r} is not supported "
                              "(none, expected_average_only_in)")
    if cfg.get("dtype", "float32") not in ("float32", "float16", "bfloat16", "torch.float32",
                                           "torch.float16", "torch.bfloat16"):
        raise CheckpointError(f"{cfg_path}: dtype {cfg['dtype']!r} is not supported (float32, float16, bfloat16)")
    entries = safetensors_io.read_header(weights)
    arrays = {k_: e.rows(0, e.shape[0]).astype(np.float32) if e.shape else np.zeros((), np.float32)
              for k_, e in entries.items()}
    if "log_threshold" in arrays and "threshold" not in arrays:  # older SAELens JumpReLU checkpoints
        arrays["threshold"] = np.exp(arrays.pop("log_threshold"))
    scaling = arrays.pop("scaling_factor", arrays.pop("finetuning_scaling_factor", None))
    if scaling is not None and not np.all(scaling == 1):
        raise CheckpointError(f"{weights}: a finetuning scaling factor is not supported")
    known = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    unknown, missing = sorted(set(arrays) - known), sorted({"W_enc", "W_dec", "b_enc", "b_dec"} - set(arrays))
    if unknown or missing:
        raise CheckpointError(f"{weights}: " + (f"unexpected tensors {unknown}" if unknown else f"missing tensors {missing}"))
    hook_name = _cfg_get(cfg, "hook_name", _cfg_get(cfg, "hook_point"))
    try:
        return SAE(**{n: arrays.get(n) for n in known}, architecture=architecture, k=k,
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not architecture.endswith("transcoder"))),
                   rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                   hook_name=hook_name, hook_name_out=_cfg_get(cfg, "hook_name_out"),
                   metadata=dict(cfg.get("metadata") or {}))
    except CheckpointError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def save_saelens(sae: SAE, directory: str | Path, model_name: str | None = None) -> Path:
    """Write `sae` as SAELens >= 6 writes it (`SAE.save_model`): cfg.json + sae_weights.safetensors,
    float32, loadable by SAELens's `SAE.load_from_disk`. The directory appears only when complete."""
    from safetensors.numpy import save_file
    directory = Path(directory).expanduser()
    if directory.exists():
        raise CheckpointError(f"{directory}: already exists (not overwriting an SAE)")
    metadata = {**sae.metadata, "sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": SAELENS_FORMAT,
                "hook_name": sae.hook_name, "written_by": "gemma_jax"}
    if model_name is not None:
        metadata["model_name"] = model_name
    if sae.is_transcoder:
        metadata["hook_name_out"] = sae.hook_name_out
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "hook_z" if sae.hook_z else "none", "metadata": metadata,
           "architecture": sae.architecture}
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm)
    if sae.is_transcoder:
        cfg["d_out"] = sae.d_out
    tensors = {n: np.asarray(getattr(sae, n)) for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
               if getattr(sae, n) is not None}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def site_for(kind: str, layer: int) -> str:
    """The site a Gemma Scope release reads: 'res', 'mlp', 'att' (hook_z) or 'transcoder'."""
    if kind not in SITES:
        raise GenerationError(f"SAE kind {kind!r} unknown; choose one of {sorted(SITES)}")
    return SITES[kind].format(layer=layer)


# ------------------------------------------------------------------------------ in the forward
def splice_hook(sae: SAE, use_error_term: bool = False, edit=None):
    """A hook putting an SAE into the forward at its site (transcoders: see splice_hooks).

    Without the error term the activation becomes the reconstruction decode(edit(encode(x))).
    With it the activation becomes x + decode(edit(f)) - decode(f): exactly x when nothing is
    edited, and x moved by the edit of the features otherwise.
    """
    def fn(value):
        x = value.astype(jnp.float32)
        feats = sae.encode(x)
        out = sae.decode(feats if edit is None else edit(feats)).reshape(x.shape)
        if use_error_term:
            out = x + (out - sae.decode(feats).reshape(x.shape))
        return out.astype(value.dtype)
    return fn


def splice_hooks(sae: SAE, site: str | None = None, use_error_term: bool = False, edit=None) -> dict:
    """{site: hook} putting the SAE into the forward: one entry for an SAE; for a transcoder two, one
    reading its input site and one replacing its output site by decode(edit(encode(input)))
    (with the error term: output + decode(edit(f)) - decode(f))."""
    site = site or sae.hook_name
    if site is None:
        raise GenerationError("the SAE does not record its site: pass site= (e.g. sae.site_for('res', 12))")
    if not sae.is_transcoder:
        return {site: splice_hook(sae, use_error_term, edit)}
    out_site = sae.hook_name_out or site.replace("ln2.hook_normalized", "hook_mlp_out")
    seen = {}

    def read(value):
        seen["x"] = value
        return value

    def write(value):
        feats = sae.encode(seen.pop("x"))
        out = sae.decode(feats if edit is None else edit(feats))
        if use_error_term:
            out = value.astype(jnp.float32) + (out - sae.decode(feats))
        return out.astype(value.dtype)
    return {site: read, out_site: write}


def splice(model, tokens, sae: SAE, site: str | None = None, use_error_term: bool = False, edit=None):
    """Logits with the SAE spliced in (see splice_hooks), and reconstruction stats: 'l0' [B, T]
    (active features per token) and 'variance_explained' (1 - SSE / total variance of the target:
    the activation itself, or for a transcoder its output site)."""
    hooks = splice_hooks(sae, site, use_error_term, edit)
    sites = list(hooks)
    _, cache = interp.run(model, tokens, sites)
    x = sae._flat(cache[sites[0]])
    target = jnp.asarray(cache[sites[-1]], jnp.float32).reshape(*x.shape[:-1], -1)
    feats = sae.encode(x)
    resid = np.asarray(target - sae.decode(feats)).reshape(-1, target.shape[-1])
    centred = np.asarray(target - target.mean(axis=(0, 1))).reshape(-1, target.shape[-1])
    stats = {"l0": np.asarray((feats > 0).sum(-1)),
             "variance_explained": float(1.0 - (resid ** 2).sum() / (centred ** 2).sum())}
    logits, _ = interp.run(model, tokens, (), hooks)
    return np.asarray(logits), stats


def steering_hook(sae: SAE, feature: int, scale: float):
    """A hook adding `scale` times the feature's decoder row at the site the SAE writes (hook_z SAEs:
    the row reshaped to [N, H])."""
    if not 0 <= feature < sae.d_sae:  # indexing would clamp to the last row silently
        raise GenerationError(f"feature {feature} is out of range: the SAE has {sae.d_sae} features")
    row = sae.W_dec[feature]

    def fn(x):
        return x + (scale * row.reshape(x.shape[-2:] if sae.hook_z else x.shape[-1:])).astype(x.dtype)
    return fn
