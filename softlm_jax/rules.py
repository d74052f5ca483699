"""Selection rules: what a factored layer learns about its singular values, in one registry.

Every rule shares the decomposition (:mod:`softlm_jax.svd`), interception, counting and export. A rule
is a :class:`Rule`: the parameter keys it adds to a factored layer (SoftLM ``("alpha",)``, LLRC
``("mask_logits",)``), their initial values, the forward scale of the singular values, which triplets
survive export, a differentiable count (optional), its compression loss, its optimizer partition, and
how its leaves are sharded and held by the budget freeze. Budget, export, optim, shard, losses,
compress and intercept ask this registry (:func:`rule_of` a layer, :func:`get` a
``CompressionConfig.method``) and never name a rule or its keys.

Adding a rule: build a :class:`Rule` and :func:`register` it (a test file can do this alone; see
``tests/test_rules.py``). The contract the rest of the library relies on: ``scale(layer, cfg)`` is zero
wherever ``kept(layer)`` is False (export merges ``scale`` into the kept columns only, so the exported
model equals the training form), and ``kept`` depends only on the layer's leaves.

Built in: ``softlm`` (a learned threshold per layer, weights fine-tuned; arXiv 2411.10543) and
``llrc`` (a learned mask per singular value, weights frozen; Sundrani, Tudisco, Minervini).

Modules that this one calls at run time (budget, losses) import it at their top, so it imports them
inside the functions that need them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softlm_jax import tree
from softlm_jax.config import CompressionConfig
from softlm_jax.registry import Registry
from softlm_jax.threshold import relaxed_mask, soft_threshold, straight_through_mask


@dataclasses.dataclass(frozen=True)
class Rule:
  """One selection rule.

  Attributes:
    name: the ``CompressionConfig.method`` that selects it.
    keys: the parameter names it adds to a factored layer (beside ``left``, ``s``, ``right``); a layer
      holding them is in this rule's training form (:func:`rule_of`). Distinct across rules.
    init: ``init(k, cfg) -> {key: array}``, the initial values for a layer with ``k`` triplets.
    scale: ``scale(layer, cfg) -> (k,)``, the vector that multiplies the factor columns in the forward
      pass (export merges it into ``left``); zero wherever ``kept`` is False.
    kept: ``kept(layer) -> bool (k,)``, the triplets that survive export (counting and export use it).
    loss: ``loss(params, cfg, step) -> scalar``, the rule's compression loss over the whole tree,
      already weighted (``step``: the update index or None).
    optimizer: ``optimizer(cfg) -> optax.GradientTransformation``, the default transform of the
      rule's leaves (``make_optimizer(alpha_tx=...)`` overrides it).
    trains_weights: whether the factors and every other weight train with the rule (SoftLM) or stay
      frozen (LLRC: fine-tune after export instead). :func:`softlm_jax.make_optimizer` requires resp.
      refuses a ``weights_tx``.
    per_value: the keys of shape ``(k,)`` (one entry per singular value). Once the budget is met the
      freeze zeroes their updates at the pruned entries only (a pruned value stays pruned, a kept one
      may still be dropped); every other key's update is zeroed whole.
    relaxed_rank: optional ``relaxed_rank(layer, cfg) -> float32 scalar``, a differentiable stand-in
      for ``sum(kept(layer))`` (:func:`softlm_jax.budget.relaxed_count`).
    replicated: keys never split under FSDP sharding (default: all of ``keys``).
    label: the name of the rule's optimizer partition (default ``name``).
    refill: optional ``refill(params, cfg) -> params`` run after the freeze to take back an overshoot
      of the budget (LLRC: :func:`refill_to_target`); None when the rule has none.
  """

  name: str
  keys: tuple
  init: Callable
  scale: Callable
  kept: Callable
  loss: Callable
  optimizer: Callable
  trains_weights: bool = True
  per_value: tuple = ()
  relaxed_rank: Optional[Callable] = None
  replicated: Optional[tuple] = None
  label: Optional[str] = None
  refill: Optional[Callable] = None

  def __post_init__(self):
    object.__setattr__(self, "keys", tuple(self.keys))
    object.__setattr__(self, "per_value", tuple(self.per_value))
    object.__setattr__(self, "replicated", tuple(self.keys if self.replicated is None else self.replicated))
    object.__setattr__(self, "label", self.label or self.name)
    if not (isinstance(self.name, str) and self.name):
      raise ValueError(f"a rule needs a non-empty name, got {self.name!r}")
    if not self.keys or not all(isinstance(k, str) and k for k in self.keys):
      raise ValueError(f"rule {self.name!r}: keys must be a non-empty tuple of names, got {self.keys!r}")
    reserved = set(tree.FACTOR_KEYS) | {"kernel", "bias"}
    if reserved & set(self.keys):
      raise ValueError(f"rule {self.name!r}: keys {sorted(reserved & set(self.keys))} are factor or module "
                       f"names ({sorted(reserved)}); pick other names")
    for field in ("per_value", "replicated"):
      extra = set(getattr(self, field)) - set(self.keys)
      if extra:
        raise ValueError(f"rule {self.name!r}: {field} names {sorted(extra)}, which are not among its keys "
                         f"{self.keys}")


_RULES = Registry("method", Rule)
#: The optimizer partition of every leaf that is no rule's (factors, biases, embeddings ...).
WEIGHTS_LABEL = "weights"


def register(rule: Rule, *, replace: bool = False) -> Rule:
  """Adds ``rule`` to the registry (``CompressionConfig(method=rule.name)`` then validates) and returns it.

  Raises:
    ValueError: when the name is taken (unless ``replace``), or its keys or label are another rule's.
  """
  if isinstance(rule, Rule):  # (anything else: the registry's TypeError)
    if rule.label == WEIGHTS_LABEL:
      raise ValueError(f"rule {rule.name!r}: optimizer label {WEIGHTS_LABEL!r} is the weights' partition")
    for other in all_rules():
      if other.name == rule.name:
        continue
      if set(other.keys) & set(rule.keys):
        raise ValueError(f"rule {rule.name!r}: keys {sorted(set(other.keys) & set(rule.keys))} belong to rule "
                         f"{other.name!r} already (a layer's keys must say its rule)")
      if other.label == rule.label:
        raise ValueError(f"rule {rule.name!r}: optimizer label {rule.label!r} is rule {other.name!r}'s")
  return _RULES.add(rule, replace=replace)


def unregister(name: str) -> None:
  """Removes a rule (tests that register a toy rule clean up with it)."""
  _RULES.remove(name)


def get(name: str) -> Rule:
  """The rule registered as ``name``. Raises ValueError (``unknown method ...``) listing the names."""
  return _RULES.get(name)


def names() -> tuple:
  """The registered rules' names, in registration order."""
  return _RULES.names()


