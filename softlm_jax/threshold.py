"""Selection rules on singular values: SoftLM's soft threshold (paper section 4.3) and LLRC's
straight-through mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_threshold(s: jax.typing.ArrayLike, alpha: jax.typing.ArrayLike, *, sharpness: float,
                   floor: float = 0.0) -> jax.Array:
  """Differentiable clipping of singular values, ``Th(s)`` of the paper (eq. 6).

  ``Th(s) = s * tanh(k (s - alpha))`` where ``s >= alpha``, else ``c * tanh(k (s - alpha))``.
  With ``c = 0`` every value at or below ``alpha`` is exactly zero, so the effective rank is
  ``#{s > alpha}`` (see :func:`softlm_jax.budget.effective_rank`).

  Args:
    s: singular values, shape ``(..., k)``.
    alpha: threshold, shape ``()`` or broadcastable to ``s``.
    sharpness: ``k`` > 0; larger is closer to hard thresholding.
    floor: the paper's ``c``.

  Returns:
    Array of the shape and dtype of ``s``.
  """
  s = jnp.asarray(s)
  t = jnp.tanh(sharpness * (s - alpha))
  return jnp.where(s >= alpha, s * t, floor * t).astype(s.dtype)


def hard_threshold(s: jax.typing.ArrayLike, alpha: jax.typing.ArrayLike) -> jax.Array:
  """``s`` where ``s > alpha`` else 0; shape ``(..., k)``. The limit of :func:`soft_threshold`."""
  s = jnp.asarray(s)
  return jnp.where(s > alpha, s, 0.0).astype(s.dtype)


def relaxed_mask(logits: jax.typing.ArrayLike, *, temperature: float = 1.0) -> jax.Array:
  """LLRC's relaxed mask ``sigmoid(logits / T)`` in (0, 1); shape and dtype of ``logits`` ``(..., k)``."""
  logits = jnp.asarray(logits)
  return jax.nn.sigmoid(logits / temperature).astype(logits.dtype)


def straight_through_mask(logits: jax.typing.ArrayLike, *, temperature: float = 1.0) -> jax.Array:
  """Hard mask ``logits > 0`` in the forward pass, gradient of :func:`relaxed_mask` in the backward.

  ``hard + (soft - stop_gradient(soft))``: the bracket is exactly 0 in floating point, so the
  forward value is exactly the 0/1 mask (an all-positive ``logits`` gives exactly the dense layer).

  Args:
    logits: ``(..., k)``.
    temperature: ``T`` > 0 of the relaxation.

  Returns:
    ``(..., k)``, the dtype of ``logits``.
  """
  logits = jnp.asarray(logits)
  soft = relaxed_mask(logits, temperature=temperature)
  hard = (logits > 0).astype(logits.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))
