"""A global, loss-aware rank allocation without training.

A whitened triplet's energy ``s_i^2`` is its output error at its own layer, not its effect on the
model's loss. This module measures the effect on the loss with one pass of gradients over calibration
batches, then spends the parameter budget where the loss needs it, exactly:

1. :func:`triplet_stats`: on a compressed training-form tree (:func:`softlm_jax.compress_params`, any
   decomposition) with every threshold far below every singular value (:func:`full_rank`, so the
   model is the full-rank one, ``Th(s) = s`` exactly), the gradient ``g_b = dL_b/ds`` of the caller's
   loss on each batch ``b`` with respect to every layer's ``s``, streamed, one jitted step a batch.
   Dropping triplet ``i`` is ``s_i -> 0``, a step of ``-s_i``.
2. :func:`drop_losses`: for each layer and each prefix rank ``r``, the estimated loss increase of
   keeping only the first ``r`` triplets (``{path: (k+1,)}``, non-increasing, 0 at ``r = k``). Scores
   (:data:`SCORES`), with ``d_i = g_i s_i`` and ``E_b`` the mean over samples (batches, or single
   examples with ``unit="example"``: :data:`SCORE_UNITS`):

   - ``"fisher"`` (the default): ``0.5 * sum_{i>=r} E_b[d_{b,i}^2]``, the diagonal empirical Fisher
     (Gauss-Newton) estimate of the second-order loss increase;
   - ``"block_fisher"``: ``0.5 * E_b[(sum_{i>=r} d_{b,i})^2]``: the same with the cross terms inside the
     dropped tail (the tail is dropped as one block);
   - ``"first_order"``: ``sum_{i>=r} |E_b d_i|``; ``"first_order_block"``: ``|sum_{i>=r} E_b d_i|``.

   Which one, by measurement (BENCHMARKS.md#ablations): on whitened SmolLM2-135M at CR 0.5
   (WikiText-2 raw test, training-free, the same budget) the ``"fisher"`` allocation gives ppl 500 where
   uniform gives 1,176 and ``"first_order"`` 1,289 (worse than uniform). On a tiny Llama's single-layer
   tail drops, Fisher and |first order| rank the larger true loss increases equally well (Spearman 0.92)
   while the signed first-order term ranks them poorly (0.39): at a trained model the mean gradient is
   a small difference of large per-batch terms, and for a KL-to-teacher loss it is exactly zero. The
   Fisher terms are positive, and their sum is the quadratic term of the Taylor expansion; its scale is
   that of a batch mean (about ``1 / tokens per batch`` of the per-token curvature), which no ranking
   depends on (use CE on labels sampled from the teacher for a KL objective: its Fisher is the KL's
   Hessian there).
3. :func:`allocate_ranks`: minimises ``sum_l drop_l(r_l)`` subject to
   ``sum_l budget.layer_cost(r_l) <= budget.target_params`` over prefix ranks (export keeps the largest
   values: ``r = #{s > alpha}``). A layer's options are ``min_rank .. break_even - 1`` (factored,
   ``r (rows + cols)``) and its full width ``k`` (at or above break-even export keeps it dense at
   ``rows * cols``, so ranks in between are dominated). Greedy on each layer's lower convex hull of
   (cost, drop) points by gain per parameter (the LP relaxation of this multiple-choice knapsack); a
   segment that no longer fits is replaced by the hull of that layer's options that still fit the room
   left, so a blocked jump (e.g. to dense) gives way to its own single triplets before other layers'
   lesser gains; then an exact fill one option step at a time by gain per cost until no layer's next step
   fits (a guarantee; the greedy normally leaves nothing for it). Slack: ``target - count`` is below the
   cheapest next step of any
   layer not at full width (one triplet, ``rows + cols`` parameters, or the jump to dense). Every count
   is :mod:`softlm_jax.budget`'s.
4. :func:`alpha_for_ranks`: SoftLM's initial thresholds, each layer's ``alpha`` between its ``r``-th and
   ``(r+1)``-th largest value (the tree's normalised units), so training starts at the allocation;
   :func:`logits_for_ranks`: LLRC's mask logits at the allocation (:func:`selection_for_ranks` picks
   by rule; the ``R-alloc`` methods then learn at the budget, :func:`softlm_jax.optim.budget_hold`);
   :func:`allocated_static`: the static-like method, the exported hard truncation at the allocated ranks.

For comparison, :func:`svdllm_v2_ranks`: SVD-LLM V2's heuristic (Wang et al., NAACL 2025, arXiv
2503.12340; our reading of the idea, not their code): within each matrix type (``q_proj`` of every
block, ...), a per-layer compression ratio that is lower where the truncation loss at the uniform ratio
is higher (ratio proportional to ``1 / log(loss)``), normalised so the budget is met, then the same exact
fill. Uniform: :func:`softlm_jax.static_ranks`.

Example::

  factors = svd.decompose(dense, cfg, grams)
  cparams = compress_params(dense, cfg, factors=factors)
  def loss_fn(p, ids):  # run under softlm_jax.intercept(cfg) by triplet_stats
    return tasks.lm_loss(model(ids, params=p).logits, ids)
  stats = triplet_stats(cparams, cfg, loss_fn, calibration_batches)
  ranks = allocate_ranks(cparams, cfg, drop_losses(stats))
  init = alpha_for_ranks(cparams, ranks)               # SoftLM from the allocation
  compact = allocated_static(dense, cfg, factors, ranks)  # or the static-like method, exported
"""
from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from softlm_jax import budget, shard, tree
from softlm_jax.compress import compress_params
from softlm_jax.config import CompressionConfig
from softlm_jax.export import static_svd
from softlm_jax.intercept import intercept

