"""Turning dense kernels into trainable SVD factors (paper sections 4.1-4.2)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.threshold import soft_threshold, straight_through_mask

#: Parameter names of a factored layer (any selection rule); everything else in the module (bias)
#: passes through untouched.
FACTOR_KEYS = ("left", "right", "s", "alpha", "mask_logits")


def init_rank(rows: int, cols: int, cfg: CompressionConfig) -> int:
  """Number of singular triplets kept at decomposition time (``cfg.init_rank``)."""
  full = min(rows, cols)
  if cfg.init_rank == "full":
    return full
  if cfg.init_rank == "break_even":
    return max(1, budget.break_even_rank(rows, cols))
  return min(int(cfg.init_rank), full)


@jax.jit
def _batched_svd(k: jax.Array):
  return jnp.linalg.svd(k, full_matrices=False)


def svd_factors(kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Thin SVD of a stack of kernels in float32: ``K = left @ diag(s) @ right``.

  Args:
    kernels: ``(B, rows, cols)``.

  Returns:
    ``left (B, rows, q)``, ``s (B, q)`` descending, ``right (B, q, cols)`` with ``q = min(rows, cols)``.
  """
  u, s, vt = _batched_svd(jnp.asarray(kernels, jnp.float32))
  return np.asarray(u), np.asarray(s), np.asarray(vt)


@jax.jit
def _whiten(kernels: jax.Array, grams: jax.Array, floor: float, damp: float):
  """Batched whitened SVD, Gram acting on the kernels' rows: see :func:`whitened_factors`."""
  n = grams.shape[-1]
  grams = 0.5 * (grams + jnp.swapaxes(grams, -1, -2))
  mean_diag = jnp.trace(grams, axis1=-2, axis2=-1)[:, None, None] / n
  grams = grams + damp * mean_diag * jnp.eye(n, dtype=grams.dtype)
  lam, q = jnp.linalg.eigh(grams)  # ascending; G = q diag(lam) q^T
  top = lam[:, -1:]
  # A zero Gram (a layer that never saw input) whitens isotropically: plain SVD.
  lam = jnp.where(top > 0, jnp.maximum(lam, floor * top), 1.0)
  root = jnp.sqrt(lam)  # S = q diag(root): S S^T = G (clipped)
  hi = jax.lax.Precision.HIGHEST
  a = root[:, :, None] * jnp.matmul(jnp.swapaxes(q, -1, -2), kernels, precision=hi)  # S^T W
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  # S^{-T} U = q diag(1/root) U: a diagonal solve against S^T = diag(root) q^T, no inverse formed.
  left = jnp.matmul(q, u / root[:, :, None], precision=hi)
  return left, s, vt


