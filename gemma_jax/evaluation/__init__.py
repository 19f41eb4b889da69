"""Evaluation: log-probabilities of token sequences (scoring), perplexity and bits per byte of texts
(perplexity), edited models (steering), and a backend for EleutherAI's lm-evaluation-harness
(harness: it needs the optional `eval` extra and is imported only when asked for)."""

from gemma_jax.errors import EvaluationError
from gemma_jax.evaluation.scoring import Batching, Scored, score_pairs, token_logprobs  # noqa: F401


def load_harness():
    """The lm-eval backend module (registers model "gemma_jax" with lm-eval on first import)."""
    try:
        from gemma_jax.evaluation import harness as module
    except ImportError as e:
        raise EvaluationError(f"evaluation with lm-eval needs the eval extra: pip install 'gemma_jax[eval]' "
                              f"({e.msg})") from None
    return module
