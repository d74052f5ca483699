"""Optimizer: each selection rule's parameters in their own optax partition, and the budget freeze
(paper section 4.5).

Like jaxpruner's ``wrap_optax``, the freeze is a ``GradientTransformation`` whose state (a NamedTuple)
lives in the optimizer state, so it is jitted with the step and checkpointed with it. What a rule's
leaves are called, how they train and how the freeze holds them comes from :mod:`softlm_jax.rules`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from softlm_jax import budget, rules, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.rules import WEIGHTS_LABEL


class BudgetState(NamedTuple):
  """State of :func:`budget_freeze`.

  Attributes:
    inner: the wrapped transformation's state.
    frozen: bool scalar; True from the first update whose params count <= target, forever.
    freeze_step: int32 scalar; the update index at which it froze (-1 before).
    count: int32 scalar; counted params at the last update (see :func:`softlm_jax.count_params`).
    step: int32 scalar; updates seen.
  """
  inner: optax.OptState
  frozen: jax.Array
  freeze_step: jax.Array
  count: jax.Array
  step: jax.Array


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _path(keypath) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in keypath)


def param_labels(params) -> object:
  """Tree of optimizer partition labels: a selection rule's leaves get its ``label`` (SoftLM's
  ``alpha``: ``"alpha"``, LLRC's ``mask_logits``: ``"mask"``), every other leaf ``"weights"``."""
  label_of = {key: rule.label for rule in rules.all_rules() for key in rule.keys}

  def label(kp, _):
    return label_of.get(_path(kp)[-1], WEIGHTS_LABEL)
  return jax.tree_util.tree_map_with_path(label, params)


def ramp_target(dense: int, target: int, step: jax.typing.ArrayLike, ramp_steps: int) -> jax.Array:
  """The schedule's count at update ``step``: ``dense - (dense - target) * min(1, (step + 1) / ramp_steps)``.

  Int32 scalar, rounded to the nearest count (jit-friendly); ``ramp_steps = 0`` gives ``target`` at
  every step (no ramp).
  """
  if ramp_steps <= 0:
    return jnp.asarray(target, jnp.int32)
  frac = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / ramp_steps)
  return jnp.round(jnp.float32(dense) - jnp.float32(dense - target) * frac).astype(jnp.int32)


def budget_freeze(inner: optax.GradientTransformation, target: Optional[int] = None,
                  cfg: Optional[CompressionConfig] = None, ramp_steps: Optional[int] = None
                  ) -> optax.GradientTransformation:
  """Zeroes selection updates for good once the counted params reach the budget.

  At each update the params *before* the update are counted with :func:`softlm_jax.count_params`;
  once ``count <= target`` the state flips to frozen (sticky). While frozen, in every training-form
  layer (its rule from :func:`softlm_jax.rules.rule_of`): the update of each of the rule's per-layer
  leaves is zero (SoftLM's ``alpha``), and so is the update of every pruned entry (``~budget.kept``: a
  singular value at or below its threshold, an LLRC mask logit at or below 0) of ``s`` and of the
  rule's ``per_value`` leaves (LLRC's ``mask_logits``), so a pruned value stays pruned, the count can
  only fall and the budget stays met while training goes on.

  With a ramp (``ramp_steps``, default ``cfg.compress_steps``; 0 = none), before the freeze every
  selection update (all of a rule's leaves) is also zero at each update whose count is already at
  or under :func:`ramp_target`: the count falls no faster than the ramp, give or take one update.

  Args:
    inner: the transformation for all params (e.g. :func:`make_optimizer`'s partition).
    target: parameter budget; default ``budget.target_params(params, cfg)`` from the params' shapes.
    cfg: needed when ``target`` is None.
  """
  if target is None and cfg is None:
    raise ValueError("budget_freeze needs a target or a cfg")
  ramp = ramp_steps if ramp_steps is not None else (cfg.compress_steps if cfg is not None else 0)

  def init_fn(params):
    return BudgetState(inner.init(params), jnp.zeros((), bool), jnp.full((), -1, jnp.int32),
                       budget.count_params(params), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("budget_freeze needs params: call tx.update(grads, opt_state, params)")
    goal = target if target is not None else budget.target_params(params, cfg)
    count = budget.count_params(params)
    newly = jnp.logical_and(~state.frozen, count <= goal)
    frozen = jnp.logical_or(state.frozen, count <= goal)
    freeze_step = jnp.where(newly, state.step, state.freeze_step)
    if ramp > 0:
      dense = budget.dense_params(params)
      hold = jnp.logical_and(~frozen, count <= ramp_target(dense, goal, state.step, ramp))
    else:
      hold = jnp.zeros((), bool)
    updates, inner_state = inner.update(updates, state.inner, params)
    selected = {}  # layer path -> (its rule, its kept entries)
    for path, layer in tree.factored_layers(params):
      rule = rules.rule_of(layer)
      if rule is not None:
        selected[path] = (rule, rule.kept(layer))

    def mask(keypath, u):
      path = _path(keypath)
      parent, name = "/".join(path[:-1]), path[-1]
      if parent not in selected:
        return u
      rule, kept = selected[parent]
      if name in rule.keys:
        held = frozen & ~kept if name in rule.per_value else frozen
        return jnp.where(held | hold, jnp.zeros_like(u), u)
      if name == "s":  # the singular values: a pruned one stays pruned
        return jnp.where(frozen & ~kept, jnp.zeros_like(u), u)
      return u

    updates = jax.tree_util.tree_map_with_path(mask, updates)
    return updates, BudgetState(inner_state, frozen, freeze_step, count, state.step + 1)

  return optax.GradientTransformation(init_fn, update_fn)


class GlobalRmsState(NamedTuple):
  """State of :func:`scale_by_global_rms`: the moving mean of the squared gradient over all leaves."""
  mean_square: jax.Array
  count: jax.Array


def scale_by_global_rms(decay: float = 0.99, eps: float = 1e-20) -> optax.GradientTransformation:
  """Divides every gradient by one number, the root of a bias-corrected moving mean of the squared
  gradient over all leaves together: Adam's second moment shared by every coordinate, so the step's
  scale adapts while the gradients' relative sizes, which rank the triplets, are kept (per-coordinate
  Adam moves every logit by about its learning rate, however little it matters)."""
  def init_fn(params):
    del params
    return GlobalRmsState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    size = sum(x.size for x in leaves)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves) / max(size, 1)
    count = state.count + 1
    mean_square = decay * state.mean_square + (1 - decay) * sq
    scale = jax.lax.rsqrt(mean_square / (1 - decay ** count.astype(jnp.float32)) + eps)
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), GlobalRmsState(mean_square, count)

  return optax.GradientTransformation(init_fn, update_fn)