def all_rules() -> tuple:
  """The registered :class:`Rule` s, in registration order."""
  return _RULES.values()


def selection_keys() -> tuple:
  """Every registered rule's keys (the leaves that are a selection, not weights)."""
  return tuple(k for r in all_rules() for k in r.keys)


def replicated_keys() -> tuple:
  """The leaf names never split under FSDP (:func:`softlm_jax.shard.fsdp_spec`)."""
  return tuple(k for r in all_rules() for k in r.replicated)


def rule_of(layer: Mapping) -> Optional[Rule]:
  """The rule whose keys a factored layer holds (its training form), or None (exported, dense).

  Raises:
    ValueError: naming the keys, when the layer holds keys of two rules or only some of one rule's.
  """
  found = [r for r in all_rules() if any(k in layer for k in r.keys)]
  if not found:
    return None
  if len(found) > 1:
    raise ValueError(f"layer with keys {sorted(layer)} holds the keys of several rules: "
                     f"{[r.name for r in found]}")
  rule = found[0]
  missing = [k for k in rule.keys if k not in layer]
  if missing:
    raise ValueError(f"layer with keys {sorted(layer)} holds part of rule {rule.name!r}'s keys {rule.keys} "
                     f"(missing {missing})")
  return rule


def layers_of(params: Mapping, name: str) -> list[tuple[str, Mapping]]:
  """``[(path, layer)]`` of the factored layers in rule ``name``'s training form, in tree order."""
  rule = get(name)
  return [(p, lay) for p, lay in tree.factored_layers(params) if rule_of(lay) is rule]


def singular_scale(layer: Mapping, cfg: CompressionConfig) -> jax.Array:
  """The vector that multiplies a training-form layer's ``k`` factor columns, shape ``(k,)``.

  The layer's rule's ``scale`` (:func:`rule_of`): SoftLM ``Th(s)``, LLRC ``s * mask``
  with the straight-through hard mask. Exported layers have none (it is merged into ``left``). Export
  merges exactly this vector, and its zeros are exactly the entries :func:`softlm_jax.budget.kept`
  drops.
  """
  rule = rule_of(layer)
  if rule is None:
    raise ValueError(f"layer with keys {sorted(layer)} has no selection parameters of any rule "
                     f"{names()} (already exported?)")
  return rule.scale(layer, cfg)


# --- softlm: a learned threshold per layer (arXiv 2411.10543) -------------------------------------------


def alphas(params: Mapping) -> jax.Array:
  """Stacked thresholds of every SoftLM layer, shape ``(L,)`` (``(0,)`` when there are none)."""
  found = [layer["alpha"] for _, layer in layers_of(params, "softlm")]
  return jnp.stack([jnp.asarray(a, jnp.float32) for a in found]) if found else jnp.zeros((0,))


def softlm_loss(params: Mapping, cfg: CompressionConfig, step: jax.typing.ArrayLike | None = None) -> jax.Array:
  """``gamma * L_cmp`` over all thresholds: adaptive ``sum exp(-alpha)`` (eq. 9) or linear ``-sum alpha``
  (eq. 8) by ``cfg.loss``; scalar (0 without thresholds). ``step`` is unused."""
  from softlm_jax import losses
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
    trains_weights=True, label="alpha"))


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
  from softlm_jax import budget, losses
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
  from softlm_jax import budget
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
    label="mask", refill=refill_to_target))


__all__ = ["LLRC", "Rule", "SOFTLM", "WEIGHTS_LABEL", "all_rules", "alphas", "get", "initial_mask_logits",
           "layers_of", "llrc_loss", "names", "refill_to_target", "register", "replicated_keys", "rule_of",
           "selection_keys", "softlm_loss", "unregister"]