#: Prefix scores of :func:`drop_losses` (module docstring); the first is the default.
SCORES = ("fisher", "block_fisher", "first_order", "first_order_block")

#: ``tanh(x) == 1`` exactly in float32 (and bfloat16) from ``x >= 10``; :func:`full_rank` keeps
#: ``sharpness * (s - alpha) >= FULL_MARGIN`` for every ``s >= 0``.
FULL_MARGIN = 20.0


def _softlm_layers(params: Mapping, what: str) -> list[tuple[str, Mapping]]:
  layers = [(p, lay) for p, lay in tree.factored_layers(params) if "s" in lay]
  if not layers:
    raise ValueError(f"{what} needs a training-form tree (compress_params output: left, s, right, alpha); "
                     "found no factored layer with singular values")
  for p, lay in layers:
    if "alpha" not in lay:
      raise ValueError(f"layer '{p}': {what} needs SoftLM thresholds ('alpha'), found keys {sorted(lay)}: "
                       "compress with CompressionConfig(method='softlm')")
  return layers


def full_rank(cparams: Mapping, cfg: CompressionConfig) -> dict:
  """Every layer's ``alpha`` set far below every singular value, so ``Th(s) = s`` exactly (the model is
  the full-rank, dense-equivalent one) and ``dTh/ds = 1``.

  ``alpha = min(0, min s) - FULL_MARGIN / cfg.sharpness``: ``tanh(sharpness * (s - alpha))`` is 1 in
  float32. Pure: returns a new tree, only ``alpha`` changes.
  """
  layers = dict(_softlm_layers(cparams, "full_rank"))

  def visit(path, node):
    if path not in layers:
      return node
    low = min(0.0, float(np.min(np.asarray(node["s"], np.float32))))
    return {**node, "alpha": jnp.asarray(low - FULL_MARGIN / cfg.sharpness, jnp.asarray(node["alpha"]).dtype)}
  return tree.map_modules(cparams, visit)


def singular_values(cparams: Mapping) -> dict[str, jax.Array]:
  """``{path: s (k,)}`` of every SoftLM training-form layer."""
  return {p: lay["s"] for p, lay in _softlm_layers(cparams, "singular_values")}


def with_singular_values(cparams: Mapping, svals: Mapping[str, jax.Array]) -> dict:
  """``cparams`` with each layer's ``s`` replaced by ``svals[path]`` (same shapes; traceable)."""
  def visit(path, node):
    return {**node, "s": svals[path]} if path in svals else node
  return tree.map_modules(cparams, visit)


