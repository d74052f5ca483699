"""Hugging Face Flax families: any HF Flax sequence classifier (the embedded all-MiniLM-L6-v2 by
default), any HF Flax causal LM folder / hub name, and the tiny random GPT-2 and Llama that tests and
smoke runs use (``tiny-gpt2``, ``tiny-llama``)."""
from __future__ import annotations

import os
from typing import Optional

from softlm_jax.models import family
from softlm_jax.models.weights import minilm_dir


def resolve_model(name: str) -> str:
  """``"minilm"`` -> the embedded checkpoint folder; anything else is passed to from_pretrained."""
  return minilm_dir() if name in ("minilm", "all-MiniLM-L6-v2") else name


def hub_unavailable(spec: str) -> Optional[str]:
  """Why ``spec`` (a ``from_pretrained`` argument) cannot load, or None: a local folder must hold a
  ``config.json``; any other spec must be a hub name already in the local cache or, when the hub is
  reachable (``HF_HUB_OFFLINE`` unset, a 10 s lookup), a repository on it."""
  if os.path.isdir(spec):
    return None if os.path.isfile(os.path.join(spec, "config.json")) else (
        f"the folder {spec} has no config.json (a Hugging Face model folder holds one)")
  if os.path.exists(spec):
    return f"{spec} is a file, not a model folder"
  from huggingface_hub import try_to_load_from_cache  # transformers' own dependency, optional here
  try:
    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
      return None
  except ValueError:  # not a valid repository id
    return "not a local folder, nor a valid Hugging Face hub name"
  if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in (
      "0", ""):
    return "no such local folder, and not in the local hub cache (HF_HUB_OFFLINE is set)"
  from huggingface_hub import HfApi  # heavy: imported on use
  from huggingface_hub.utils import RepositoryNotFoundError
  try:
    HfApi().model_info(spec, timeout=10)
  except RepositoryNotFoundError:
    return "no such local folder or Hugging Face hub repository exists"
  except Exception as e:  # noqa: BLE001 - any network failure: the hub cannot be reached
    return (f"no such local folder, not in the local hub cache, and the Hugging Face hub is unreachable "
            f"({type(e).__name__})")
  return None


def load_classifier(name: str, num_labels: int, seed: int = 0):
  """``FlaxAutoModelForSequenceClassification`` with a fresh head, and its tokenizer."""
  from transformers import AutoTokenizer, FlaxAutoModelForSequenceClassification  # heavy: imported on use
  from transformers.utils import logging
  family.flax_deprecation_notice()
  path = resolve_model(name)
  verbosity = logging.get_verbosity()
  logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
  try:
    model = FlaxAutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, seed=seed)
  finally:
    logging.set_verbosity(verbosity)
  return model, AutoTokenizer.from_pretrained(path)


class HFClassifier(family.Family):
  """Any HF Flax sequence classifier (BERT, RoBERTa, ...): a fresh head of ``num_labels``."""
  name, kind, generic = "hf-classifier", "classifier", True
  known = ("minilm",)
  description = "'minilm' (embedded all-MiniLM-L6-v2) or a HF Flax folder / hub name"

  def accepts(self, spec: str) -> bool:
    return bool(spec)

  def unavailable(self, spec: str) -> Optional[str]:
    return hub_unavailable(resolve_model(spec))

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    if not num_labels:
      raise ValueError(f"loading the classifier {spec!r} needs num_labels (the task's classes; 1: regression)")
    module, tok = load_classifier(spec, num_labels, seed=seed)
    return family.Model(self, spec, module, module.params, tok, resolve_model(spec), num_labels)


class HFCausalLM(family.Family):
  """Any HF Flax causal LM folder or hub name (``FlaxAutoModelForCausalLM``: GPT-2, Llama, ...)."""
  name, kind, generic = "hf-causal-lm", "causal_lm", True
  description = "a HF Flax causal-LM folder / hub name"

  def accepts(self, spec: str) -> bool:
    return bool(spec)

  def unavailable(self, spec: str) -> Optional[str]:
    return hub_unavailable(spec)

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    from transformers import AutoTokenizer, FlaxAutoModelForCausalLM  # heavy: imported on use
    family.flax_deprecation_notice()
    module = FlaxAutoModelForCausalLM.from_pretrained(spec, seed=seed)
    return family.Model(self, spec, module, module.params, AutoTokenizer.from_pretrained(spec), spec)


def tiny_tokenizer():
  """``(tokenizer, source)``: the SmolLM2 tokenizer when its package is installed, else MiniLM's
  (both offline)."""
  try:
    return family.load_tokenizer("smollm2"), "smollm2"
  except Exception:  # noqa: BLE001 - fall back to the always-installed MiniLM tokenizer
    from transformers import AutoTokenizer  # heavy: imported on use
    return AutoTokenizer.from_pretrained(minilm_dir()), minilm_dir()


class TinyHF(family.Family):
  """A small random HF Flax causal LM (4 blocks, width 128) over a real tokenizer: smoke runs and tests."""
  kind = "causal_lm"

  def __init__(self, name: str, arch: str):
    self.name, self.arch = name, arch
    self.description = f"random 4-block {arch} (smoke runs)"

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    import transformers as tf  # heavy: imported on use
    family.flax_deprecation_notice()
    tok, source = tiny_tokenizer()
    vocab, n_pos = len(tok), max(int(max_len), 64)
    if self.arch == "gpt2":
      module = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4,
                                                    n_positions=n_pos), seed=seed)
    else:
      module = tf.FlaxLlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=256, max_position_embeddings=n_pos),
                                       seed=seed)
    return family.Model(self, spec, module, module.params, tok, source)


family.register(HFClassifier(), aliases=("minilm", "all-MiniLM-L6-v2"))
family.register(HFCausalLM())
family.register(TinyHF("tiny-gpt2", "gpt2"))
family.register(TinyHF("tiny-llama", "llama"))


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
  return family.get("hf-causal-lm").generate(model, params, input_ids, max_new_tokens=max_new_tokens, cfg=cfg,
                                             attention_mask=attention_mask)


def model_from_manifest(info: dict, *, seed: int = 0, init: bool = False, dtype=None):
  """The Flax model a compact checkpoint was saved from, rebuilt from its manifest by the family that
  wrote it (:func:`softlm_jax.models.family.from_manifest`)."""
  return family.from_manifest(info, seed=seed, init=init, dtype=dtype)


def load_tokenizer(source: str):
  """A tokenizer from a model folder / hub name, or ``"smollm2"`` (the GGUF file's own tokenizer)."""
  return family.load_tokenizer(resolve_model(source))


def classifier_class(config) -> type:
  """The HF Flax sequence-classification class of a transformers config."""
  import transformers  # heavy: imported on use
  from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
  return getattr(transformers, FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config.model_type])

