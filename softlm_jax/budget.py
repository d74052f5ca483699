"""Rank and parameter counting: the one source used by training, freezing, export, reports and tests.

A layer with kernel ``rows x cols`` kept at rank ``r`` costs ``r * (rows + cols)`` parameters, unless
``r >= break_even_rank(rows, cols) = floor(rows * cols / (rows + cols))``: then the factors are no
smaller than the kernel, export keeps it dense, and it costs ``rows * cols``. Biases are not counted.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax import rules, tree
from softlm_jax.config import CompressionConfig

INT_MAX = 2**31 - 1


def break_even_rank(rows: int, cols: int) -> int:
  """floor(rows*cols / (rows+cols)): the rank from which a factored layer is kept dense."""
  return rows * cols // (rows + cols)


def uniform_rank(rows: int, cols: int, ratio: float) -> int:
  """The static baseline's rank: ``floor((1 - ratio) * rows * cols / (rows + cols))``, the same keep-ratio
  ``1 - ratio`` of the dense parameters in every layer (so the count is at most the target)."""
  return int(np.floor((1.0 - ratio) * rows * cols / (rows + cols)))


def layer_cost(rank: jax.typing.ArrayLike, rows: int, cols: int) -> jax.Array:
  """Counted parameters of one layer at ``rank`` (scalar int array, jit-friendly)."""
  rank = jnp.asarray(rank, jnp.int32)
  return jnp.where(rank >= break_even_rank(rows, cols), rows * cols, rank * (rows + cols))


def fill_shift(margins: Sequence[jax.Array], shapes: Sequence[tuple[int, int]], target: int, *,
               min_rank: int = 1) -> jax.Array:
  """Per-layer shifts that hold a selection at its budget: a triplet is kept when its margin exceeds its
  layer's shift, and the kept set is each layer's ``min_rank`` largest margins plus the longest run of
  the other triplets, taken in decreasing margin over all layers, whose count (:func:`layer_cost`
  summed over the layers) is at most ``target``. Jit-friendly (one sort over every triplet; static
  shapes).

  Every layer's shift is the same ``tau`` (midway between the last kept and the first dropped sorted
  margin of the run) except where that would leave a layer under ``min_rank``: its shift then sits
  midway between its ``min_rank``-th and next margin. Within a layer the kept triplets are its largest
  margins, so each layer's count is ``layer_cost(#kept)``; the count never exceeds ``target`` (when
  the ``min_rank`` floor fits it) and falls short of it by less than the next triplet's cost in that
  order (``rows + cols``; under twice that at a layer's jump to dense).

  Args:
    margins: one ``(k_l,)`` float array per layer; kept is ``margin > 0`` (a rule's ``margin``).
    shapes: ``(rows, cols)`` of each layer's kernel.
    target: the budget of these layers (static int).
    min_rank: triplets every layer keeps whatever its margins (capped at its ``k``).

  Returns:
    ``(L,)`` float32 shifts, one per layer: subtract each from its layer's margins.
  """
  if len(margins) != len(shapes) or not margins:
    raise ValueError(f"fill_shift needs one margin vector per shape, got {len(margins)} and {len(shapes)}")
  if min_rank < 0:
    raise ValueError(f"min_rank must be >= 0, got {min_rank!r}")
  tops, vals, incs = [], [], []
  floor_cost = 0
  for m, (rows, cols) in zip(margins, shapes):
    m = jnp.asarray(m, jnp.float32).reshape(-1)
    k = m.shape[0]
    fl = min(min_rank, k)
    srt = -jnp.sort(-m)  # the layer's margins, largest first
    ranks = np.arange(k + 1)
    cost = np.where(ranks >= break_even_rank(rows, cols), rows * cols, ranks * (rows + cols))
    floor_cost += int(cost[fl])
    tops.append((srt, fl, k))
    vals.append(srt[fl:])
    incs.append(np.diff(cost)[fl:].astype(np.int64))  # the cost of its (j+1)-th triplet after the j first
  inc = np.concatenate(incs)
  if int(inc.sum()) + floor_cost > INT_MAX:
    raise ValueError(f"the layers hold {int(inc.sum()) + floor_cost} parameters, more than int32 counting allows")
  v = jnp.concatenate(vals)
  size = v.shape[0]
  if size:
    order = jnp.argsort(-v, stable=True)  # stable: a layer's equal margins keep its own order
    v = v[order]
    cum = jnp.cumsum(jnp.asarray(inc, jnp.int32)[order])
    n = jnp.searchsorted(cum, jnp.asarray(target - floor_cost, jnp.int32), side="right")  # triplets that fit
    hi = jnp.where(n > 0, v[jnp.maximum(n - 1, 0)], v[0] + 1.0)
    lo = jnp.where(n < size, v[jnp.minimum(n, size - 1)], v[size - 1] - 1.0)
    tau = (hi + lo) / 2
  else:
    tau = jnp.asarray(-jnp.inf, jnp.float32)
  shifts = []
  for srt, fl, k in tops:
    if fl == 0:
      shifts.append(tau)
      continue
    last = srt[fl - 1]  # the floor's smallest margin: kept whatever tau is
    nxt = srt[fl] if fl < k else last - 1.0
    shifts.append(jnp.where(last > tau, tau, (last + nxt) / 2))
  return jnp.stack(shifts).astype(jnp.float32)


def layer_shape(layer: Mapping) -> tuple[int, int]:
  """(rows, cols) of the kernel a factored layer represents, in the module's storage layout."""
  return int(np.shape(layer["left"])[0]), int(np.shape(layer["right"])[-1])


def has_selection(layer: Mapping) -> bool:
  """Whether a factored layer is in training form (holds a selection rule's parameters to learn)."""
  return rules.rule_of(layer) is not None


def kept(layer: Mapping) -> jax.Array:
  """Which singular triplets of a training-form layer survive export: bool ``(k,)``.

  The layer's rule's ``kept`` (:mod:`softlm_jax.rules`): SoftLM ``s > alpha`` (exactly the non-zero
  entries of ``Th(s)`` with c = 0); LLRC ``mask_logits > 0`` (the hard mask).
  """
  rule = rules.rule_of(layer)
  if rule is None:
    raise ValueError(f"layer with keys {sorted(layer)} is not in training form (no selection parameters of "
                     f"any rule {rules.names()})")
  return rule.kept(layer)


def effective_rank(layer: Mapping) -> jax.Array:
  """Rank a factored layer has after export (scalar int32; traced under jit).

  Training form: ``sum(kept(layer))``. Exported form: the factors' width.
  """
  if has_selection(layer):
    return jnp.sum(kept(layer)).astype(jnp.int32)
  return jnp.asarray(np.shape(layer["left"])[1], jnp.int32)


def layer_ranks(params: Mapping, cfg: Optional[CompressionConfig] = None) -> dict[str, jax.Array]:
  """``{path: rank}`` of every factored layer; with ``cfg`` also selected dense kernels (full rank)."""
  out = {path: effective_rank(layer) for path, layer in tree.factored_layers(params)}
  if cfg is not None:
    for path, k in tree.selected_kernels(params, cfg, strict=False):
      out[path] = jnp.asarray(min(np.shape(k)), jnp.int32)
  return out


def _shapes(params: Mapping, cfg: Optional[CompressionConfig]) -> dict[str, tuple[int, int]]:
  out = {path: layer_shape(layer) for path, layer in tree.factored_layers(params)}
  if cfg is not None:
    out.update({p: tuple(np.shape(k)) for p, k in tree.selected_kernels(params, cfg, strict=False)})
  return out


def count_params(params: Mapping, cfg: Optional[CompressionConfig] = None) -> jax.Array:
  """Counted kernel parameters of the compressed layers (scalar int32 array; jit-friendly).

  Counts every factored layer (training or exported form) with :func:`layer_cost`, and, when ``cfg``
  is given, every dense kernel ``cfg`` selects at ``rows * cols`` (so on the dense model it gives the
  dense total, and on an exported tree it also counts the layers export kept dense).
  """
  ranks = layer_ranks(params, cfg)
  shapes = _shapes(params, cfg)
  total = jnp.zeros((), jnp.int32)
  for path, r in ranks.items():
    total = total + layer_cost(r, *shapes[path])
  return total


def relaxed_count(params: Mapping, cfg: CompressionConfig) -> jax.Array:
  """Differentiable stand-in for :func:`count_params` (scalar float32), e.g. for LLRC's budget term.

  Each layer whose rule has a ``relaxed_rank`` (LLRC: ``sum(sigmoid(mask_logits / T))``) costs
  ``relaxed_rank * (rows + cols)``: the factored cost with the relaxed rank; other layers count 0.
  The break-even rule is left out on purpose (it would give zero gradient while a layer is above
  break-even, e.g. at the start); the hard count decides when the budget is met.
  """
  total = jnp.zeros((), jnp.float32)
  for _, layer in tree.factored_layers(params):
    rule = rules.rule_of(layer)
    if rule is not None and rule.relaxed_rank is not None:
      rows, cols = layer_shape(layer)
      total = total + rule.relaxed_rank(layer, cfg).astype(jnp.float32) * (rows + cols)
  return total


def dense_params(params: Mapping, cfg: Optional[CompressionConfig] = None) -> int:
  """Dense kernel parameters of the same layers that :func:`count_params` counts (static int)."""
  total = sum(r * c for r, c in _shapes(params, cfg).values())
  if total > INT_MAX:
    raise ValueError(f"the selected layers hold {total} parameters, more than int32 counting allows; "
                     "enable jax_enable_x64 or select fewer layers")
  return total


def target_params(params: Mapping, cfg: CompressionConfig) -> int:
  """The budget: floor((1 - target_ratio) * dense_params)."""
  return int(np.floor((1.0 - cfg.target_ratio) * dense_params(params, cfg)))


def budget_report(params: Mapping, cfg: CompressionConfig) -> dict:
  """Plain-Python summary (outside jit): per-layer rank and shape, totals, target, whether it is met."""
  ranks = {p: int(r) for p, r in layer_ranks(params, cfg).items()}
  shapes = _shapes(params, cfg)
  counted = int(count_params(params, cfg))
  dense = dense_params(params, cfg)
  target = target_params(params, cfg)
  return {
      "layers": {p: {"rank": ranks[p], "shape": list(shapes[p]),
                     "break_even": break_even_rank(*shapes[p]),
                     "params": int(layer_cost(ranks[p], *shapes[p]))} for p in ranks},
      "counted_params": counted, "dense_params": dense, "target_params": target,
      "achieved_ratio": 1.0 - counted / dense if dense else 0.0, "budget_met": counted <= target,
  }
