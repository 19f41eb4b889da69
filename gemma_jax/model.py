"""The Gemma 2 forward pass: Attention, MLP, Block, Transformer. No I/O here.

Shapes: B batch, T query length, S key length, D model, N query heads, K kv heads, G = N // K,
H head dim, F ffn hidden, V vocab. Weights are 2-D, laid out for the fastest batch-1 product on
XLA:CPU: [in, out] (`x @ W`) where the output is wide (q, k, v, gate/up), [out, in] (contracting
the weight's last axis, HF's own layout) where it is narrow (o, down). See docs/performance.md.
Every weight product goes through quant.dense, so a weight may also be an int8 QArray standing
for the float one (stored [out..., in] with a float32 scale per output channel, the layout
XLA:CPU's int8 product wants; docs/quantization.md): one forward pass for every dtype.

Hook sites: every activation passes through `hook(name, value) -> value` when a hook is given
(TransformerLens names and meanings, see hooks.py); with hook=None the program is exactly the plain
forward. Sites that cost extra work (`attn.hook_result`, the norms' `hook_scale`/`hook_normalized`)
are computed only when the hook wants them (layers.wants).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import cache as kv
from gemma_jax import quant
from gemma_jax.attention import AttentionConfig, attend, attention_config
from gemma_jax.config import GemmaConfig
from gemma_jax.layers import Embedder, RMSNorm, rope, softcap, wants
from gemma_jax.layers import site as _site
from gemma_jax.quant import QArray, dense

Hook = Callable[[str, jax.Array], jax.Array]

# The axis each weight contracts over (its input axis): 0 for [in, out], 1 for [out, in]. Weights
# absent here (the norms) are vectors and are never quantized. Keys are param names below a block.
IN_AXIS = {"embedder/embedding": 0, "attn/q": 0, "attn/k": 0, "attn/v": 0, "attn/o": 1,
           "mlp/gate_up": 0, "mlp/down": 1}


def weight_in_axis(name: str) -> int | None:
    """Input axis of a flat param name ("blocks/3/attn/o" -> 1), None for a norm."""
    return IN_AXIS.get(name.split("/", 2)[-1] if name.startswith("blocks/") else name)


def _dense(rngs: nnx.Rngs, shape, param_dtype) -> nnx.Param:
    return nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype))


class Attention(nnx.Module):
    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 attention: AttentionConfig | None = None):
        d, n, k, h = (config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
        self.q = _dense(rngs, (d, n * h), param_dtype)
        self.k = _dense(rngs, (d, k * h), param_dtype)
        self.v = _dense(rngs, (d, k * h), param_dtype)
        self.o = _dense(rngs, (d, n * h), param_dtype)  # [out, in]
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.rope_theta = config.rope_theta
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.name = f"blocks.{layer}.attn"
        self.attention = attention_config(attention)  # which implementation (static)

    def __call__(self, x, positions, layer_cache: kv.LayerKV | None, end, attend_cache: bool, hook=None):
        b, t, _ = x.shape
        dt = x.dtype
        q = dense(x, self.q[...]).reshape(b, t, self.num_heads, self.head_dim)
        k = dense(x, self.k[...]).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = dense(x, self.v[...]).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = _site(hook, f"{self.name}.hook_q", q), _site(hook, f"{self.name}.hook_k", k)
        v = _site(hook, f"{self.name}.hook_v", v)
        q = _site(hook, f"{self.name}.hook_rot_q", rope(q, positions, self.rope_theta))
        k = _site(hook, f"{self.name}.hook_rot_k", rope(k, positions, self.rope_theta))

        keys, values, key_pos = k, v, positions
        ring_chunk = layer_cache is not None and attend_cache and t > 1 and self.window is not None
        new_cache = None if layer_cache is None or ring_chunk else kv.write(layer_cache, k, v, positions)
        if new_cache is not None and attend_cache:
            # One new token (decode), or any chunk on a global layer (slot = position: the write
            # overwrites nothing): write, then attend over the buffer alone, with no copy of the
            # cache. A decode step's slot held position p - S, outside every window reaching p.
            keys, values = new_cache.k.astype(dt), new_cache.v.astype(dt)
            key_pos = kv.slot_positions(kv.advance(end, positions), layer_cache.k.shape[1])
        elif ring_chunk:  # a chunk on a ring: the old ring (whose slots the chunk may overwrite), then the chunk
            keys = jnp.concatenate([layer_cache.k.astype(dt), k], axis=1)
            values = jnp.concatenate([layer_cache.v.astype(dt), v], axis=1)
            key_pos = jnp.concatenate([kv.slot_positions(end, layer_cache.k.shape[1]), positions], axis=1)

        z = attend(q, keys, values, positions, key_pos, scale=self.scale, softcap=self.softcap,
                   window=self.window, hook=hook, name=self.name, config=self.attention)
        if ring_chunk:
            # Write the ring after attention has read it, through a data dependence on z (a token
            # whose output is NaN is not stored: never the case for finite inputs). Without one,
            # XLA cannot order the read before the in-place write into the donated ring, so it
            # copies the ring, and schedules every layer's copy at the start of the program (all
            # sliding layers' at once: 0.4 GiB on the 2B shape; docs/performance.md).
            written = jnp.where(jnp.isnan(z[:, :, 0, 0]), -1, positions)
            new_cache = kv.write(layer_cache, k, v, written)
        z = _site(hook, f"{self.name}.hook_z", z)                              # [B, T, N, H]
        if wants(hook, f"{self.name}.hook_result"):  # per-head outputs, summed (only when asked for)
            w_o = self.o[...]
            w_o = (w_o.dequantize(dt) if isinstance(w_o, QArray) else w_o.astype(dt))   # [D, N*H]
            per_head = jnp.einsum("BTNH,DNH->BTND", z, w_o.reshape(-1, self.num_heads, self.head_dim))
            out = _site(hook, f"{self.name}.hook_result", per_head).sum(axis=2)
        else:
            out = dense(z.reshape(b, t, -1), self.o[...], in_axis=1)
        return _site(hook, f"{self.name}.hook_out", out), new_cache


class MLP(nnx.Module):
    """down(gelu_tanh(gate(x)) * up(x)), with gate and up fused into one [D, 2, F] weight and
    down kept [D, F] ([out, in])."""

    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_up = _dense(rngs, (d, 2, f), param_dtype)
        self.down = _dense(rngs, (d, f), param_dtype)
        self.name = f"blocks.{layer}.mlp"

    def __call__(self, x, hook=None):
        gate_up = dense(x, self.gate_up[...])  # [B, T, 2, F]
        gate = _site(hook, f"{self.name}.hook_pre", gate_up[..., 0, :])
        up = _site(hook, f"{self.name}.hook_pre_linear", gate_up[..., 1, :])
        hidden = _site(hook, f"{self.name}.hook_post", jax.nn.gelu(gate, approximate=True) * up)
        return _site(hook, f"{self.name}.hook_out", dense(hidden, self.down[...], in_axis=1))


class Block(nnx.Module):
    """norm -> attention -> norm -> residual; norm -> MLP -> norm -> residual."""

    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 attention: AttentionConfig | None = None):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.pre_attn_norm = RMSNorm(d, eps, param_dtype=param_dtype)
        self.attn = Attention(config, layer, rngs=rngs, param_dtype=param_dtype, attention=attention)
        self.post_attn_norm = RMSNorm(d, eps, param_dtype=param_dtype)
        self.pre_ffw_norm = RMSNorm(d, eps, param_dtype=param_dtype)
        self.mlp = MLP(config, layer, rngs=rngs, param_dtype=param_dtype)
        self.post_ffw_norm = RMSNorm(d, eps, param_dtype=param_dtype)
        self.name = f"blocks.{layer}"

    def __call__(self, x, positions, layer_cache, end, attend_cache, hook=None):
        n = self.name
        x = _site(hook, f"{n}.hook_resid_pre", x)
        with jax.named_scope("attention"):
            h = _site(hook, f"{n}.ln1.hook_out", self.pre_attn_norm(x, hook, f"{n}.ln1"))
            attn, layer_cache = self.attn(h, positions, layer_cache, end, attend_cache, hook)
        attn_out = _site(hook, f"{n}.hook_attn_out", self.post_attn_norm(attn, hook, f"{n}.ln1_post"))
        x = _site(hook, f"{n}.hook_resid_mid", x + attn_out)
        with jax.named_scope("mlp"):
            h = _site(hook, f"{n}.ln2.hook_out", self.pre_ffw_norm(x, hook, f"{n}.ln2"))
            mlp_out = _site(hook, f"{n}.hook_mlp_out", self.post_ffw_norm(self.mlp(h, hook), hook, f"{n}.ln2_post"))
        x = _site(hook, f"{n}.hook_resid_post", x + mlp_out)
        return x, layer_cache


class Transformer(nnx.Module):
    """Gemma 2 decoder. `dtype` is the compute dtype; parameters are kept in `param_dtype`;
    `attention` says how attention is computed (attention.AttentionConfig)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
                 attention: AttentionConfig | None = None):
        self.config = config
        self.dtype = dtype
        self.embedder = Embedder(config.vocab_size, config.hidden_size, rngs=rngs, param_dtype=param_dtype)
        self.blocks = nnx.List([Block(config, i, rngs=rngs, param_dtype=param_dtype, attention=attention)
                                for i in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: kv.KVCache | None = None,
                 *, attend_cache: bool = True, hook: Hook | None = None,
                 stop_at_layer: int | None = None) -> tuple[jax.Array, kv.KVCache | None]:
        """tokens, positions [B, T] (position -1 = padding) -> final-normed hidden [B, T, D], cache.

        With a cache, queries also see the cached positions (unless attend_cache=False, for a
        prefill into an empty cache) and the new keys/values are written into it.
        stop_at_layer=L (no cache): run layers 0..L-1 only and return the residual entering layer L
        (blocks.L.hook_resid_pre; for L = num_layers, the last hook_resid_post) without the final norm.
        """
        if stop_at_layer is not None and cache is not None:
            raise ValueError("stop_at_layer runs without a KV cache")
        x = _site(hook, "hook_embed", self.embedder.encode(tokens, self.dtype))
        new_layers = []
        for i, block in enumerate(self.blocks):
            if i == stop_at_layer:
                break
            with jax.named_scope(f"block_{i}"):
                layer_cache = None if cache is None else cache.layers[i]
                end = None if cache is None else cache.end
                x, layer_cache = block(x, positions, layer_cache, end, attend_cache, hook)
            new_layers.append(layer_cache)
        if stop_at_layer is not None:
            return x, None
        x = _site(hook, "ln_final.hook_out", self.final_norm(x, hook, "ln_final"))
        if cache is not None:
            cache = kv.KVCache(tuple(new_layers), kv.advance(cache.end, positions))
        return x, cache

    def logits(self, hidden: jax.Array, hook: Hook | None = None) -> jax.Array:
        """Final-normed hidden [..., D] -> soft-capped float32 logits [..., V]."""
        logits = _site(hook, "unembed.hook_out", self.embedder.decode(hidden))
        return _site(hook, "hook_logits", softcap(logits, self.config.final_logit_softcapping))


def abstract_model(config: GemmaConfig, param_dtype=jnp.float32, dtype=jnp.float32,
                   int8_mode: str | None = None, attention: AttentionConfig | None = None) -> Transformer:
    """The model with ShapeDtypeStruct leaves: no memory is allocated. With int8_mode ("dynamic"
    or "weight-only"), every weight matrix is an int8 QArray computed that way (norms stay in
    param_dtype)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype,
                                               attention=attention))
    if int8_mode is None:
        return model
    for path, param in nnx.iter_graph(model):
        axis = weight_in_axis("/".join(map(str, path)))
        if isinstance(param, nnx.Param) and axis is not None:
            param.set_value(quant.abstract(param.get_value(), axis, int8_mode))
    return model


def set_attention(model: Transformer, attention: AttentionConfig) -> None:
    """Use `attention` in every layer of `model` (in place; split the model again afterwards)."""
    for block in model.blocks:
        block.attn.attention = attention


def param_count(config: GemmaConfig) -> int:
    _, state = nnx.split(abstract_model(config))
    return sum(int(x.size) for x in jax.tree.leaves(state))
