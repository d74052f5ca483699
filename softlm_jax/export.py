"""Export: merge the scale into the left factor and cut each layer to its rank (paper section 4.5).

Exported layers hold ``left (rows, r)`` and ``right (r, cols)`` (so inference costs ``r (rows+cols)``
multiply-adds per token) or, when ``r >= break_even_rank``, a plain dense ``kernel`` that the module
runs natively. The same :func:`softlm_jax.budget.effective_rank` decides the rank everywhere.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, tree
from softlm_jax.compress import FACTOR_KEYS, decompose, singular_scale
from softlm_jax.config import CompressionConfig


def _emit(node: Mapping, left: np.ndarray, right: np.ndarray, dtype) -> dict:
  """Module params for factors ``left (rows, r)``, ``right (r, cols)``: factored or, at/above
  break-even, dense."""
  rows, r, cols = left.shape[0], left.shape[1], right.shape[1]
  keep = {k: v for k, v in node.items() if k not in FACTOR_KEYS + ("kernel",)}
  if r >= budget.break_even_rank(rows, cols):
    keep["kernel"] = jnp.asarray(left.astype(np.float32) @ right.astype(np.float32), dtype)
  else:
    keep["left"] = jnp.asarray(left, dtype)
    keep["right"] = jnp.asarray(right, dtype)
  return keep


def export_params(params: Mapping, cfg: Optional[CompressionConfig] = None) -> dict:
  """Compact inference tree from a training-form tree.

  For each training-form layer: ``left <- (left * scale)[:, kept]``, ``right <- right[kept]`` with
  ``scale = Th(s)`` and ``kept = scale != 0``; the rank is
  :func:`softlm_jax.budget.effective_rank`. Already-exported layers and dense modules pass through.
  Run it outside ``jit`` (output shapes depend on the learned ranks).
  """
  cfg = cfg or CompressionConfig()

  def convert(path: str, node: Mapping) -> Mapping:
    if not tree.is_factored(node) or "s" not in node:
      return node
    rank = int(budget.effective_rank(node))
    scale = np.asarray(singular_scale(node, cfg), np.float32)
    # Rank and kept set must agree: keep the `rank` largest |scale| entries (ties cannot add rank).
    kept = np.sort(np.argsort(-np.abs(scale), kind="stable")[:rank])
    left = np.asarray(node["left"], np.float32)[:, kept] * scale[kept]
    right = np.asarray(node["right"], np.float32)[kept]
    return _emit(node, left, right, np.asarray(node["left"]).dtype)

  return tree.map_modules(params, convert)


def static_ranks(params: Mapping, cfg: CompressionConfig) -> dict[str, int]:
  """Uniform keep-ratio: rank ``floor((1 - CR) * rows * cols / (rows + cols))`` for each selected kernel."""
  return {path: int(np.floor((1.0 - cfg.target_ratio) * np.prod(np.shape(k)) / sum(np.shape(k))))
          for path, k in tree.selected_kernels(params, cfg)}


def static_svd(params: Mapping, cfg: CompressionConfig, ranks: Optional[Mapping[str, int]] = None) -> dict:
  """The static baseline: truncated SVD of every selected kernel, exported.

  ``ranks`` defaults to :func:`static_ranks` (the same keep-ratio in every layer, so the count is at
  most the target); pass e.g. the ranks of a SoftLM run to get its non-uniform shapes from the dense
  weights.
  """
  ranks = dict(static_ranks(params, cfg) if ranks is None else ranks)
  factors = decompose(params, cfg)

  def convert(path: str, node: Mapping) -> Mapping:
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    r = ranks[path]
    return _emit(node, u[:, :r] * s[:r], vt[:r], dtype)

  return tree.map_modules(params, convert)
