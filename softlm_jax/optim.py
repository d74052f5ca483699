"""Optimizer: thresholds in their own optax partition, and the budget freeze (paper section 4.5).

Like jaxpruner's ``wrap_optax``, the SoftLM rule is a ``GradientTransformation`` whose state (a
NamedTuple) lives in the optimizer state, so it is jitted with the step and checkpointed with it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from softlm_jax import budget, tree
from softlm_jax.config import CompressionConfig

THRESHOLD_KEYS = ("alpha",)


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
  """Tree of labels: ``"alpha"`` for thresholds, ``"weights"`` otherwise."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: "alpha" if _path(kp)[-1] in THRESHOLD_KEYS else "weights", params)


def budget_freeze(inner: optax.GradientTransformation, target: Optional[int] = None,
                  cfg: Optional[CompressionConfig] = None) -> optax.GradientTransformation:
  """Zeroes threshold updates for good once the counted params reach the budget.

  At each update the params *before* the update are counted with :func:`softlm_jax.count_params`;
  once ``count <= target`` the state flips to frozen (sticky). While frozen: every ``alpha`` update is
  zero, and so is the update of every singular value at or below its threshold (a pruned value stays
  pruned, so the count can only fall and the budget stays met while fine-tuning goes on).

  Args:
    inner: the transformation for all params (e.g. :func:`make_optimizer`'s partition).
    target: parameter budget; default ``budget.target_params(params, cfg)`` from the params' shapes.
    cfg: needed when ``target`` is None.
  """
  if target is None and cfg is None:
    raise ValueError("budget_freeze needs a target or a cfg")

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
    updates, inner_state = inner.update(updates, state.inner, params)
    alpha_of = {path: layer["alpha"] for path, layer in tree.factored_layers(params) if "alpha" in layer}

    def mask(keypath, u):
      path = _path(keypath)
      if path[-1] in THRESHOLD_KEYS:
        return jnp.where(frozen, jnp.zeros_like(u), u)
      parent = "/".join(path[:-1])
      if path[-1] == "s" and parent in alpha_of:
        s = _lookup(params, path)
        return jnp.where(frozen & (s <= alpha_of[parent]), jnp.zeros_like(u), u)
      return u

    updates = jax.tree_util.tree_map_with_path(mask, updates)
    return updates, BudgetState(inner_state, frozen, freeze_step, count, state.step + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def _lookup(params, path):
  for p in path:
    params = params[p]
  return params


def make_optimizer(cfg: CompressionConfig, weights_tx: optax.GradientTransformation,
                   alpha_tx: Optional[optax.GradientTransformation] = None,
                   target: Optional[int] = None) -> optax.GradientTransformation:
  """``budget_freeze(partition({"weights": weights_tx, "alpha": alpha_tx}))``.

  ``alpha_tx`` defaults to ``optax.adam(cfg.alpha_lr)`` (the paper's AdamW without decay on the
  thresholds). Works on trees without thresholds too (e.g. fine-tuning a static-SVD export): then the
  freeze is a no-op.
  """
  alpha_tx = alpha_tx or optax.adam(cfg.alpha_lr)
  part = optax.multi_transform({"weights": weights_tx, "alpha": alpha_tx}, param_labels)
  return budget_freeze(part, target=target, cfg=cfg)


def budget_state(opt_state) -> Optional[BudgetState]:
  """The :class:`BudgetState` inside an optimizer state (None when there is none)."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, BudgetState))
           if isinstance(s, BudgetState)]
  return found[0] if found else None
