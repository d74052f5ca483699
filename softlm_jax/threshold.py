"""The SoftLM soft threshold (paper section 4.3)."""
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
