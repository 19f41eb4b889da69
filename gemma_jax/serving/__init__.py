"""Serving: a continuous-batching engine (engine.py, steps.py) and an OpenAI-compatible HTTP server
(server.py, openai_api.py) with Prometheus metrics (metrics.py); bench.py is the load-test client."""

from gemma_jax.serving.types import Completion, Output, Request, TokenLogprob

__all__ = ["Completion", "Output", "Request", "TokenLogprob"]