def singular_value_grad(loss_fn: Callable[[Any, Any], jax.Array], cfg: CompressionConfig,
                        mesh: Optional[jax.sharding.Mesh] = None, per_example: bool = False) -> Callable:
  """``step(svals, cparams, batch) -> (loss, {path: dloss/ds (k,)})``, jitted.

  ``loss_fn(params, batch) -> scalar`` runs under :func:`softlm_jax.intercept` ``(cfg)``; only the
  singular values are differentiated (no weight gradient is formed). With ``per_example`` the loss is
  taken on each example of the batch alone (``jax.vmap`` over the leading axis of every batch leaf,
  each example a batch of one) and the step returns ``(loss (B,), {path: (B, k)})``: the same
  backward pass, the sum over the batch left out. With ``mesh`` the loss and the gradients come back
  replicated on it (the batch's rows split along ``data``: XLA sums across it).
  """
  def loss_of(svals, cparams, batch):
    with intercept(cfg):
      return loss_fn(with_singular_values(cparams, svals), batch)
  step = jax.value_and_grad(loss_of)
  if per_example:
    batched = step

    def one(svals, cparams, example):
      return batched(svals, cparams, jax.tree.map(lambda x: x[None], example))
    step = jax.vmap(one, in_axes=(None, None, 0))
  return shard.jit_replicated(step, mesh)


#: what one sample of the Fisher statistics is: a batch's mean gradient or one example's
SCORE_UNITS = ("batch", "example")


def triplet_stats(cparams: Mapping, cfg: CompressionConfig, loss_fn: Callable[[Any, Any], jax.Array],
                  batches: Iterable, *, progress: bool = True, total: Optional[int] = None,
                  mesh: Optional[jax.sharding.Mesh] = None, unit: str = "batch") -> dict:
  """One pass of gradients with respect to every singular value, over calibration ``batches``.

  Args:
    cparams: a SoftLM training-form tree (:func:`softlm_jax.compress_params`); its thresholds are
      replaced by :func:`full_rank` (the gradients are taken at the full-rank model).
    cfg: the config it was compressed with (the threshold's sharpness; counting later).
    loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. mean next-token cross-entropy; run under
      :func:`softlm_jax.intercept`.
    batches: iterable of batches, streamed (one in memory at a time); equal shapes compile once.
    progress: a tqdm bar.
    total: number of batches for the bar when ``batches`` has no ``len``.
    mesh: a ``("data", "fsdp")`` mesh (it may span several processes): the full-rank tree is placed
      on it as training places parameters (:func:`softlm_jax.shard.shard_tree`), each batch is split
      along ``data`` (every process passes the same global batches) and the per-batch gradients are
      summed across it by XLA. The per-triplet statistics (a few numbers per singular value) run on
      the host.
    unit: one of :data:`SCORE_UNITS`: a sample ``b`` below is a batch (its mean gradient) or one
      example (``loss_fn`` on that example alone, :func:`singular_value_grad` ``per_example``; the
      same floating-point work). At a trained model the per-sample gradients are mostly noise about
      a small mean, so ``E_b[d_b^2]`` is about ``1 / B`` of the per-example value for batches of
      ``B``, from ``B`` times fewer samples.

  Returns:
    ``{"layers": {path: {"s": (k,), "grad": (k,) mean of g_b, "fisher": (k,) mean of (g_b s)^2,
    "tail_fisher": (k+1,) mean of (sum_{i>=r} g_{b,i} s_i)^2, "tail_first": (k+1,)
    sum_{i>=r} mean(g_b) s}}, "batches": int (samples), "loss": mean loss}``, float64 numpy arrays.

  Raises:
    ValueError: no batches; an unknown ``unit``; a non-finite loss or gradient (naming the batch and
      the layer).
  """
  if unit not in SCORE_UNITS:
    raise ValueError(f"unknown score unit {unit!r}; expected one of {SCORE_UNITS}")
  full = full_rank(cparams, cfg)
  svals = singular_values(full)
  s64 = {p: np.asarray(v, np.float64) for p, v in svals.items()}
  if mesh is not None:  # host values are replicated inputs (the same on every process)
    full, svals = shard.shard_tree(full, mesh), {p: np.asarray(v) for p, v in svals.items()}
  step = singular_value_grad(loss_fn, cfg, mesh, per_example=unit == "example")
  acc = {p: {"grad": np.zeros_like(s), "fisher": np.zeros_like(s), "tail_fisher": np.zeros(s.size + 1)}
         for p, s in s64.items()}
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  bar = None
  if progress:
    bar = tqdm(total=total, desc="triplet scores", dynamic_ncols=True, mininterval=2.0)
  n, loss_sum = 0, 0.0
  for i, batch in enumerate(batches):
    loss, grads = step(svals, full, batch if mesh is None else shard.shard_batch(batch, mesh))
    loss = np.atleast_1d(np.asarray(loss, np.float64))  # (samples,)
    if not np.all(np.isfinite(loss)):
      raise ValueError(f"calibration batch {i}: the loss is {loss.tolist()} at the full-rank model")
    for p, g in grads.items():
      g = np.asarray(g, np.float64).reshape(loss.size, -1)  # (samples, k)
      if not np.all(np.isfinite(g)):
        raise ValueError(f"layer '{p}': non-finite gradient of the loss w.r.t. s (shape {g.shape}) on "
                         f"calibration batch {i}")
      d = g * s64[p]
      tail = _tail_sum(d)
      a = acc[p]
      a["grad"] += g.sum(0)
      a["fisher"] += (d * d).sum(0)
      a["tail_fisher"] += (tail * tail).sum(0)
    loss_sum += float(loss.sum())
    n += loss.size
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss_sum / n:.4f}")
  if bar is not None:
    bar.close()
  if n == 0:
    raise ValueError("triplet_stats got no calibration batches")
  layers = {}
  for p, a in acc.items():
    grad = a["grad"] / n
    first = grad * s64[p]
    layers[p] = {"s": s64[p], "grad": grad, "fisher": a["fisher"] / n, "tail_fisher": a["tail_fisher"] / n,
                 "tail_first": _tail_sum(first)}
  return {"layers": layers, "batches": n, "loss": loss_sum / n}


