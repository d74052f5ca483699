"""Export: merge the scale into the left factor and cut each layer to its rank (paper section 4.5).

Exported layers hold ``left (rows, r)`` and ``right (r, cols)`` (so inference costs ``r (rows+cols)``
multiply-adds per token) or, when ``r >= break_even_rank``, a plain dense ``kernel`` that the module
runs natively. The same :func:`softlm_jax.budget.effective_rank` decides the rank everywhere.

Rank rounding (``rank_multiple``, an option for speed): matmul libraries run some widths faster than
their neighbours (on the 2-core EPYC CPU of BENCHMARKS.md a 3072 -> r product runs 1.2x faster at
r = 304 than at r = 307; GPUs prefer multiples of 8-64). ``rank_rounding="down"`` drops the weakest
kept triplets down to a multiple (fewer params, slightly less accurate); ``"up"`` pads with zero
triplets (exactly the same function, more params). See :func:`rounded_rank`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, rules, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.rules import singular_scale
from softlm_jax.svd import decompose


ROUNDINGS = ("down", "up")


def rounded_rank(rank: int, multiple: int = 1, rounding: str = "down") -> int:
  """``rank`` rounded to a multiple of ``multiple``.

  ``"down"`` never removes a layer: a rank below ``multiple`` is kept as it is. ``"up"`` rounds up.
  ``multiple=1`` returns ``rank``.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rank_rounding must be one of {ROUNDINGS}, got {rounding!r}")
  if int(multiple) != multiple or multiple < 1:
    raise ValueError(f"rank_multiple must be a positive int, got {multiple!r}")
  rank, multiple = int(rank), int(multiple)
  if multiple == 1 or rank % multiple == 0:
    return rank
  if rounding == "up":
    return rank + multiple - rank % multiple
  return rank - rank % multiple if rank >= multiple else rank


def emit_layer(node: Mapping, left: np.ndarray, right: np.ndarray, dtype, rank_multiple: int = 1,
               rank_rounding: str = "down") -> dict:
  """Exported module params for factors ``left (rows, r)``, ``right (r, cols)`` (columns in decreasing
  importance): rounded to ``rank_multiple``, then factored or, at/above break-even, a dense ``kernel``
  (``rows @ cols`` in ``dtype``). ``node``'s other leaves (bias) are kept; its factors, kernel and
  selection parameters are dropped."""
  r = rounded_rank(left.shape[1], rank_multiple, rank_rounding)
  if r <= left.shape[1]:
    left, right = left[:, :r], right[:r]
  else:  # zero triplets: the same kernel
    left = np.pad(left, ((0, 0), (0, r - left.shape[1])))
    right = np.pad(right, ((0, r - right.shape[0]), (0, 0)))
  rows, r, cols = left.shape[0], left.shape[1], right.shape[1]
  drop = set(tree.FACTOR_KEYS) | set(rules.selection_keys()) | {"kernel"}
  keep = {k: v for k, v in node.items() if k not in drop}
  if r >= budget.break_even_rank(rows, cols):
    keep["kernel"] = jnp.asarray(left.astype(np.float32) @ right.astype(np.float32), dtype)
  else:
    keep["left"] = jnp.asarray(left, dtype)
    keep["right"] = jnp.asarray(right, dtype)
  return keep


def export_params(params: Mapping, cfg: Optional[CompressionConfig] = None, *, rank_multiple: int = 1,
                  rank_rounding: str = "down") -> dict:
  """Compact inference tree from a training-form tree.

  For each training-form layer: ``left <- (left * scale)[:, kept]``, ``right <- right[kept]`` with
  ``scale`` the layer's rule's forward scale (:func:`softlm_jax.rules.singular_scale`: ``Th(s)``
  for SoftLM, ``s * mask`` for LLRC) and ``kept = budget.kept(layer)`` (its non-zero entries, in any
  order: LLRC masks need not be a prefix); the rank is
  :func:`softlm_jax.budget.effective_rank`. Already-exported layers and dense modules pass through.
  Run it outside ``jit`` (output shapes depend on the learned ranks).

  ``rank_multiple`` / ``rank_rounding`` (module docstring): ``"down"`` drops the kept triplets with
  the smallest ``|scale|``; ``"up"`` keeps the trained function exactly.
  """
  cfg = cfg or CompressionConfig()
  rounded_rank(1, rank_multiple, rank_rounding)  # validate before the walk

  def convert(path: str, node: Mapping) -> Mapping:
    if not tree.is_factored(node) or "s" not in node:
      return node
    scale = np.asarray(singular_scale(node, cfg), np.float32)
    kept = np.flatnonzero(np.asarray(budget.kept(node)))  # the same set effective_rank counts
    r = rounded_rank(kept.size, rank_multiple, rank_rounding)
    if r < kept.size:  # rounding down: keep the r strongest, in their original order
      kept = np.sort(kept[np.argsort(-np.abs(scale[kept]), kind="stable")[:r]])
    left = np.asarray(node["left"], np.float32)[:, kept] * scale[kept]
    right = np.asarray(node["right"], np.float32)[kept]
    return emit_layer(node, left, right, np.asarray(node["left"]).dtype, rank_multiple, rank_rounding)

  return tree.map_modules(params, convert)


def static_ranks(params: Mapping, cfg: CompressionConfig) -> dict[str, int]:
  """Uniform keep-ratio: :func:`softlm_jax.budget.uniform_rank` of each selected kernel."""
  return {path: budget.uniform_rank(*np.shape(k), cfg.target_ratio) for path, k in tree.selected_kernels(params, cfg)}


def static_svd(params: Mapping, cfg: CompressionConfig, ranks: Optional[Mapping[str, int]] = None, *,
               factors: Optional[Mapping[str, tuple]] = None, grams: Optional[Mapping] = None,
               calibration=None, rank_multiple: int = 1, rank_rounding: str = "down") -> dict:
  """The static baseline: truncated SVD of every selected kernel, exported.

  ``ranks`` defaults to :func:`static_ranks` (the same keep-ratio in every layer, so the count is at
  most the target); pass e.g. the ranks of a SoftLM run to get its non-uniform shapes from the dense
  weights. ``factors``: a :func:`softlm_jax.svd.decompose` result of the same ``params`` to
  reuse (e.g. one SVD for several CRs); ``grams``: calibration Grams for
  ``cfg.decomposition="whitened"`` (SVD-LLM's truncation when the ranks are uniform);
  ``calibration``: a :class:`softlm_jax.calib.Calibration` the decomposition draws its statistics from
  (shared Grams, see :func:`softlm_jax.svd.decompose`).
  ``rank_multiple`` / ``rank_rounding``: see the module docstring (``"down"`` keeps the count within
  the target).
  """
  rounded_rank(1, rank_multiple, rank_rounding)
  ranks = dict(static_ranks(params, cfg) if ranks is None else ranks)
  factors = decompose(params, cfg, grams, calibration) if factors is None else factors

  def convert(path: str, node: Mapping) -> Mapping:
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    r = ranks[path]
    return emit_layer(node, u[:, :r] * s[:r], vt[:r], dtype, rank_multiple, rank_rounding)

  return tree.map_modules(params, convert)
