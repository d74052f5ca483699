"""Compression losses (paper section 4.4)."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from softlm_jax import tree
from softlm_jax.config import CompressionConfig


def adaptive_loss(alpha: jax.typing.ArrayLike) -> jax.Array:
  """``L_acmp = sum_i exp(-alpha_i)`` (eq. 9): pressure fades as thresholds grow. alpha: ``(L,)``."""
  return jnp.sum(jnp.exp(-jnp.asarray(alpha)))


def linear_loss(alpha: jax.typing.ArrayLike) -> jax.Array:
  """``L_cmp = -sum_i alpha_i`` (eq. 8): constant pressure. alpha: ``(L,)``."""
  return -jnp.sum(jnp.asarray(alpha))


def alphas(params: Mapping) -> jax.Array:
  """Stacked thresholds of every SoftLM layer, shape ``(L,)`` (``(0,)`` when there are none)."""
  found = [layer["alpha"] for _, layer in tree.factored_layers(params) if "alpha" in layer]
  return jnp.stack([jnp.asarray(a, jnp.float32) for a in found]) if found else jnp.zeros((0,))


def compression_loss(params: Mapping, cfg: CompressionConfig) -> jax.Array:
  """``gamma * L_cmp`` over all thresholds in ``params`` (already weighted by ``cfg.gamma``); scalar."""
  fn = adaptive_loss if cfg.loss == "adaptive" else linear_loss
  a = alphas(params)
  return cfg.gamma * fn(a) if a.size else jnp.zeros(())