def _tail_sum(x: np.ndarray) -> np.ndarray:
  """``out[..., r] = sum_{i >= r} x[..., i]`` along the last axis, ``(..., k) -> (..., k+1)``."""
  x = np.asarray(x)
  return np.concatenate([np.cumsum(x[..., ::-1], axis=-1)[..., ::-1], np.zeros(x.shape[:-1] + (1,), x.dtype)],
                        axis=-1)


def drop_losses(stats: Mapping, score: str = "fisher") -> dict[str, np.ndarray]:
  """Estimated loss increase of keeping each prefix: ``{path: (k+1,)}``, entry ``r`` for rank ``r``.

  ``score`` is one of :data:`SCORES` (module docstring). Made monotone (entry ``r`` is the largest
  estimate over ranks ``>= r``: keeping more never costs loss) and 0 at ``r = k``, float64.
  """
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
  out = {}
  for p, st in stats["layers"].items():
    if score == "fisher":
      d = 0.5 * _tail_sum(st["fisher"])
    elif score == "block_fisher":
      d = 0.5 * np.asarray(st["tail_fisher"], np.float64)
    elif score == "first_order":
      d = _tail_sum(np.abs(st["grad"] * st["s"]))
    else:
      d = np.abs(np.asarray(st["tail_first"], np.float64))
    out[p] = _monotone(d)
  return out


def _monotone(d: np.ndarray) -> np.ndarray:
  """Non-increasing in ``r`` (running max from the full end) and 0 at the end."""
  d = np.maximum.accumulate(np.asarray(d, np.float64)[::-1])[::-1].copy()
  return np.maximum(d - d[-1], 0.0)


# ---------------------------------------------------------------------------------------------------------
# the budget fill


def _options(rows: int, cols: int, k: int, min_rank: int) -> tuple[np.ndarray, np.ndarray]:
  """A layer's undominated ranks (ascending) and their :func:`softlm_jax.budget.layer_cost`."""
  be = budget.break_even_rank(rows, cols)
  lo = min(min_rank, k)
  ranks = [r for r in range(lo, k + 1) if r < be]
  if k >= be or not ranks:
    ranks.append(k)
  ranks = np.asarray(ranks, np.int64)
  costs = np.asarray(budget.layer_cost(ranks, rows, cols), np.int64)
  return ranks, costs


def _lower_hull(costs: np.ndarray, drops: np.ndarray) -> list[int]:
  """Indices of the lower convex hull of ``(costs, drops)`` (costs ascending), first to last point."""
  hull: list[int] = []
  for j in range(len(costs)):
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      # b is above the chord a -> j (or on it): drop it
      if (drops[b] - drops[a]) * (costs[j] - costs[a]) >= (drops[j] - drops[a]) * (costs[b] - costs[a]):
        hull.pop()
      else:
        break
    hull.append(j)
  return hull


