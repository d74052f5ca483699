"""Compression losses: SoftLM's (paper section 4.4) and LLRC's (distillation, total variation, budget).

The math is here; each rule's loss over a tree (which leaves it reads) is its entry in
:mod:`softlm_jax.builtin_rules` (``softlm_loss``, ``llrc_loss``), which builds on this module.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax import rules
from softlm_jax.config import CompressionConfig


def adaptive_loss(alpha: jax.typing.ArrayLike) -> jax.Array:
  """``L_acmp = sum_i exp(-alpha_i)`` (eq. 9): pressure fades as thresholds grow. alpha: ``(L,)``."""
  return jnp.sum(jnp.exp(-jnp.asarray(alpha)))


def linear_loss(alpha: jax.typing.ArrayLike) -> jax.Array:
  """``L_cmp = -sum_i alpha_i`` (eq. 8): constant pressure. alpha: ``(L,)``."""
  return -jnp.sum(jnp.asarray(alpha))


def total_variation(mask: jax.typing.ArrayLike) -> jax.Array:
  """``sum_i |m_{i+1} - m_i|`` over ``[1, m_1 .. m_k, 0]``; mask ``(k,)`` -> scalar.

  The padding makes a prefix of ones (keep the top singular values, drop the tail) the unique
  minimiser among 0/1 masks: it costs exactly 1, any other 0/1 mask at least 2.
  """
  mask = jnp.asarray(mask)
  padded = jnp.concatenate([jnp.ones((1,), mask.dtype), mask, jnp.zeros((1,), mask.dtype)])
  return jnp.sum(jnp.abs(jnp.diff(padded)))


def distillation_loss(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
                      *, where: jax.typing.ArrayLike | None = None, temperature: float = 1.0) -> jax.Array:
  """Mean ``KL(teacher || student)`` of the softmax distributions (LLRC's distillation term).

  Args:
    student_logits, teacher_logits: ``(..., V)``.
    where: optional bool ``(...)``: positions that count (e.g. the attention mask).
    temperature: softens both distributions; the loss is multiplied by ``T**2`` (Hinton et al.).

  Returns:
    Scalar float32.
  """
  s = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  if where is None:
    return jnp.mean(kl) * temperature**2
  w = jnp.asarray(where, jnp.float32)
  return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0) * temperature**2


def block_error_sums(y: jax.Array, t: jax.Array, w: jax.Array | None, loss: str = "total"
                     ) -> tuple[jax.Array, jax.Array]:
  """``(numerator, denominator)`` of a batch's error, float32 sums over tokens (``w``: token weights).

  ``"total"``: ``(sum w ||y - t||^2, sum w ||t||^2)``; ``"token"``: ``(sum w ||y - t||^2 / ||t||^2, sum w)``.
  """
  d = jnp.sum(jnp.square(y.astype(jnp.float32) - t.astype(jnp.float32)), axis=-1)
  n = jnp.sum(jnp.square(t.astype(jnp.float32)), axis=-1)
  if loss == "token":
    d, n = d / jnp.maximum(n, 1e-30), jnp.ones_like(n)
  if w is not None:
    d, n = d * w, n * w
  return jnp.sum(d), jnp.sum(n)


def block_loss(y: jax.Array, t: jax.Array, w: jax.Array | None = None, loss: str = "total") -> jax.Array:
  """The block refit's (:mod:`softlm_jax.refit`) error of a block output ``y`` against its target ``t``
  (both ``(B, T, hidden)``; ``w`` ``(B, T)`` token weights or None), a float32 scalar.

  ``"token"``: ``sum_t w_t ||y_t - t_t||^2 / ||t_t||^2 / sum_t w_t``, every token's error relative to its
  own norm. Each sub-layer of the next block reads ``RMSNorm(h)`` / ``LayerNorm(h)``, so an error's effect
  downstream scales with ``1 / ||h_t||``. ``"total"``:
  ``sum_t w_t ||y_t - t_t||^2 / sum_t w_t ||t_t||^2``; in a model with massive activations (the attention
  sink: on SmolLM2, position 0 holds 90-99.5% of the hidden states' energy in blocks 12-27) this is the
  error of one token a window.
  """
  d, n = block_error_sums(y, t, w, loss)
  return d / jnp.maximum(n, 1e-30)


def hidden_distillation_loss(student_hidden, teacher_hidden) -> jax.Array:
  """Mean over layers and tokens of each token's relative squared error against the teacher's state.

  ``sum_l mean_{b,t} ||s_{l,b,t} - h_{l,b,t}||^2 / ||h_{l,b,t}||^2 / L``: the residual stream's states
  (each ``(B, T, hidden)``, ``L`` of them, :meth:`softlm_jax.models.Model.hidden_fn`) matched token by
  token. Relative per token because every sub-layer reads ``RMSNorm(h)`` (an error matters in
  proportion to ``1 / ||h_t||``) and a model's attention sink (SmolLM2: one token holding 90-99% of a
  window's energy) would otherwise be all the loss sees. Each layer's term is the block refit's
  measure :func:`block_loss` with ``loss="token"``. The teacher's states carry no gradient.

  Returns:
    Scalar float32; 0 when the two tuples are equal.
  """
  if len(student_hidden) != len(teacher_hidden) or not student_hidden:
    raise ValueError(f"need as many student as teacher hidden states (and at least one), got "
                     f"{len(student_hidden)} and {len(teacher_hidden)}")
  errs = []
  for s, t in zip(student_hidden, teacher_hidden):
    if s.shape != t.shape:
      raise ValueError(f"student hidden state {s.shape} against teacher {t.shape}")
    errs.append(block_loss(jnp.asarray(s), jax.lax.stop_gradient(jnp.asarray(t)), loss="token"))
  return jnp.mean(jnp.stack(errs))


#: Cap on LLRC's rising budget price ``budget_growth**step`` (keeps float32 finite).
MAX_BUDGET_PRICE = 1e6


def budget_price(cfg: CompressionConfig, step: jax.typing.ArrayLike | None = None) -> jax.Array:
  """``min(cfg.budget_growth**step, MAX_BUDGET_PRICE)`` (float32 scalar); 1 when ``step`` is None."""
  if step is None or cfg.budget_growth == 1.0:
    return jnp.ones((), jnp.float32)
  log_price = jnp.asarray(step, jnp.float32) * np.log(cfg.budget_growth)
  return jnp.exp(jnp.minimum(log_price, np.log(MAX_BUDGET_PRICE)))


def compression_loss(params: Mapping, cfg: CompressionConfig,
                     step: jax.typing.ArrayLike | None = None) -> jax.Array:
  """The selection rule's regulariser (``softlm_jax.rules.get(cfg.method).loss``), already weighted; scalar.

  SoftLM: ``gamma * L_cmp`` over all thresholds (adaptive or linear,
  :func:`softlm_jax.builtin_rules.softlm_loss`). LLRC: :func:`softlm_jax.llrc_loss`, whose budget price
  rises with ``step`` (the update index) when ``cfg.budget_growth > 1``.
  """
  return rules.get(cfg.method).loss(params, cfg, step)
