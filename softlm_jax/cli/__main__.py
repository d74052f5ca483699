"""``python -m softlm_jax.cli``: the ``softlm`` command."""
import sys

from softlm_jax.cli import main

sys.exit(main())
