"""``python -m softlm_jax.bench``."""
from softlm_jax.bench.cli import main

if __name__ == "__main__":
  main()
