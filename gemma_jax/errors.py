"""One exception hierarchy: every user mistake is a GemmaError with a one-line message."""


class GemmaError(Exception):
    """Base class: a user-facing problem whose message names the file, key or argument at fault."""


class ConfigError(GemmaError):
    """A config.json that is not a usable Gemma 2 config."""


class CheckpointError(GemmaError):
    """A missing, corrupt, incomplete or mismatched checkpoint or safetensors file."""


class TokenizerError(GemmaError):
    """A tokenizer file that cannot be used, or a chat that cannot be rendered."""


class GenerationError(GemmaError):
    """Generation arguments or prompts that cannot be honoured."""


class DependencyError(GemmaError):
    """An optional package that a command needs (torch, transformers, matplotlib) is not installed."""


class EvaluationError(GemmaError):
    """Scoring or evaluation requests, files, tasks or options that cannot be used."""


class GemmaWarning(UserWarning):
    """Something accepted but worth a loud note (e.g. float16 weights converted to float32)."""


class ServingError(GemmaError):
    """A request the serving engine cannot take now; `status` is the HTTP status to answer with."""
    status = 503


class QueueFullError(ServingError):
    """The engine's waiting queue is full (HTTP 429: try again later)."""
    status = 429


class UnavailableError(ServingError):
    """The engine is starting, draining or has failed (HTTP 503)."""
    status = 503