def trade_optimizer(lr: float, momentum: float = 0.9) -> optax.GradientTransformation:
  """The selection's optimizer under :func:`budget_hold` (``R-alloc`` methods): SGD with momentum on
  gradients scaled by :func:`scale_by_global_rms`, so a logit's move is its averaged first-order
  evidence (with ``budget_hold(cost_scaled=True)``: per counted parameter), comparable across layers."""
  return optax.chain(scale_by_global_rms(), optax.trace(decay=momentum), optax.scale(-lr))


def budget_hold(inner: optax.GradientTransformation, target: Optional[int] = None,
                cfg: Optional[CompressionConfig] = None, min_rank: int = 1,
                cost_scaled: bool = False) -> optax.GradientTransformation:
  """Holds the count at the budget after every update, for a selection that starts there (e.g. at an
  allocation, :func:`softlm_jax.allocate.logits_for_ranks` / :func:`softlm_jax.allocate.alpha_for_ranks`).

  Each update is the inner one, then one shift ``tau`` of every training-form layer's margins (its
  rule's ``margin`` and ``shift``), :func:`softlm_jax.budget.fill_shift` of the updated margins: the
  kept triplets are the largest margins over all layers whose count fits ``target``, with every layer
  keeping at least ``min_rank`` (a layer's own shift stops at its ``min_rank``-th margin). A triplet gained in
  one layer is paid for by triplets dropped wherever the margins are lowest, so the selection moves by
  trades at the budget instead of by a price on the count: every update's count is at most ``target``
  and short of it by less than one triplet's cost (``rows + cols``, under twice that where the next
  triplet would turn a layer dense). Nothing is frozen or masked.

  With ``cost_scaled`` each layer's selection update is first multiplied by the mean over layers of
  ``rows + cols`` over its own: a triplet's move is then its evidence per counted parameter, the unit in
  which the fill trades (a 576 x 1536 triplet costs 2.75x a 576 x 192 one).

  The state is a :class:`BudgetState` that reads as frozen from the start (``freeze_step`` 0, so
  :func:`softlm_jax.train.fit` runs ``finetune_steps`` updates), with the count after the shift.

  Args:
    inner: the transformation for all params (e.g. :func:`make_optimizer`'s partition).
    target: parameter budget; default ``budget.target_params(params, cfg)``.
    cfg: needed when ``target`` is None.
  """
  if target is None and cfg is None:
    raise ValueError("budget_hold needs a target or a cfg")

  def selection(params):
    out = {}
    for path, layer in tree.factored_layers(params):
      rule = rules.rule_of(layer)
      if rule is None:
        continue
      if rule.margin is None:
        raise ValueError(f"layer '{path}': rule {rule.name!r} has no margin/shift, so the budget hold cannot "
                         "move its cut")
      out[path] = (rule, layer)
    if not out:
      raise ValueError("budget_hold needs a training-form tree (a selection rule's parameters in the layers)")
    return out

  def init_fn(params):
    selection(params)
    return BudgetState(inner.init(params), jnp.ones((), bool), jnp.zeros((), jnp.int32),
                       budget.count_params(params), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("budget_hold needs params: call tx.update(grads, opt_state, params)")
    goal = target if target is not None else budget.target_params(params, cfg)
    updates, inner_state = inner.update(updates, state.inner, params)
    if cost_scaled:
      before = selection(params)
      costs = {path: sum(budget.layer_shape(layer)) for path, (_, layer) in before.items()}
      mean_cost = sum(costs.values()) / len(costs)

      def per_parameter(keypath, u):
        path = _path(keypath)
        parent, name = "/".join(path[:-1]), path[-1]
        if parent in costs and name in before[parent][0].keys:
          return u * jnp.asarray(mean_cost / costs[parent], u.dtype)
        return u
      updates = jax.tree_util.tree_map_with_path(per_parameter, updates)
    layers = selection(optax.apply_updates(params, updates))
    taus = budget.fill_shift([rule.margin(layer) for rule, layer in layers.values()],
                             [budget.layer_shape(layer) for _, layer in layers.values()], goal, min_rank=min_rank)
    taus = dict(zip(layers, jax.lax.stop_gradient(taus)))

    def move(keypath, u):
      path = _path(keypath)
      parent, name = "/".join(path[:-1]), path[-1]
      if parent in layers:
        key, sign = layers[parent][0].shift
        if name == key:
          return u + (sign * taus[parent]).astype(u.dtype)
      return u

    updates = jax.tree_util.tree_map_with_path(move, updates)
    count = budget.count_params(optax.apply_updates(params, updates))
    return updates, BudgetState(inner_state, state.frozen, state.freeze_step, count, state.step + 1)

  return optax.GradientTransformation(init_fn, update_fn)


#: learning-rate schedules of the weights' Adam in fine-tuning runs of a known length
LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(lr: float, steps: int, schedule: str = "constant", warmup_steps: int = 0) -> optax.Schedule:
  """The weights' learning rate at update ``count`` (0-based) of a ``steps``-update run.

  ``"constant"``: ``lr`` after a linear warmup from 0 over ``warmup_steps`` updates (none by default).
  ``"cosine"``: the same warmup, then ``lr * (1 + cos(pi * k / (steps - warmup_steps))) / 2`` at the
  ``k``-th update after it, falling to 0 at ``steps``.
  """
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
  if not (lr > 0 and int(steps) >= 1 and 0 <= int(warmup_steps) < int(steps)):
    raise ValueError(f"need lr > 0, steps >= 1 and 0 <= warmup_steps < steps, got lr={lr!r}, "
                     f"steps={steps!r}, warmup_steps={warmup_steps!r}")
  steps, warmup_steps = int(steps), int(warmup_steps)
  if schedule == "constant":
    body = optax.constant_schedule(lr)
  else:
    body = optax.cosine_decay_schedule(lr, steps - warmup_steps)
  if warmup_steps == 0:
    return body
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), body], [warmup_steps])


