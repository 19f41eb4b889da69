"""GemmaConfig: every architectural number of a Gemma 2 model, read from the checkpoint's config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gemma_jax.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but "
                              f"num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"layer_types has unknown kinds {bad}; expected {SLIDING!r} or {FULL!r}")
        if not self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=false is not a Gemma 2 model (no lm_head is supported)")
        if self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        """Inverse of to_dict (our own config.json in a converted checkpoint)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"config is missing fields {missing}")
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Build from a Hugging Face Gemma 2 `config.json` dict; refuses anything else."""
        if not isinstance(hf, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = hf.get("model_type")
        if model_type != "gemma2":
            raise ConfigError(f"config.json model_type is {model_type!r}; only 'gemma2' (Gemma 2) is supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "query_pre_attn_scalar", "sliding_window")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ConfigError(f"config.json is missing required fields {missing}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"config.json hidden_activation {act!r} is not supported (Gemma 2 uses gelu_pytorch_tanh)")
        if hf.get("attention_bias"):
            raise ConfigError("config.json attention_bias=true is not a Gemma 2 model")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json rope type {rope_type!r} is not supported (only 'default')")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        if "rope_theta" in hf and "rope_theta" in rope and hf["rope_theta"] != rope["rope_theta"]:
            raise ConfigError(f"config.json rope_theta {hf['rope_theta']} contradicts "
                              f"rope_parameters.rope_theta {rope['rope_theta']}")
        layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types")
        if layer_types is None:
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
        eos = hf.get("eos_token_id", 1)
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf["num_key_value_heads"],
            head_dim=hf["head_dim"],
            query_pre_attn_scalar=hf["query_pre_attn_scalar"],
            sliding_window=hf["sliding_window"],
            layer_types=tuple(layer_types),
            attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=hf.get("final_logit_softcapping", 30.0),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
            eos_token_ids=eos,
            bos_token_id=hf.get("bos_token_id", 2) if hf.get("bos_token_id") is not None else 2,
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