def fill_budget(shapes: Mapping[str, tuple[int, int, int]], drops: Mapping[str, np.ndarray], target: int, *,
                min_rank: int = 1, start: Optional[Mapping[str, int]] = None) -> dict[str, int]:
  """The exact budget fill of :func:`allocate_ranks` on plain shapes (module docstring, step 3).

  Args:
    shapes: ``{path: (rows, cols, k)}``: kernel shape and the number of triplets the layer holds.
    drops: ``{path: (k+1,)}`` estimated loss of keeping each prefix rank (non-increasing).
    target: the parameter budget (count of :func:`softlm_jax.budget.layer_cost` summed).
    min_rank: the smallest rank a layer may get (0 allows removing a layer's kernel).
    start: optional ``{path: rank}`` to start from (options at or above it only); default ``min_rank``.

  Returns:
    ``{path: rank}`` with ``sum layer_cost <= target`` and no layer's next option fitting the rest.

  Raises:
    ValueError: the starting ranks already exceed the target (naming the count and the target), or a
      ``drops`` entry of the wrong length (naming the layer).
  """
  paths = list(shapes)
  opts, dvals, cur = {}, {}, {}
  total = 0
  for p in paths:
    rows, cols, k = shapes[p]
    d = np.asarray(drops[p], np.float64)
    if d.shape != (k + 1,):
      raise ValueError(f"layer '{p}': drop losses have shape {d.shape}, expected ({k + 1},) for its {k} triplets")
    ranks, costs = _options(rows, cols, k, min_rank)
    j0 = 0
    if start is not None:
      j0 = int(np.searchsorted(ranks, int(start[p]), side="left"))
      if j0 >= len(ranks) or ranks[j0] != int(start[p]):
        raise ValueError(f"layer '{p}': start rank {start[p]} is not one of its options (min_rank..break-even-1 "
                         f"or {k}); options {ranks[:3].tolist()}...{ranks[-2:].tolist()}")
    opts[p] = (ranks, costs)
    dvals[p] = d[ranks]
    cur[p] = j0
    total += int(costs[j0])
  if total > target:
    raise ValueError(f"the smallest allowed ranks (min_rank={min_rank}) already count {total} parameters, over "
                     f"the target {target}: lower min_rank or the compression ratio")
  # 1) greedy over each layer's lower convex hull, best gain per parameter first
  heap: list = []
  hulls = {}

  def push(i, p):
    h, pos = hulls[p]
    if pos + 1 < len(h):
      a, b = h[pos], h[pos + 1]
      costs = opts[p][1]
      dc = int(costs[b] - costs[a])
      gain = float(dvals[p][a] - dvals[p][b])
      heapq.heappush(heap, (-gain / dc, -gain, i, p, a, b, dc))

  for i, p in enumerate(paths):
    ranks, costs = opts[p]
    j0 = cur[p]
    h = [j0 + j for j in _lower_hull(costs[j0:], dvals[p][j0:])]
    hulls[p] = (h, 0)
    push(i, p)
  while heap:
    _, _, i, p, a, b, dc = heapq.heappop(heap)
    if cur[p] != a:  # stale
      continue
    if total + dc <= target:
      total += dc
      cur[p] = b
      h, pos = hulls[p]
      hulls[p] = (h, pos + 1)
      push(i, p)
    else:  # blocked: the hull of this layer's options that still fit the room, from where it stands
      costs = opts[p][1]
      last = a + int(np.searchsorted(costs[a:], costs[a] + (target - total), side="right"))
      if last - a >= 2:
        hulls[p] = ([a + j for j in _lower_hull(costs[a:last], dvals[p][a:last])], 0)
        push(i, p)
  # 2) exact fill, one option step at a time, best gain per parameter among the steps that fit
  while True:
    best = None
    room = target - total
    for i, p in enumerate(paths):
      ranks, costs = opts[p]
      j = cur[p]
      if j + 1 >= len(ranks):
        continue
      dc = int(costs[j + 1] - costs[j])
      if dc > room:
        continue
      gain = float(dvals[p][j] - dvals[p][j + 1])
      key = (gain / dc, gain, -i)
      if best is None or key > best[0]:
        best = (key, p, dc)
    if best is None:
      break
    _, p, dc = best
    cur[p] += 1
    total += dc
  return {p: int(opts[p][0][cur[p]]) for p in paths}


def layer_shapes(cparams: Mapping) -> dict[str, tuple[int, int, int]]:
  """``{path: (rows, cols, k)}`` of every factored layer (``k``: the triplets it holds)."""
  return {p: (*budget.layer_shape(lay), int(np.shape(lay["left"])[1])) for p, lay in tree.factored_layers(cparams)}


