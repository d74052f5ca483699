"""Model-specific glue (Hugging Face Flax models)."""
from softlm_jax.models import hf  # noqa: F401
from softlm_jax.models import gguf_llama  # noqa: F401  (gguf and the Flax classes load lazily)
from softlm_jax.models import mamba  # noqa: F401  (pure JAX/Flax; safetensors loads lazily)
