"""The built-in selection rules, registered in :mod:`softlm_jax.rules` on import: ``softlm`` (a learned
threshold per layer, weights fine-tuned; arXiv 2411.10543) and ``llrc`` (a learned mask per singular
value, weights frozen; Sundrani, Tudisco, Minervini).

They sit above the registry and the counting (:mod:`softlm_jax.budget`) and losses
(:mod:`softlm_jax.losses`) they use; :mod:`softlm_jax` imports this module, so both are registered
(``softlm`` first) whenever the package is.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softlm_jax import budget, losses, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.rules import Rule, layers_of, register
from softlm_jax.threshold import relaxed_mask, soft_threshold, straight_through_mask


# --- softlm: a learned threshold per layer (arXiv 2411.10543) -------------------------------------------


def alphas(params: Mapping) -> jax.Array:
  """Stacked thresholds of every SoftLM layer, shape ``(L,)`` (``(0,)`` when there are none)."""
  found = [layer["alpha"] for _, layer in layers_of(params, "softlm")]
  return jnp.stack([jnp.asarray(a, jnp.float32) for a in found]) if found else jnp.zeros((0,))


def softlm_loss(params: Mapping, cfg: CompressionConfig, step: jax.typing.ArrayLike | None = None) -> jax.Array:
  """``gamma * L_cmp`` over all thresholds: adaptive ``sum exp(-alpha)`` (eq. 9) or linear ``-sum alpha``
  (eq. 8) by ``cfg.loss``; scalar (0 without thresholds). ``step`` is unused."""
  fn = losses.adaptive_loss if cfg.loss == "adaptive" else losses.linear_loss
  a = alphas(params)
  return cfg.gamma * fn(a) if a.size else jnp.zeros(())


SOFTLM = register(Rule(
    name="softlm", keys=("alpha",),
    init=lambda k, cfg: {"alpha": jnp.zeros((), jnp.float32)},
    scale=lambda layer, cfg: soft_threshold(layer["s"], layer["alpha"], sharpness=cfg.sharpness, floor=cfg.floor),
    kept=lambda layer: layer["s"] > layer["alpha"],  # exactly the non-zero entries of Th(s) with c = 0
    loss=softlm_loss,
    optimizer=lambda cfg: optax.adam(cfg.alpha_lr),  # the paper's AdamW without decay
    trains_weights=True, label="alpha",
    margin=lambda layer: jnp.asarray(layer["s"], jnp.float32) - jnp.asarray(layer["alpha"], jnp.float32),
    shift=("alpha", 1.0)))


# --- llrc: a learned mask per singular value, weights frozen --------------------------------------------


def initial_mask_logits(k: int, cfg: CompressionConfig) -> jax.Array:
  """LLRC's starting logits, ``(k,)`` float32: linear from ``cfg.mask_init[0]`` (largest singular
  value) to ``cfg.mask_init[1]`` (smallest); all > 0, so the hard mask starts all ones."""
  first, last = cfg.mask_init
  return jnp.asarray(np.linspace(first, last, k) if k > 1 else [first], jnp.float32)


def llrc_loss(params: Mapping, cfg: CompressionConfig, step: jax.typing.ArrayLike | None = None) -> jax.Array:
  """LLRC's regularisers (scalar): ``tv_weight * sum_l TV(mask_l) + gamma * price(step) * budget``.

  ``budget = relaxed_count / dense_params`` while the hard count (:func:`softlm_jax.count_params`)
  is above the target, else 0: it drives the count to the target and stops pressing once it is met.
  ``price`` is :func:`softlm_jax.losses.budget_price` (``cfg.budget_growth**step``, 1 by default). The
  TV term acts on the relaxed masks ``sigmoid(logits / T)``.
  """
  layers = [layer for _, layer in layers_of(params, "llrc")]
  if not layers:
    return jnp.zeros(())
  tv = sum(losses.total_variation(relaxed_mask(layer["mask_logits"], temperature=cfg.mask_temperature))
           for layer in layers)
  over = budget.count_params(params) > budget.target_params(params, cfg)
  press = budget.relaxed_count(params, cfg) / budget.dense_params(params)
  return cfg.tv_weight * tv + cfg.gamma * losses.budget_price(cfg, step) * jnp.where(over, press, 0.0)


def refill_to_target(params: Mapping, cfg: CompressionConfig, *, logit: float = 1e-3) -> dict:
  """Re-enables dropped LLRC singular values, most-nearly-kept first, while the count stays <= target.

  The budget freeze stops at the first update whose count is at or under the target, and that update
  can drop several percent of the parameters at once (Adam moves every logit by about ``mask_lr``).
  This takes back the overshoot: the dropped triplets (``mask_logits <= 0``) of all layers are
  visited in order of decreasing logit, and each is turned back on (its logit set to ``logit`` > 0)
  if the counted parameters (:func:`softlm_jax.layer_cost`, break-even rule included) stay ``<=``
  :func:`softlm_jax.target_params`. Pure: returns a new tree; only ``mask_logits`` change. Plain
  Python/numpy, outside jit (one sort over all singular values).

  Args:
    params: an LLRC training-form tree (every factored layer has ``mask_logits``).
    cfg: the config it was compressed with (gives the target).
    logit: the value a re-enabled logit gets.

  Returns:
    The tree with ``count_params(out) <= target_params`` and no dropped triplet left that would fit.
  """
  layers = dict(layers_of(params, "llrc"))
  if not layers or len(layers) != len(tree.factored_layers(params)):
    raise ValueError("refill_to_target needs an LLRC training-form tree (mask_logits in every factored layer)")
  if not logit > 0:
    raise ValueError(f"logit must be > 0 (a kept value), got {logit!r}")
  target = budget.target_params(params, cfg)
  logits = {p: np.array(lay["mask_logits"], np.float32) for p, lay in layers.items()}
  kept_of = {p: np.asarray(LLRC.kept(lay)) for p, lay in layers.items()}
  ranks = {p: int(np.sum(k)) for p, k in kept_of.items()}
  costs = {p: np.asarray(budget.layer_cost(np.arange(len(lg) + 1), *budget.layer_shape(layers[p])))
           for p, lg in logits.items()}
  total = int(sum(int(costs[p][ranks[p]]) for p in logits))
  if total > target:
    raise ValueError(f"the tree counts {total} params, over the target {target}: train until the budget is met")
  cands = [(float(logits[p][i]), p, i) for p, k in kept_of.items() for i in np.flatnonzero(~k)]
  for _, p, i in sorted(cands, key=lambda c: -c[0]):
    extra = int(costs[p][ranks[p] + 1]) - int(costs[p][ranks[p]])
    if total + extra <= target:
      total, ranks[p] = total + extra, ranks[p] + 1
      logits[p][i] = logit

  def visit(path, node):
    if path in logits:
      return {**node, "mask_logits": jnp.asarray(logits[path], jnp.asarray(node["mask_logits"]).dtype)}
    return node
  return tree.map_modules(params, visit)


LLRC = register(Rule(
    name="llrc", keys=("mask_logits",),
    init=lambda k, cfg: {"mask_logits": initial_mask_logits(k, cfg)},
    # the straight-through hard mask: exactly 0/1 forward, the relaxed mask's gradient backward
    scale=lambda layer, cfg: layer["s"] * straight_through_mask(layer["mask_logits"],
                                                                temperature=cfg.mask_temperature),
    kept=lambda layer: layer["mask_logits"] > 0,
    loss=llrc_loss,
    optimizer=lambda cfg: optax.adam(cfg.mask_lr),
    trains_weights=False, per_value=("mask_logits",),
    relaxed_rank=lambda layer, cfg: jnp.sum(
        relaxed_mask(layer["mask_logits"], temperature=cfg.mask_temperature).astype(jnp.float32)),
    label="mask", refill=refill_to_target,
    margin=lambda layer: jnp.asarray(layer["mask_logits"], jnp.float32), shift=("mask_logits", -1.0)))


__all__ = ["LLRC", "SOFTLM", "alphas", "initial_mask_logits", "llrc_loss", "refill_to_target", "softlm_loss"]