def allocate_ranks(cparams: Mapping, cfg: CompressionConfig, drops: Mapping[str, np.ndarray], *,
                   min_rank: int = 1) -> dict[str, int]:
  """``{path: rank}`` minimising the summed ``drops`` within :func:`softlm_jax.budget.target_params`.

  ``drops``: :func:`drop_losses` (``{path: (k+1,)}``) for every factored layer of ``cparams``. See the
  module docstring (step 3) for the algorithm and the slack. ``min_rank``: no layer below it (default
  1: every layer keeps its strongest triplet; 0 allows removing a kernel).
  """
  shapes = layer_shapes(cparams)
  missing = [p for p in shapes if p not in drops]
  if missing:
    raise ValueError(f"{len(missing)} factored layers have no drop losses, e.g. {missing[:3]}: score every "
                     "layer of the tree (triplet_stats on the same cparams)")
  if int(min_rank) != min_rank or min_rank < 0:
    raise ValueError(f"min_rank must be an int >= 0, got {min_rank!r}")
  return fill_budget(shapes, drops, budget.target_params(cparams, cfg), min_rank=int(min_rank))


def next_step_costs(shapes: Mapping[str, tuple[int, int, int]], ranks: Mapping[str, int], *,
                    min_rank: int = 1) -> dict[str, int]:
  """Parameters each layer's next option would add (``{path: cost}``; layers at full width left out):
  the allocation is maximal when every one exceeds ``target - count``."""
  out = {}
  for p, (rows, cols, k) in shapes.items():
    opts, costs = _options(rows, cols, k, min_rank)
    j = int(np.searchsorted(opts, ranks[p]))
    if j + 1 < len(opts):
      out[p] = int(costs[j + 1] - costs[j])
  return out


# ---------------------------------------------------------------------------------------------------------
# using an allocation


def _check_rank_layers(ranks: Mapping[str, int], layers, rule: str) -> None:
  """Refuses ``ranks`` naming a layer that is not one of ``layers`` (the tree's training-form layers of ``rule``)."""
  unknown = [p for p in ranks if p not in layers]
  if unknown:
    raise ValueError(f"ranks name {len(unknown)} layers that are not {rule} training-form layers of the tree, "
                     f"e.g. {unknown[:3]}")


def _rank_of(path: str, ranks: Mapping[str, int], k: int) -> tuple[int, int]:
  """``(r, k)``: layer ``path``'s rank from ``ranks``, refused outside ``[0, k]`` (naming the layer)."""
  r = int(ranks[path])
  if not 0 <= r <= k:
    raise ValueError(f"layer '{path}': rank {r} outside [0, {k}] (it holds {k} triplets)")
  return r, k


def alpha_for_ranks(cparams: Mapping, ranks: Mapping[str, int], *, where: float = 0.5) -> dict:
  """SoftLM thresholds that keep exactly ``ranks[path]`` triplets in each layer: ``budget.kept`` counts
  ``r``, the ``r`` largest values (a prefix of a descending spectrum).

  ``alpha = v[r] + where * (v[r-1] - v[r])`` with ``v`` the layer's values sorted descending (in the
  tree's normalised units), ``where`` in ``[0, 1)`` (0: at the first dropped value, the convention of
  ``normalize="uniform_rank"``, where ``alpha = 1`` is the uniform allocation; 0.5: midway). ``r = k``
  uses ``v[k] = min(0, v[k-1] - 1)``, ``r = 0`` puts alpha at ``v[0]``. Layers not in ``ranks`` keep
  their alpha. Pure: returns a new tree.

  Raises:
    ValueError: naming the layer, for a rank outside ``[0, k]`` or tied values at the cut (no threshold
      separates them).
  """
  if not 0.0 <= where < 1.0:
    raise ValueError(f"where must be in [0, 1), got {where!r}")
  _check_rank_layers(ranks, dict(_softlm_layers(cparams, "alpha_for_ranks")), "SoftLM")

  def visit(path, node):
    if path not in ranks:
      return node
    s = np.asarray(node["s"], np.float32)
    r, k = _rank_of(path, ranks, s.size)
    v = np.sort(s)[::-1]
    if r == 0:
      alpha = np.float32(v[0])
    else:
      lo = v[r] if r < k else np.float32(min(0.0, float(v[k - 1]) - 1.0))
      alpha = np.float32(lo + np.float32(where) * (v[r - 1] - lo))
      if not alpha < v[r - 1]:  # rounding reached the kept value
        alpha = np.float32(lo)
    new = {**node, "alpha": jnp.asarray(alpha, jnp.asarray(node["alpha"]).dtype)}
    got = int(np.sum(np.asarray(budget.kept(new))))
    if got != r:
      raise ValueError(f"layer '{path}': no threshold keeps exactly {r} of its {k} values (tied values "
                       f"{float(v[r - 1])} and {float(v[min(r, k - 1)])} at the cut; got {got})")
    return new
  return tree.map_modules(cparams, visit)


