"""Model-specific glue (Hugging Face Flax models)."""
from softlm_jax.models import hf  # noqa: F401
