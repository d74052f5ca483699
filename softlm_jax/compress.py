"""Turning dense kernels into trainable SVD factors (paper sections 4.1-4.2).

The decompositions themselves live in :mod:`softlm_jax.svd` (``decompose``, ``whitened_factors``, ...),
the selection rules' parameters and forward scale in :mod:`softlm_jax.rules`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, rules, svd, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.svd import balance, decompose


def init_rank(rows: int, cols: int, cfg: CompressionConfig) -> int:
  """Number of singular triplets kept at decomposition time (``cfg.init_rank``)."""
  full = min(rows, cols)
  if cfg.init_rank == "full":
    return full
  if cfg.init_rank == "break_even":
    return max(1, budget.break_even_rank(rows, cols))
  return min(int(cfg.init_rank), full)


def spectrum_scale(s: np.ndarray, rows: int, cols: int, cfg: CompressionConfig) -> float:
  """What a layer's descending spectrum ``s`` ``(q,)`` is divided by (``cfg.normalize``); 1 if that is 0."""
  if cfg.normalize == "top":
    scale = s[0]
  elif cfg.normalize == "energy":
    scale = np.sqrt(np.sum(np.square(s, dtype=np.float64)))
  elif cfg.normalize == "uniform_rank":
    scale = s[min(budget.uniform_rank(rows, cols, cfg.target_ratio), len(s) - 1)]
  else:
    return 1.0
  return float(scale) if scale > 0 else 1.0


def compress_params(params: Mapping, cfg: CompressionConfig, grams: Optional[Mapping] = None, *,
                    factors: Optional[Mapping[str, tuple]] = None, calibration: Optional[Any] = None) -> dict:
  """Replaces each selected kernel by its SVD factors plus the selection rule's parameters.

  Each selected module's ``{"kernel": K, "bias": b}`` (``K`` rows x cols in the module's storage
  layout: in x out for ``nn.Dense``, out x in for HF's ``FlaxConv1D``) becomes
  ``{"left": (rows, k), "s": (k,), "right": (k, cols), **rule.init(k, cfg), "bias": b}`` with
  ``K = left @ diag(s) @ right`` and ``rule = softlm_jax.rules.get(cfg.method)`` (SoftLM: ``"alpha": ()``,
  LLRC: ``"mask_logits": (k,)``). The spectrum is divided by :func:`spectrum_scale` (``cfg.normalize``)
  and the scale moved into ``right``; decompositions marked ``balance`` (whitened) get balanced factors
  (:func:`softlm_jax.svd.balance`). Everything else is returned unchanged (as plain dicts).

  Args:
    params: the dense tree.
    cfg: selection, decomposition, rule and initial rank.
    grams: calibration Grams for a decomposition that needs them (``"whitened"``;
      :func:`softlm_jax.collect_grams`).
    factors: a :func:`softlm_jax.svd.decompose` result of the same ``params`` and decomposition to
      reuse (one SVD for several CRs or methods).
    calibration: a :class:`softlm_jax.calib.Calibration` (apply_fn + batches + mask) that the
      decomposition draws its statistics from (Grams collected once per selection and shared by every
      call that is handed the same object); see :func:`softlm_jax.svd.decompose`.

  Raises:
    ValueError: naming the layer and shape for NaN/Inf kernels, non-2-D selected kernels, a
      selection that matches nothing, or (whitened) a missing, misshapen or non-finite Gram.
  """
  rule = rules.get(cfg.method)
  balanced = svd.get(cfg.decomposition).balance
  factors = decompose(params, cfg, grams, calibration) if factors is None else factors

  def replace(path: str, node: Mapping) -> Mapping:
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    rows, cols = u.shape[0], vt.shape[1]
    k = min(init_rank(rows, cols, cfg), len(s))
    scale = spectrum_scale(s, rows, cols, cfg)
    left, right = u[:, :k], vt[:k] * scale
    if balanced:
      left, right = balance(left, right)
    new = {key: v for key, v in node.items() if key != "kernel"}
    new["left"] = jnp.asarray(left, dtype)
    new["s"] = jnp.asarray(s[:k] / scale, dtype)
    new["right"] = jnp.asarray(right, dtype)
    new.update(rule.init(k, cfg))
    return new

  return tree.map_modules(params, replace)