def make_optimizer(cfg: CompressionConfig, weights_tx: Optional[optax.GradientTransformation] = None,
                   alpha_tx: Optional[optax.GradientTransformation] = None,
                   target: Optional[int] = None, hold: bool = False) -> optax.GradientTransformation:
  """``budget_freeze(partition({"weights": ..., <each rule's label>: ...}))`` for the rule ``cfg.method``
  (``hold``: :func:`budget_hold` instead, for a selection that starts at the budget).

  The rule's leaves train with ``alpha_tx`` (default: the rule's ``optimizer(cfg)``: SoftLM
  ``optax.adam(cfg.alpha_lr)``, the paper's AdamW without decay; LLRC ``optax.adam(cfg.mask_lr)``);
  other rules' leaves get zero updates. A rule that ``trains_weights`` (SoftLM) needs ``weights_tx``
  for every other leaf (pass ``optax.set_to_zero()`` for thresholds-only training). One that does not
  (LLRC: only the mask logits train) refuses it and gives every weight a zero update, so the weights
  stay bit-identical (fine-tune after export instead). Works on trees without a selection too (e.g.
  fine-tuning a static-SVD export): then the freeze is a no-op.
  """
  rule = rules.get(cfg.method)
  if rule.trains_weights and weights_tx is None:
    raise ValueError(f"{rule.name} needs weights_tx (e.g. optax.adam(5e-5); optax.set_to_zero() to train "
                     f"its {', '.join(rule.keys)} alone)")
  if not rule.trains_weights and weights_tx is not None:
    raise ValueError(f"{rule.name} keeps the weights frozen (only {', '.join(rule.keys)} train): pass "
                     "weights_tx=None and fine-tune the exported model instead")
  txs = {r.label: optax.set_to_zero() for r in rules.all_rules()}
  txs[WEIGHTS_LABEL] = weights_tx if rule.trains_weights else optax.set_to_zero()
  txs[rule.label] = alpha_tx or rule.optimizer(cfg)
  if hold:  # trades at the budget, each triplet's evidence per counted parameter
    return budget_hold(optax.multi_transform(txs, param_labels), target=target, cfg=cfg, cost_scaled=True)
  return budget_freeze(optax.multi_transform(txs, param_labels), target=target, cfg=cfg)


def budget_state(opt_state) -> Optional[BudgetState]:
  """The :class:`BudgetState` inside an optimizer state (None when there is none)."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, BudgetState))
           if isinstance(s, BudgetState)]
  return found[0] if found else None
