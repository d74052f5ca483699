"""Turning dense kernels into trainable SVD factors (paper sections 4.1-4.2)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.threshold import soft_threshold, straight_through_mask

#: Parameter names of a factored layer (any selection rule); everything else in the module (bias)
#: passes through untouched.
FACTOR_KEYS = ("left", "right", "s", "alpha", "mask_logits")


def init_rank(rows: int, cols: int, cfg: CompressionConfig) -> int:
  """Number of singular triplets kept at decomposition time (``cfg.init_rank``)."""
  full = min(rows, cols)
  if cfg.init_rank == "full":
    return full
  if cfg.init_rank == "break_even":
    return max(1, budget.break_even_rank(rows, cols))
  return min(int(cfg.init_rank), full)


@jax.jit
def _batched_svd(k: jax.Array):
  return jnp.linalg.svd(k, full_matrices=False)


def svd_factors(kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Thin SVD of a stack of kernels in float32: ``K = left @ diag(s) @ right``.

  Args:
    kernels: ``(B, rows, cols)``.

  Returns:
    ``left (B, rows, q)``, ``s (B, q)`` descending, ``right (B, q, cols)`` with ``q = min(rows, cols)``.
  """
  u, s, vt = _batched_svd(jnp.asarray(kernels, jnp.float32))
  return np.asarray(u), np.asarray(s), np.asarray(vt)


def _check_finite(path: str, kernel: Any) -> None:
  k = np.asarray(kernel)
  bad = int(np.size(k) - np.count_nonzero(np.isfinite(k)))
  if bad:
    raise ValueError(f"layer '{path}': kernel of shape {k.shape} has {bad} NaN/Inf entries; "
                     "cannot take its SVD")


def decompose(params: Mapping, cfg: CompressionConfig) -> dict[str, tuple]:
  """SVD of every kernel ``cfg`` selects, batched by shape: ``{path: (left, s, right, dtype)}``."""
  kernels = tree.selected_kernels(params, cfg)
  for path, k in kernels:
    _check_finite(path, k)
  budget.dense_params(params, cfg)  # int32 range check
  by_shape: dict[tuple, list] = {}
  for path, k in kernels:
    by_shape.setdefault(tuple(np.shape(k)), []).append((path, k))
  out = {}
  for shape, group in by_shape.items():
    u, s, vt = svd_factors(np.stack([np.asarray(k, np.float32) for _, k in group]))
    for i, (path, k) in enumerate(group):
      out[path] = (u[i], s[i], vt[i], np.asarray(k).dtype)
  return out


def initial_mask_logits(k: int, cfg: CompressionConfig) -> jax.Array:
  """LLRC's starting logits, ``(k,)`` float32: linear from ``cfg.mask_init[0]`` (largest singular
  value) to ``cfg.mask_init[1]`` (smallest); all > 0, so the hard mask starts all ones."""
  first, last = cfg.mask_init
  return jnp.asarray(np.linspace(first, last, k) if k > 1 else [first], jnp.float32)


def compress_params(params: Mapping, cfg: CompressionConfig) -> dict:
  """Replaces each selected kernel by its SVD factors plus the selection rule's parameters.

  Each selected module's ``{"kernel": K, "bias": b}`` (``K`` rows x cols in the module's storage
  layout: in x out for ``nn.Dense``, out x in for HF's ``FlaxConv1D``) becomes
  ``{"left": (rows, k), "s": (k,), "right": (k, cols), "alpha": (), "bias": b}`` with
  ``K = left @ diag(s) @ right`` (``cfg.method="llrc"``: ``"mask_logits": (k,)`` instead of
  ``alpha``). With ``cfg.normalize`` the spectrum is divided by its largest value and the scale moved
  into ``right``. Everything else is returned unchanged (as plain dicts).

  Raises:
    ValueError: naming the layer and shape for NaN/Inf kernels, non-2-D selected kernels, or a
      selection that matches nothing.
  """
  factors = decompose(params, cfg)

  def replace(path: str, node: Mapping) -> Mapping:
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    rows, cols = u.shape[0], vt.shape[1]
    k = init_rank(rows, cols, cfg)
    scale = s[0] if (cfg.normalize and s[0] > 0) else 1.0
    new = {key: v for key, v in node.items() if key != "kernel"}
    new["left"] = jnp.asarray(u[:, :k], dtype)
    new["s"] = jnp.asarray(s[:k] / scale, dtype)
    new["right"] = jnp.asarray(vt[:k] * scale, dtype)
    if cfg.method == "llrc":
      new["mask_logits"] = initial_mask_logits(k, cfg)
    else:
      new["alpha"] = jnp.zeros((), jnp.float32)
    return new

  return tree.map_modules(params, replace)


def singular_scale(layer: Mapping, cfg: CompressionConfig) -> jax.Array:
  """The vector that multiplies a training-form layer's ``k`` factor columns: ``Th(s)``, shape ``(k,)``.

  SoftLM: ``Th(s)``; LLRC: ``s * mask`` with the straight-through hard mask. Exported layers have
  none (it is merged into ``left``). This is the one place a selection rule turns singular values
  into the forward pass's scale; export merges exactly this vector, and its zeros are exactly the
  entries :func:`softlm_jax.budget.kept` drops.
  """
  if "alpha" in layer:
    return soft_threshold(layer["s"], layer["alpha"], sharpness=cfg.sharpness, floor=cfg.floor)
  if "mask_logits" in layer:
    return layer["s"] * straight_through_mask(layer["mask_logits"], temperature=cfg.mask_temperature)
  raise ValueError(f"layer with keys {sorted(layer)} has no threshold or mask (already exported?)")
