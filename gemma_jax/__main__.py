import sys

from gemma_jax.cli import main

sys.exit(main())
