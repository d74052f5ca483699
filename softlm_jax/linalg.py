"""LAPACK helpers on the CPU shared by the decompositions (:mod:`softlm_jax.svd`, :mod:`softlm_jax.propagate`):
a Gram's whitening, a thin SVD, and the NaN/Inf check of a kernel or Gram. numpy and scipy only."""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg


def check_finite(path: str, kernel: Any, what: str = "kernel") -> None:
  k = np.asarray(kernel)
  bad = int(np.size(k) - np.count_nonzero(np.isfinite(k)))
  if bad:
    raise ValueError(f"layer '{path}': {what} of shape {k.shape} has {bad} NaN/Inf entries; "
                     "cannot take its SVD")


def whitening(gram: np.ndarray, *, floor: float = 1e-6, damp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """``(root (n,), q (n, n))`` with ``S = q diag(root)``, ``S S^T`` = the symmetrised, damped Gram with its
  eigenvalues clipped at ``floor`` x the largest (all ones for a zero Gram), as
  :func:`softlm_jax.whitened_factors`. One LAPACK ``syevd`` in float32 (on the 2-core CPU of BENCHMARKS.md
  3x faster than ``jnp.linalg.eigh`` at n = 1536); the layers of a group share it."""
  g = np.asarray(gram, np.float32)
  n = g.shape[-1]
  g = 0.5 * (g + g.T)
  if damp:
    g = g + np.float32(damp * np.trace(g) / n) * np.eye(n, dtype=np.float32)
  lam, q = scipy.linalg.eigh(g, driver="evd")  # ascending
  top = lam[-1]
  lam = np.maximum(lam, floor * top) if top > 0 else np.ones_like(lam)
  return np.sqrt(lam).astype(np.float32), q.astype(np.float32)


def thin_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Thin SVD ``a = u diag(s) vt`` of ``a (m, n)``, ``k = min(m, n)``, ``s`` descending, from the float64
  Gram of the smaller side (one k x k ``syevd``: 4-5x faster than a float32 ``gesdd`` on this CPU; ``s_i``
  exact to float64 rounding times ``(s_0 / s_i)^2``). Singular vectors of values below ``1e-7 s_0`` are
  set to 0 (their triplets carry nothing; the product stays ``a`` to that tolerance). float32 outputs."""
  a64 = np.asarray(a, np.float64)
  m, n = a64.shape
  tall = m >= n
  lam, vecs = scipy.linalg.eigh(a64.T @ a64 if tall else a64 @ a64.T, driver="evd")
  lam, vecs = lam[::-1], vecs[:, ::-1]
  s = np.sqrt(np.maximum(lam, 0.0))
  ok = s > 1e-7 * max(s[0], 1e-300)
  inv = np.where(ok, 1.0 / np.where(ok, s, 1.0), 0.0)
  if tall:  # a = u s v^T with v = vecs: u = a v / s
    u, vt = (a64 @ vecs) * inv, vecs.T * ok[:, None]
  else:  # u = vecs: v^T = u^T a / s
    u, vt = vecs * ok, (vecs.T @ a64) * inv[:, None]
  return u.astype(np.float32), s.astype(np.float32), vt.astype(np.float32)
