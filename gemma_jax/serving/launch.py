"""`gemma-jax serve`: load a model (a checkpoint, the built-in default, or random weights of a
preset for benchmarks), build the engine, and run the HTTP server."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gemma_jax import default
from gemma_jax.errors import GenerationError, TokenizerError
from gemma_jax.serving.engine import Engine, EngineConfig
from gemma_jax.serving.metrics import Metrics
from gemma_jax.serving.openai_api import ModelInfo
from gemma_jax.serving.server import ServeOptions, serve


@dataclasses.dataclass(frozen=True)
class ModelSource:
    ckpt: str | None = None        # a converted checkpoint; None: the built-in default model
    preset: str | None = None      # or random weights of this shape ("2b", "9b", "27b", "tiny"): benchmarks
    tokenizer: str | None = None   # a tokenizer.model (required with preset; overrides the checkpoint's)
    dtype: str | None = None       # compute dtype; default: as stored (float32 for the default model)

    def describe(self) -> str:
        if self.preset:
            return f"random-{self.preset}"
        return Path(self.ckpt).name if self.ckpt else "gemma-jax-default"

    def check(self) -> None:
        """Refuse a bad source before anything is loaded (one line, exit 2 from the CLI)."""
        if self.preset and self.ckpt:
            raise GenerationError("pass --ckpt or --preset, not both")
        if self.preset and not self.tokenizer:
            raise TokenizerError("--preset serves random weights and needs --tokenizer PATH (a tokenizer.model)")
        if self.tokenizer and not Path(self.tokenizer).exists():
            raise TokenizerError(f"tokenizer file not found: {self.tokenizer}")
        if self.ckpt:
            from gemma_jax.checkpoint import read_meta
            read_meta(Path(self.ckpt))

    def load_weights(self):
        """The Gemma model (with the checkpoint's tokenizer or --tokenizer, if any)."""
        from gemma_jax import api
        if self.preset:
            from gemma_jax import bench
            model = bench._jax_model(bench.BenchSpec(preset=self.preset, dtype=self.dtype or "float32"))
        else:
            ckpt = self.ckpt or default.checkpoint_dir()
            model = api.load(ckpt, dtype=self.dtype or ("float32" if self.ckpt is None else None))
        if self.tokenizer:
            from gemma_jax.tokenizer import Tokenizer
            model.tokenizer = Tokenizer.load(self.tokenizer)
        return model

    def load(self):
        """The Gemma model, with a tokenizer (the server needs one)."""
        model = self.load_weights()
        if model.tokenizer is None:
            raise TokenizerError(f"{self.ckpt}: no tokenizer.model; pass --tokenizer PATH")
        if model.tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"the tokenizer has {model.tokenizer.vocab_size} pieces, more than the model's "
                                 f"vocab_size {model.config.vocab_size}")
        return model


def model_info(model, name: str, max_length: int) -> ModelInfo:
    return ModelInfo(name, model.tokenizer, tuple(model.config.eos_token_ids), model.chat_stop_ids(), max_length,
                     model.config.vocab_size)


def run(source: ModelSource, config: EngineConfig, options: ServeOptions, warmup: str = "all") -> None:
    """Serve `source` until SIGTERM (see server.serve)."""
    source.check()
    metrics = Metrics(options.name)

    def load():
        model = source.load()
        engine = Engine(model, config, metrics).start(warmup=warmup)
        return engine, model_info(model, options.name, config.max_length)

    serve(load, options, metrics)
