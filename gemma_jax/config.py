"""GemmaConfig: every architectural number of a Gemma 2 model, read from the checkpoint's config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gemma_jax.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
# model_type values of neighbouring families, named in the refusal.
OTHER_FAMILIES = {"gemma": "Gemma 1", "gemma3": "Gemma 3", "gemma3_text": "Gemma 3",
                  "gemma3n": "Gemma 3n", "recurrent_gemma": "RecurrentGemma", "paligemma": "PaliGemma"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 2 model. Field names follow the HF config where one exists."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    bos_token_id: int = 2

    def __post_init__(self):
        for name in ("layer_types", "eos_token_ids"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        for name, allow_none in (("query_pre_attn_scalar", False), ("rope_theta", False), ("rms_norm_eps", False),
                                 ("attn_logit_softcapping", True), ("final_logit_softcapping", True)):
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            zero_ok = name == "rms_norm_eps"
            if not _is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                kind = "a number >= 0" if zero_ok else "a number > 0" + (" or null" if allow_none else "")
                raise ConfigError(f"config field {name!r} must be {kind}, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not isinstance(self.layer_types, tuple) or not all(isinstance(t, str) for t in self.layer_types):
            raise ConfigError(f"config field 'layer_types' must be a list of strings, got {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"layer_types has unknown kinds {bad}; expected {SLIDING!r} or {FULL!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"config field 'tie_word_embeddings' must be true or false, "
                              f"got {self.tie_word_embeddings!r}")
        if not self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=false is not a Gemma 2 model (no lm_head is supported)")
        ids = [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)]
        if not isinstance(self.eos_token_ids, tuple) or not self.eos_token_ids:
            raise ConfigError(f"config field 'eos_token_id' must be a token id or a non-empty list of them, "
                              f"got {self.eos_token_ids!r}")
        ids += [("eos_token_id", t) for t in self.eos_token_ids]
        for name, value in ids:
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config field {name!r} must be a token id in [0, {self.vocab_size}), "
                                  f"got {value!r}")

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` fields of this config (the inverse of from_hf)."""
        return dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=self.vocab_size,
                    hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
                    layer_types=list(self.layer_types), attn_logit_softcapping=self.attn_logit_softcapping,
                    final_logit_softcapping=self.final_logit_softcapping, rope_theta=self.rope_theta,
                    rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                    hidden_activation="gelu_pytorch_tanh", pad_token_id=self.pad_token_id,
                    eos_token_id=list(self.eos_token_ids), bos_token_id=self.bos_token_id,
                    tie_word_embeddings=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        """Inverse of to_dict (our own config.json in a converted checkpoint)."""
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"config is missing fields {missing}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Build from a Hugging Face Gemma 2 `config.json` dict; refuses anything else."""
        if not isinstance(hf, dict):
            raise ConfigError("must hold a JSON object")
        model_type = hf.get("model_type")
        if model_type != "gemma2":
            family = f" ({OTHER_FAMILIES[model_type]})" if model_type in OTHER_FAMILIES else ""
            raise ConfigError(f"model_type is {model_type!r}{family}; only 'gemma2' (Gemma 2) is supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "query_pre_attn_scalar", "sliding_window")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ConfigError(f"missing required field{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"hidden_activation {act!r} is not supported (Gemma 2 uses gelu_pytorch_tanh)")
        if hf.get("attention_bias"):
            raise ConfigError("attention_bias=true is not a Gemma 2 model")
        rope_key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
        rope = hf.get(rope_key) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{rope_key} must be a JSON object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in hf and "rope_theta" in rope and hf["rope_theta"] != rope["rope_theta"]:
            raise ConfigError(f"rope_theta {hf['rope_theta']} contradicts "
                              f"{rope_key}.rope_theta {rope['rope_theta']}")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        layer_types = hf.get("layer_types")
        if layer_types is None and _is_int(hf["num_hidden_layers"]):
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(hf["num_hidden_layers"])]
        eos = 1 if hf.get("eos_token_id") is None else hf["eos_token_id"]

        def default(key, value):
            return value if hf.get(key) is None else hf[key]

        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf["num_key_value_heads"],
            head_dim=hf["head_dim"],
            query_pre_attn_scalar=hf["query_pre_attn_scalar"],
            sliding_window=hf["sliding_window"],
            layer_types=layer_types,
            attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=hf.get("final_logit_softcapping", 30.0),
            rope_theta=float(theta) if _is_number(theta) else theta,
            rms_norm_eps=default("rms_norm_eps", 1e-6),
            max_position_embeddings=default("max_position_embeddings", 8192),
            tie_word_embeddings=default("tie_word_embeddings", True),
            pad_token_id=default("pad_token_id", 0),
            eos_token_ids=eos if isinstance(eos, list) else (eos,),
            bos_token_id=default("bos_token_id", 2),
        )


def _preset(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
            scalar: float) -> GemmaConfig:
    return GemmaConfig(
        vocab_size=256000, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, query_pre_attn_scalar=scalar, sliding_window=4096,
        layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers)))


def gemma2_2b() -> GemmaConfig:
    return _preset(2304, 9216, 26, 8, 4, 256, 256)


def gemma2_9b() -> GemmaConfig:
    return _preset(3584, 14336, 42, 16, 8, 256, 256)


def gemma2_27b() -> GemmaConfig:
    return _preset(4608, 36864, 46, 32, 16, 128, 144)


PRESETS = {"2b": gemma2_2b, "9b": gemma2_9b, "27b": gemma2_27b}


def embed_scale(config: GemmaConfig) -> float:
    """sqrt(hidden_size); the model rounds it to the compute dtype, as HF does."""
    return math.sqrt(config.hidden_size)
