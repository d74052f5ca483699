"""Model-specific glue: one family adapter per file, registered in :mod:`softlm_jax.models.family`.

``models.load(spec, kind)`` loads a model; ``models.from_manifest(info)`` rebuilds the module of a
compact checkpoint; ``models.names(kind)`` lists what ``--model`` accepts.
"""
from softlm_jax.models import family
from softlm_jax.models.family import (Family, Model, check_spec, from_manifest, get, load, load_tokenizer, names,
                                     register, resolve)
from softlm_jax.models import hf  # noqa: E402,F401  HF classifiers, causal LMs, tiny-gpt2, tiny-llama
from softlm_jax.models import gguf_llama  # noqa: E402,F401  smollm2 (gguf and the Flax classes load lazily)
from softlm_jax.models import mamba  # noqa: E402,F401  mamba, tiny-mamba (pure JAX/Flax)
from softlm_jax.models import nnx_llama  # noqa: E402,F401  smollm2-nnx, tiny-llama-nnx (Flax NNX)

__all__ = ["Family", "Model", "check_spec", "family", "from_manifest", "get", "load", "load_tokenizer", "names",
           "register", "resolve"]
