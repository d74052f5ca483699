"""The benchmarked models (random weights: timings depend on shapes only; ``minilm`` is real)."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax.models import hf
from softlm_jax.models.mamba import MambaConfig, MambaLM
from softlm_jax.nnx_bridge import NNXModel


MODELS: dict[str, dict] = {
    "bert-base": {"family": "bert", "config": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512)},
    "gpt2-medium": {"family": "gpt2", "config": dict(
        vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024)},
    "tinyllama-1.1b": {"family": "llama", "config": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048)},
    "mamba-130m": {"family": "mamba", "config": dict(
        vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2)},
    "smollm2-135m": {"family": "llama", "config": dict(  # SmolLM2-135M's shapes (random weights)
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True)},
    "minilm": {"family": "bert", "real": True},
    "tiny-bert": {"family": "bert", "config": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64)},
    "tiny-gpt2": {"family": "gpt2", "config": dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)},
    "tiny-llama": {"family": "llama", "config": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)},
    "tiny-mamba": {"family": "mamba", "config": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)},
}


DECODERS = ("gpt2", "llama", "mamba")


def _hf_classes(family: str):
  import transformers as tf  # heavy: imported on use
  return {"bert": (tf.BertConfig, tf.FlaxBertForSequenceClassification),
          "gpt2": (tf.GPT2Config, tf.FlaxGPT2LMHeadModel),
          "llama": (tf.LlamaConfig, tf.FlaxLlamaForCausalLM)}[family]


def cast_params(params, dtype):
  """``params`` with every floating leaf cast to ``dtype`` (integer leaves unchanged)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


@dataclasses.dataclass
class BenchModel:
  """One model: its forward (logits), decode step and training logits as functions of ``params``."""
  name: str
  family: str
  module: Any
  params: Any
  config: dict
  dtype: str = "float32"

  @property
  def decoder(self) -> bool:
    return self.family in DECODERS

  @property
  def vocab(self) -> int:
    return int(self.config.get("vocab_size", 97))

  def forward(self, params, ids):
    if isinstance(self.module, NNXModel):
      return self.module.apply(params, ids)
    if self.family == "mamba":
      return self.module.apply({"params": params}, ids)
    return self.module(ids, params=params, train=False).logits

  def train_logits(self, params, ids, rng):
    if isinstance(self.module, NNXModel):
      return self.module.apply(params, ids)
    if self.family == "mamba":
      return self.module.apply({"params": params}, ids)
    return self.module(ids, params=params, dropout_rng=rng, train=True).logits

  def init_cache(self, batch: int, length: int):
    """Zero decode state for ``batch`` sequences and a KV cache of ``length`` positions."""
    if self.family == "mamba":
      return self.module.init_cache(batch)
    shapes = jax.eval_shape(lambda: self.module.init_cache(batch, length))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode(self, params, cache, ids, pos):
    """One token per sequence: ``ids (batch, 1)``, ``pos (batch, 1)`` -> ``(logits, cache)``."""
    if self.family == "mamba":
      return self.module.decode_step(params, ids[:, 0], cache)
    length = next(x for x in jax.tree.leaves(cache) if np.ndim(x) == 4).shape[1]  # (batch, len, heads, dim)
    mask = jnp.ones((ids.shape[0], length), jnp.int32)
    out = self.module(ids, attention_mask=mask, position_ids=pos, params=params, past_key_values=cache,
                      train=False)
    return out.logits, out.past_key_values


def mamba_available() -> bool:
  try:
    importlib.import_module("softlm_jax.models.mamba")
    return True
  except ImportError:
    return False


def build_model(name: str, dtype: str = "float32", seed: int = 0) -> BenchModel:
  """A :data:`MODELS` entry with random weights (``minilm``: the real ones), params in ``dtype``."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  spec = MODELS[name]
  family, jdt = spec["family"], jnp.dtype(dtype)
  if spec.get("real"):
    module, _ = hf.load_classifier("minilm", 2, seed=seed)
    params = module.params
    config = {k: v for k, v in module.config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    if jdt != jnp.float32:
      module = type(module)(module.config, dtype=jdt, _do_init=False)
    return BenchModel(name, family, module, cast_params(params, jdt), config, str(jdt))
  config = dict(spec["config"])
  if family == "mamba":
    module = MambaLM(MambaConfig(**config), dtype=jdt)
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  else:
    cfg_cls, model_cls = _hf_classes(family)
    module = model_cls(cfg_cls(**config), seed=seed, dtype=jdt, _do_init=False)
    params = jax.jit(lambda r: module.init_weights(r, (1, 8)))(jax.random.PRNGKey(seed))
  params = jax.tree.map(jnp.asarray, dict(params))
  return BenchModel(name, family, module, cast_params(params, jdt), config, str(jdt))
