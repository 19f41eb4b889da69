"""gemma_jax: Gemma 2 in pure JAX/Flax, exact to Hugging Face transformers."""

from gemma_jax.api import Gemma, load
from gemma_jax.config import GemmaConfig, gemma2_2b, gemma2_9b, gemma2_27b
from gemma_jax.convert import convert
from gemma_jax.default import load_default
from gemma_jax.errors import (CheckpointError, ConfigError, DependencyError, EvaluationError, GemmaError, GemmaWarning,
                              GenerationError, TokenizerError)

__all__ = ["Gemma", "GemmaConfig", "load", "load_default", "convert", "gemma2_2b", "gemma2_9b", "gemma2_27b",
           "GemmaError", "GemmaWarning", "ConfigError", "CheckpointError", "TokenizerError", "GenerationError",
           "DependencyError", "EvaluationError"]
__version__ = "0.1.0"