def logits_for_ranks(cparams: Mapping, ranks: Mapping[str, int], *, spacing: float) -> dict:
  """LLRC mask logits that keep exactly ``ranks[path]`` triplets in each layer, the ``r`` largest values:
  ``logit = spacing * (r - j - 0.5)`` for the value ``j``-th largest (0-based), so the kept ones are
  positive, the dropped ones negative, the cut midway between two logits, and every layer's cut moves by
  one triplet per ``spacing`` of a shared shift (:func:`softlm_jax.budget.fill_shift`). Layers not in
  ``ranks`` keep their logits. Pure: returns a new tree.

  Raises:
    ValueError: naming the layer, for a rank outside ``[0, k]``; for ``spacing <= 0``.
  """
  if not spacing > 0:
    raise ValueError(f"spacing must be > 0, got {spacing!r}")
  _check_rank_layers(ranks, {p for p, lay in tree.factored_layers(cparams) if "mask_logits" in lay}, "LLRC")

  def visit(path, node):
    if path not in ranks:
      return node
    r, k = _rank_of(path, ranks, int(np.shape(node["s"])[0]))
    order = np.argsort(-np.asarray(node["s"], np.float32), kind="stable")
    logits = np.empty(k, np.float32)
    logits[order] = spacing * (r - np.arange(k) - 0.5)
    return {**node, "mask_logits": jnp.asarray(logits, jnp.asarray(node["mask_logits"]).dtype)}
  return tree.map_modules(cparams, visit)


def selection_for_ranks(cparams: Mapping, ranks: Mapping[str, int], *, spacing: float) -> dict:
  """A training-form tree's selection set to keep ``ranks`` (the largest values of each layer), whatever
  its rule: SoftLM's thresholds (:func:`alpha_for_ranks`, midway) or LLRC's logits
  (:func:`logits_for_ranks` with ``spacing``)."""
  kinds = {("alpha" in lay, "mask_logits" in lay) for _, lay in tree.factored_layers(cparams)}
  if kinds == {(True, False)}:
    return alpha_for_ranks(cparams, ranks)
  if kinds == {(False, True)}:
    return logits_for_ranks(cparams, ranks, spacing=spacing)
  raise ValueError("selection_for_ranks needs a training-form tree of one rule (SoftLM alpha or LLRC mask_logits "
                   "in every factored layer)")


def allocated_static(dense: Mapping, cfg: CompressionConfig, factors: Mapping[str, tuple],
                     ranks: Mapping[str, int], **export_kw) -> dict:
  """The static-like method: the exported hard truncation of every selected layer at ``ranks``.

  The same function as ``export_params(alpha_for_ranks(compress_params(dense, cfg, factors=factors),
  ranks), cfg)`` with a hard threshold (SoftLM's ``Th`` at a finite sharpness also shrinks the kept
  values nearest ``alpha``; static truncation keeps them whole), built by
  :func:`softlm_jax.static_svd` (one source for truncation and export). ``export_kw``:
  ``rank_multiple`` / ``rank_rounding``.
  """
  missing = [p for p, _ in tree.selected_kernels(dense, cfg) if p not in ranks]
  if missing:
    raise ValueError(f"{len(missing)} selected layers have no rank, e.g. {missing[:3]}")
  return static_svd(dense, cfg, dict(ranks), factors=factors, **export_kw)


def allocated_softlm(dense: Mapping, cfg: CompressionConfig, factors: Mapping[str, tuple],
                     ranks: Mapping[str, int], *, where: float = 0.5) -> dict:
  """SoftLM's training-form tree with its thresholds at the allocation:
  ``alpha_for_ranks(compress_params(dense, cfg, factors=factors), ranks)``."""
  return alpha_for_ranks(compress_params(dense, cfg, factors=factors), ranks, where=where)


# ---------------------------------------------------------------------------------------------------------
# SVD-LLM V2's heuristic