def whitened_factors(kernels: np.ndarray, grams: np.ndarray, *, layout: str = "in_out", floor: float = 1e-6,
                     damp: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Activation-aware ("whitened") SVD of a stack of kernels in float32: ``K = left @ diag(s) @ right``.

  For a linear map ``y = x W`` (``W`` in x out) with calibration inputs ``X`` and Gram
  ``G = X^T X = S S^T``: ``S^T W = U diag(s) V^T`` and ``W = (S^{-T} U) diag(s) V^T``. Truncating this
  at rank ``r`` minimises ``||X (W - W_r)||_F`` over rank-``r`` maps (the loss of dropping triplet
  ``i`` is exactly ``s_i^2``, the calibration output energy it carries), where plain SVD minimises
  ``||W - W_r||_F`` as if every input direction mattered alike (SVD-LLM, Wang et al., ICLR 2025).

  ``G`` is factored with ``eigh`` (``S = Q diag(sqrt(lambda))``), eigenvalues clipped at
  ``floor * max(lambda)``: robust where SVD-LLM's Cholesky fails on rank-deficient or ill-conditioned
  Grams (fewer tokens than features, duplicated or dead features). ``S^{-T} U`` is a diagonal solve.

  Args:
    kernels: ``(B, rows, cols)`` in the modules' storage layout.
    grams: ``(B, in, in)``: ``in = rows`` for ``layout="in_out"`` (``nn.Dense``), ``in = cols`` for
      ``"out_in"`` (HF ``FlaxConv1D``, kernel stored out x in).
    layout: ``"in_out"`` or ``"out_in"``.
    floor: relative eigenvalue clip, in [0, 1).
    damp: ``damp * mean(diag(G))`` added to the diagonal first.

  Returns:
    ``left (B, rows, q)``, ``s (B, q)`` descending, ``right (B, q, cols)``, ``q = min(rows, cols)``,
    float32, in the storage layout.
  """
  k = jnp.asarray(kernels, jnp.float32)
  if layout == "out_in":
    k = jnp.swapaxes(k, -1, -2)
  left, s, vt = _whiten(k, jnp.asarray(grams, jnp.float32), float(floor), float(damp))
  if layout == "out_in":  # K = W^T = V diag(s) (S^{-T} U)^T
    left, vt = jnp.swapaxes(vt, -1, -2), jnp.swapaxes(left, -1, -2)
  return np.asarray(left), np.asarray(s), np.asarray(vt)


def _check_finite(path: str, kernel: Any, what: str = "kernel") -> None:
  k = np.asarray(kernel)
  bad = int(np.size(k) - np.count_nonzero(np.isfinite(k)))
  if bad:
    raise ValueError(f"layer '{path}': {what} of shape {k.shape} has {bad} NaN/Inf entries; "
                     "cannot take its SVD")


def gram_layouts(kernels: list[tuple[str, Any]], grams: Mapping) -> dict[str, str]:
  """The side of each kernel its Gram acts on (``"in_out"``: rows, ``"out_in"``: cols), checked.

  A non-square kernel's side follows from the Gram's size. A square one needs the layout that
  :func:`softlm_jax.collect_grams` records (``grams.layouts``).

  Raises:
    ValueError: naming the layer, for a missing Gram, a Gram that is not ``(in, in)`` for either side
      of the kernel, NaN/Inf entries, or a square kernel without a recorded layout.
  """
  recorded = getattr(grams, "layouts", {}) or {}
  out = {}
  for path, k in kernels:
    rows, cols = np.shape(k)
    if path not in grams:
      raise ValueError(f"layer '{path}': no calibration Gram (decomposition='whitened' needs one for every "
                       f"selected layer; {len(grams)} given, e.g. {sorted(grams)[:3]}): collect them with "
                       "softlm_jax.collect_grams over the same selection")
    g = np.asarray(grams[path])
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] not in (rows, cols):
      raise ValueError(f"layer '{path}': Gram has shape {g.shape}, expected ({rows}, {rows}) for an in x out "
                       f"kernel or ({cols}, {cols}) for an out x in one (kernel {rows} x {cols})")
    _check_finite(path, g, "Gram")
    if path in recorded:
      layout = recorded[path]
      if g.shape[0] != (rows if layout == "in_out" else cols):
        raise ValueError(f"layer '{path}': Gram has shape {g.shape} but the layer's layout {layout!r} "
                         f"(kernel {rows} x {cols}) reads {rows if layout == 'in_out' else cols} features")
    elif rows == cols:
      raise ValueError(f"layer '{path}': the kernel is square ({rows} x {cols}), so the side its Gram acts "
                       "on is ambiguous; pass the Grams from softlm_jax.collect_grams (they record each "
                       "layer's layout) or set grams.layouts[path] = 'in_out' / 'out_in'")
    else:
      layout = "in_out" if g.shape[0] == rows else "out_in"
    out[path] = layout
  return out


def decompose(params: Mapping, cfg: CompressionConfig, grams: Optional[Mapping] = None) -> dict[str, tuple]:
  """SVD of every kernel ``cfg`` selects, batched by shape: ``{path: (left, s, right, dtype)}``.

  ``cfg.decomposition="whitened"`` takes the SVD in the coordinates whitened by ``grams[path]``
  (:func:`whitened_factors`); plain SVD otherwise (``grams`` then must be None).
  """
  kernels = tree.selected_kernels(params, cfg)
  for path, k in kernels:
    _check_finite(path, k)
  budget.dense_params(params, cfg)  # int32 range check
  whitened = cfg.decomposition == "whitened"
  if whitened and grams is None:
    raise ValueError("decomposition='whitened' needs calibration Grams: compress_params(params, cfg, "
                     "grams=softlm_jax.collect_grams(apply_fn, params, batches, cfg))")
  if not whitened and grams is not None:
    raise ValueError("grams were given but cfg.decomposition is 'svd': set decomposition='whitened' to use them")
  layouts = gram_layouts(kernels, grams) if whitened else {}
  by_shape: dict[tuple, list] = {}
  for path, k in kernels:
    by_shape.setdefault((tuple(np.shape(k)), layouts.get(path)), []).append((path, k))
  out = {}
  for (_, layout), group in by_shape.items():
    stack = np.stack([np.asarray(k, np.float32) for _, k in group])
    if whitened:
      u, s, vt = whitened_factors(stack, np.stack([np.asarray(grams[p], np.float32) for p, _ in group]),
                                  layout=layout, floor=cfg.gram_floor, damp=cfg.gram_damp)
    else:
      u, s, vt = svd_factors(stack)
    for i, (path, k) in enumerate(group):
      out[path] = (u[i], s[i], vt[i], np.asarray(k).dtype)
  return out


def balance(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rescales factor pairs so that ``||left[:, j]|| == ||right[j]||``, the product unchanged.

  ``left (rows, k)``, ``right (k, cols)`` -> the same shapes. Whitened factors come out very
  unbalanced (``S^{-T} U`` has column norms ~ ``1/sqrt(eigenvalue)``, 1e-2..1e-4 on real activations,
  and the spectrum's scale sits in ``right``); Adam moves every entry by about its learning rate, so
  fine-tuning such factors perturbs the small one by ~10% a step and wrecks the model (SmolLM2 CR 0.5:
  ppl 8,344 after 10 steps). Balanced, both sides take steps of the same relative size.
  """
  ln = np.linalg.norm(left.astype(np.float64), axis=0)
  rn = np.linalg.norm(right.astype(np.float64), axis=1)
  ok = (ln > 0) & (rn > 0)
  a = np.where(ok, np.sqrt(np.where(ok, rn, 1.0) / np.where(ok, ln, 1.0)), 1.0)
  return (left * a).astype(left.dtype), (right / a[:, None]).astype(right.dtype)


def spectrum_scale(s: np.ndarray, rows: int, cols: int, cfg: CompressionConfig) -> float:
  """What a layer's descending spectrum ``s`` ``(q,)`` is divided by (``cfg.normalize``); 1 if that is 0."""
  if cfg.normalize == "top":
    scale = s[0]
  elif cfg.normalize == "energy":
    scale = np.sqrt(np.sum(np.square(s, dtype=np.float64)))
  elif cfg.normalize == "uniform_rank":
    scale = s[min(budget.uniform_rank(rows, cols, cfg.target_ratio), len(s) - 1)]
  else:
    return 1.0
  return float(scale) if scale > 0 else 1.0


def initial_mask_logits(k: int, cfg: CompressionConfig) -> jax.Array:
  """LLRC's starting logits, ``(k,)`` float32: linear from ``cfg.mask_init[0]`` (largest singular
  value) to ``cfg.mask_init[1]`` (smallest); all > 0, so the hard mask starts all ones."""
  first, last = cfg.mask_init
  return jnp.asarray(np.linspace(first, last, k) if k > 1 else [first], jnp.float32)


def compress_params(params: Mapping, cfg: CompressionConfig, grams: Optional[Mapping] = None, *,
                    factors: Optional[Mapping[str, tuple]] = None) -> dict:
  """Replaces each selected kernel by its SVD factors plus the selection rule's parameters.

  Each selected module's ``{"kernel": K, "bias": b}`` (``K`` rows x cols in the module's storage
  layout: in x out for ``nn.Dense``, out x in for HF's ``FlaxConv1D``) becomes
  ``{"left": (rows, k), "s": (k,), "right": (k, cols), "alpha": (), "bias": b}`` with
  ``K = left @ diag(s) @ right`` (``cfg.method="llrc"``: ``"mask_logits": (k,)`` instead of
  ``alpha``). The spectrum is divided by :func:`spectrum_scale` (``cfg.normalize``) and the scale
  moved into ``right``. ``grams``: calibration Grams for ``cfg.decomposition="whitened"``
  (:func:`softlm_jax.collect_grams`). ``factors``: a :func:`decompose` result of the same ``params``
  and decomposition to reuse (one SVD for several CRs or methods). Everything else is returned
  unchanged (as plain dicts).

  Raises:
    ValueError: naming the layer and shape for NaN/Inf kernels, non-2-D selected kernels, a
      selection that matches nothing, or (whitened) a missing, misshapen or non-finite Gram.
  """
  factors = decompose(params, cfg, grams) if factors is None else factors

  def replace(path: str, node: Mapping) -> Mapping:
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    rows, cols = u.shape[0], vt.shape[1]
    k = init_rank(rows, cols, cfg)
    scale = spectrum_scale(s, rows, cols, cfg)
    left, right = u[:, :k], vt[:k] * scale
    if cfg.decomposition == "whitened":
      left, right = balance(left, right)
    new = {key: v for key, v in node.items() if key != "kernel"}
    new["left"] = jnp.asarray(left, dtype)
    new["s"] = jnp.asarray(s[:k] / scale, dtype)
    new["right"] = jnp.asarray(right, dtype)
    if cfg.method == "llrc":
      new["mask_logits"] = initial_mask_logits(k, cfg)
    else:
      new["alpha"] = jnp.zeros((), jnp.float32)
    return new

  return tree.map_modules(params, replace)


def singular_scale(layer: Mapping, cfg: CompressionConfig) -> jax.Array:
  """The vector that multiplies a training-form layer's ``k`` factor columns: ``Th(s)``, shape ``(k,)``.

  SoftLM: ``Th(s)``; LLRC: ``s * mask`` with the straight-through hard mask. Exported layers have
  none (it is merged into ``left``). This is the one place a selection rule turns singular values
  into the forward pass's scale; export merges exactly this vector, and its zeros are exactly the
  entries :func:`softlm_jax.budget.kept` drops.
  """
  if "alpha" in layer:
    return soft_threshold(layer["s"], layer["alpha"], sharpness=cfg.sharpness, floor=cfg.floor)
  if "mask_logits" in layer:
    return layer["s"] * straight_through_mask(layer["mask_logits"], temperature=cfg.mask_temperature)
  raise ValueError(f"layer with keys {sorted(layer)} has no threshold or mask (already exported?)")
