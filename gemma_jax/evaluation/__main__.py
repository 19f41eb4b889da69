"""lm-eval's own command line with the "gemma_jax" model registered:

    python -m gemma_jax.evaluation run --model gemma_jax --model_args pretrained=CKPT --tasks T
"""

from gemma_jax.evaluation import harness  # noqa: F401  (registers "gemma_jax")
from lm_eval.__main__ import cli_evaluate

cli_evaluate()