def matrix_type(path: str) -> str:
  """The path with its numeric components removed: ``model/layers/3/self_attn/q_proj`` ->
  ``model/layers/self_attn/q_proj`` (one key per matrix type across blocks)."""
  return "/".join(c for c in path.split("/") if not re.fullmatch(r"\d+", c))


def _skeleton(shapes: Mapping[str, tuple[int, int, int]]) -> dict:
  """A tree of empty exported-form layers with these kernel shapes (for :mod:`softlm_jax.budget`)."""
  root: dict = {}
  for p, (rows, cols, _) in shapes.items():
    node = root
    for c in p.split("/"):
      node = node.setdefault(c, {})
    node["left"] = np.zeros((rows, 0), np.float32)
    node["right"] = np.zeros((0, cols), np.float32)
  return root


def svdllm_v2_ranks(factors: Mapping[str, tuple], cfg: CompressionConfig, *, min_rank: int = 1) -> dict[str, int]:
  """SVD-LLM V2's heterogeneous allocation (module docstring), exact to the budget.

  Per layer, the truncation loss at the uniform ratio ``L = sum_{j >= r_u} s_j^2`` (the raw spectrum of
  ``factors``: whitened, the calibration output energy dropped; plain SVD, the Frobenius error), with
  ``r_u = budget.uniform_rank``. Within each :func:`matrix_type`, layer ``i``'s compression ratio is
  ``R_i = lam * R * w_i / mean_type(w)`` with ``w_i = 1 / log(L_i)`` (``L`` divided by the type's
  smallest and multiplied by ``e`` first where some ``L_i <= 1``), clipped to ``[0, 1)``; ``lam`` (one for
  the model, 1 when no layer clips) is the smallest by bisection whose floored ranks
  (``budget.uniform_rank(rows, cols, R_i)``) fit :func:`softlm_jax.budget.target_params`. The rest of
  the budget is filled as :func:`fill_budget` does, by truncation loss per parameter.

  Args:
    factors: :func:`softlm_jax.svd.decompose` output ``{path: (left, s, right, dtype)}``.
    cfg: gives the compression ratio ``R``.
    min_rank: no layer below it.

  Returns:
    ``{path: rank}``.
  """
  shapes = {p: (int(u.shape[0]), int(vt.shape[1]), int(np.size(s))) for p, (u, s, vt, _) in factors.items()}
  target = budget.target_params(_skeleton(shapes), cfg)
  R = cfg.target_ratio
  losses, energy = {}, {}
  for p, (_, s, _, _) in factors.items():
    rows, cols, k = shapes[p]
    e2 = np.square(np.asarray(s, np.float64))
    energy[p] = _tail_sum(e2)
    losses[p] = float(energy[p][min(budget.uniform_rank(rows, cols, R), k)])
  weights = {}
  groups: dict[str, list[str]] = {}
  for p in factors:
    groups.setdefault(matrix_type(p), []).append(p)
  for g, members in groups.items():
    L = np.asarray([losses[p] for p in members])
    if np.any(L <= 1.0):
      pos = L[L > 0]
      L = np.e * np.maximum(L, pos.min() if pos.size else 1.0) / (pos.min() if pos.size else 1.0)
      L = np.maximum(L, np.e)
    w = 1.0 / np.log(L)
    for p, wi in zip(members, w / w.mean()):
      weights[p] = float(wi)

  def ranks_at(lam):
    out = {}
    for p, (rows, cols, k) in shapes.items():
      ratio = float(np.clip(lam * R * weights[p], 0.0, 1.0 - 1e-9))
      be = budget.break_even_rank(rows, cols)
      r = max(min(budget.uniform_rank(rows, cols, ratio), k, max(be - 1, 0)), min(min_rank, k))
      out[p] = r if r < be else k  # at or above break-even only the full width is an option
    return out

  def count(ranks):
    return sum(int(budget.layer_cost(ranks[p], rows, cols)) for p, (rows, cols, _) in shapes.items())

  lo, hi = 0.0, 1.0
  while count(ranks_at(hi)) > target:
    lo, hi = hi, hi * 2.0
    if hi > 1e6:
      raise ValueError(f"min_rank={min_rank} ranks alone exceed the target {target}")
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if count(ranks_at(mid)) <= target:
      hi = mid
    else:
      lo = mid
  start = ranks_at(hi)
  return fill_budget(shapes, energy, target, min_rank=min_rank, start=start)
