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

Built in (:mod:`softlm_jax.builtin_rules`, registered when the package is imported): ``softlm`` (a
learned threshold per layer, weights fine-tuned; arXiv 2411.10543) and ``llrc`` (a learned mask per
singular value, weights frozen; Sundrani, Tudisco, Minervini).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable, Optional

import jax

from softlm_jax import tree
from softlm_jax.config import CompressionConfig
from softlm_jax.registry import METHODS


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
      of the budget (LLRC: :func:`softlm_jax.refill_to_target`); None when the rule has none.
    margin: optional ``margin(layer) -> (k,)`` float, positive exactly where ``kept`` is True (LLRC:
      the logits; SoftLM: ``s - alpha``), so one shift of every layer's margins moves the cuts of all
      layers together (:func:`softlm_jax.budget.fill_shift`, the budget hold of
      :func:`softlm_jax.optim.budget_hold`).
    shift: ``(key, sign)``: lowering a layer's margins by ``tau`` adds ``sign * tau`` to its ``key``
      (LLRC ``("mask_logits", -1.0)``, SoftLM ``("alpha", 1.0)``); needed with ``margin``.
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
  margin: Optional[Callable] = None
  shift: Optional[tuple] = None

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
    if (self.margin is None) != (self.shift is None):
      raise ValueError(f"rule {self.name!r}: margin and shift go together (the budget hold needs both)")
    if self.shift is not None:
      key, sign = self.shift
      if key not in self.keys or float(sign) not in (-1.0, 1.0):
        raise ValueError(f"rule {self.name!r}: shift must be (one of its keys {self.keys}, +1 or -1), got "
                         f"{self.shift!r}")
    for field in ("per_value", "replicated"):
      extra = set(getattr(self, field)) - set(self.keys)
      if extra:
        raise ValueError(f"rule {self.name!r}: {field} names {sorted(extra)}, which are not among its keys "
                         f"{self.keys}")


_RULES = METHODS.holds(Rule)
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


__all__ = ["Rule", "WEIGHTS_LABEL", "all_rules", "get", "layers_of", "names", "register", "replicated_keys",
           "rule_of", "selection_keys", "singular_scale", "unregister"]
