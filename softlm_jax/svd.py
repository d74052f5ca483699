"""The decomposition room: how a dense kernel becomes ``left @ diag(s) @ right``, in a small registry.

A decomposition is a :class:`Decomposition`: its name (``CompressionConfig.decomposition``), the
statistics it needs, and ``factors(params, cfg, stats) -> {path: (left, s, right, dtype)}`` for every
kernel ``cfg`` selects, in the module's storage layout (``left (rows, q)``, ``s (q,)`` descending,
``right (q, cols)``, ``q <= min(rows, cols)``, ``dtype`` the kernel's). Selection rules, counting and
export only see ``left, s, right``, so every decomposition works with every rule.

What a decomposition needs (``needs``), and what :func:`decompose` hands it as ``stats``:

- ``"nothing"``: None (plain SVD).
- ``"grams"``: calibration Grams fixed before any layer changes (whitened SVD): the ``grams=`` given, or
  ``calibration.grams(params, cfg)`` (collected once per selection and shared by every method and CR).
- ``"calibration"``: the :class:`softlm_jax.calib.Calibration` itself (``apply_fn`` + batches + mask),
  for a decomposition that draws its statistics while the model is being compressed (e.g. Grams of
  layer ``i``'s inputs with layers ``< i`` already factored: ``calibration.collect(partial, cfg)``).

Adding one is one call::

  svd.register(Decomposition("propagated", needs="calibration", factors=fn))

Built in: ``"svd"`` (plain SVD of the kernel) and ``"whitened"`` (SVD in the coordinates whitened by
the calibration Gram ``X^T X``; SVD-LLM, Wang et al., ICLR 2025).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.linalg import check_finite, thin_svd, whitening
from softlm_jax.registry import DECOMPOSITIONS

#: What a decomposition can need (see the module docstring).
NEEDS = ("nothing", "grams", "calibration")


@dataclasses.dataclass(frozen=True)
class Decomposition:
  """One way to decompose the selected kernels.

  Attributes:
    name: the ``CompressionConfig.decomposition`` that selects it.
    needs: one of :data:`NEEDS`: what ``factors`` gets as ``stats``.
    factors: ``factors(params, cfg, stats) -> {path: (left (rows, q), s (q,), right (q, cols), dtype)}``
      for every kernel ``cfg`` selects in ``params`` (float32 numpy or jax arrays, storage layout,
      ``s`` descending).
    balance: whether :func:`softlm_jax.compress_params` rebalances each layer's kept factors
      (:func:`balance`) before training: for decompositions whose ``left`` is not orthonormal
      (whitened: ``S^{-T} U``), so that Adam's steps have the same relative size on both sides.
    takes_ranks: whether the factors depend on the ranks the layers will run at (propagated: each
      layer is fit with the layers upstream already cut); ``factors`` then also takes
      ``ranks={path: rank}`` (None: the uniform keep-ratio of ``cfg.target_ratio``).
    reads: the :class:`~softlm_jax.CompressionConfig` fields ``factors`` reads besides the selection
      (``include``, ``exclude``): :meth:`key` is built from them, so a cache of factors can never
      serve factors computed under other values.
  """

  name: str
  needs: str
  factors: Callable
  balance: bool = False
  takes_ranks: bool = False
  reads: tuple = ()

  def key(self, cfg: CompressionConfig) -> tuple:
    """What this decomposition's factors of a tree depend on in ``cfg``: its name, the selection and
    every field in :attr:`reads` (hashable)."""
    return (self.name, cfg.include, cfg.exclude, *((f, getattr(cfg, f)) for f in self.reads))

  def __post_init__(self):
    if not (isinstance(self.name, str) and self.name):
      raise ValueError(f"a decomposition needs a non-empty name, got {self.name!r}")
    if self.needs not in NEEDS:
      raise ValueError(f"decomposition {self.name!r}: needs must be one of {NEEDS}, got {self.needs!r}")


_DECOMPOSITIONS = DECOMPOSITIONS.holds(Decomposition)


def register(decomposition: Decomposition, *, replace: bool = False) -> Decomposition:
  """Adds ``decomposition`` (``CompressionConfig(decomposition=its name)`` then validates) and returns it.

  Raises ValueError when the name is taken, unless ``replace``.
  """
  return _DECOMPOSITIONS.add(decomposition, replace=replace)


def unregister(name: str) -> None:
  """Removes a decomposition (tests that register a toy one clean up with it)."""
  _DECOMPOSITIONS.remove(name)


def get(name: str) -> Decomposition:
  """The decomposition registered as ``name``. Raises ValueError listing the registered names."""
  return _DECOMPOSITIONS.get(name)


def names() -> tuple:
  """The registered decompositions' names, in registration order."""
  return _DECOMPOSITIONS.names()


# --- the linear algebra ---------------------------------------------------------------------------------


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


def _whiten_lapack(kernels: np.ndarray, grams: np.ndarray, floor: float, damp: float):
  """:func:`_whiten` on the CPU through LAPACK, one layer at a time: ``syevd`` of the Gram and the thin
  SVD from the float64 Gram of the smaller side (:func:`softlm_jax.linalg.whitening` / ``thin_svd``).
  On the 2-core CPU of BENCHMARKS.md XLA's ``eigh`` of a 1536 x 1536 Gram takes 13 CPU-s against 4.3
  for ``syevd``. The same factors up to the SVD's sign freedom."""
  lefts, ss, vts = [], [], []
  for k, g in zip(kernels, grams):
    root, q = whitening(g, floor=floor, damp=damp)
    u, sv, vt = thin_svd(root[:, None] * (q.T @ k))  # S^T W
    lefts.append(q @ (u / root[:, None]))
    ss.append(sv)
    vts.append(vt)
  return np.stack(lefts), np.stack(ss), np.stack(vts)


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
  if jax.default_backend() == "cpu":
    left, s, vt = _whiten_lapack(np.asarray(k), np.asarray(grams, np.float32), float(floor), float(damp))
  else:
    left, s, vt = _whiten(k, jnp.asarray(grams, jnp.float32), float(floor), float(damp))
  if layout == "out_in":  # K = W^T = V diag(s) (S^{-T} U)^T
    left, vt = jnp.swapaxes(vt, -1, -2), jnp.swapaxes(left, -1, -2)
  return np.asarray(left), np.asarray(s), np.asarray(vt)


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
    check_finite(path, g, "Gram")
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


def by_shape(kernels: list[tuple[str, Any]], batched: Callable, key: Callable = lambda path, k: None
             ) -> dict[str, tuple]:
  """Runs a batched factorisation once per group of equal-shape kernels: ``{path: (left, s, right, dtype)}``.

  Args:
    kernels: ``[(path, kernel (rows, cols))]``.
    batched: ``batched(stack (B, rows, cols) float32, paths, extra) -> (left (B, rows, q), s (B, q),
      right (B, q, cols))``, where ``extra`` is the group's ``key`` value.
    key: ``key(path, kernel)``: a further grouping key (e.g. the Gram's layout); kernels are grouped by
      ``(shape, key)``.
  """
  groups: dict[tuple, list] = {}
  for path, k in kernels:
    groups.setdefault((tuple(np.shape(k)), key(path, k)), []).append((path, k))
  out = {}
  for (_, extra), group in groups.items():
    stack = np.stack([np.asarray(k, np.float32) for _, k in group])
    u, s, vt = batched(stack, [p for p, _ in group], extra)
    for i, (path, k) in enumerate(group):
      out[path] = (u[i], s[i], vt[i], np.asarray(k).dtype)
  return out


def plain_factors(params: Mapping, cfg: CompressionConfig, stats: None = None) -> dict[str, tuple]:
  """``"svd"``: :func:`svd_factors` of every selected kernel, batched by shape."""
  return by_shape(tree.selected_kernels(params, cfg), lambda stack, paths, _: svd_factors(stack))


def whitened_layer_factors(params: Mapping, cfg: CompressionConfig, grams: Mapping) -> dict[str, tuple]:
  """``"whitened"``: :func:`whitened_factors` of every selected kernel against ``grams[path]``
  (``cfg.gram_floor``, ``cfg.gram_damp``), batched by shape and layout (:func:`gram_layouts`)."""
  kernels = tree.selected_kernels(params, cfg)
  layouts = gram_layouts(kernels, grams)

  def batched(stack, paths, layout):
    g = np.stack([np.asarray(grams[p], np.float32) for p in paths])
    return whitened_factors(stack, g, layout=layout, floor=cfg.gram_floor, damp=cfg.gram_damp)
  return by_shape(kernels, batched, key=lambda path, _: layouts[path])


SVD = register(Decomposition("svd", needs="nothing", factors=plain_factors))
WHITENED = register(Decomposition("whitened", needs="grams", factors=whitened_layer_factors, balance=True,
                                  reads=("gram_floor", "gram_damp")))


def _stats(d: Decomposition, params: Mapping, cfg: CompressionConfig, grams: Optional[Mapping], calibration):
  """What ``d.factors`` gets, from the ``grams`` / ``calibration`` given (see the module docstring)."""
  if d.needs == "nothing":
    if grams is not None:
      raise ValueError(f"grams were given but cfg.decomposition is {d.name!r}, which needs none: set "
                       "decomposition='whitened' (or another that reads Grams) to use them")
    return None
  if d.needs == "grams":
    if grams is not None:
      return grams
    if calibration is not None:
      return calibration.grams(params, cfg)
    raise ValueError(f"decomposition={d.name!r} needs calibration Grams: compress_params(params, cfg, "
                     "grams=softlm_jax.collect_grams(apply_fn, params, batches, cfg)) or "
                     "calibration=softlm_jax.Calibration(apply_fn, batches)")
  if calibration is None:
    raise ValueError(f"decomposition={d.name!r} draws its statistics while compressing and needs a "
                     "Calibration: calibration=softlm_jax.Calibration(apply_fn, batches, mask_fn)"
                     + (" (Grams alone are not enough)" if grams is not None else ""))
  return calibration


def _check_factors(d: Decomposition, kernels: list[tuple[str, Any]], out: Mapping) -> None:
  """Every selected kernel has factors of consistent shapes (rows, q), (q,), (q, cols)."""
  for path, k in kernels:
    rows, cols = np.shape(k)
    if path not in out:
      raise ValueError(f"decomposition {d.name!r} returned no factors for layer '{path}' (kernel {rows} x "
                       f"{cols}); it returned {len(out)} layers, e.g. {sorted(out)[:3]}")
    left, s, right, _ = out[path]
    q = np.shape(s)[0] if np.ndim(s) == 1 else -1
    if not (q >= 1 and np.shape(left) == (rows, q) and np.shape(right) == (q, cols) and q <= min(rows, cols)):
      raise ValueError(f"layer '{path}': decomposition {d.name!r} returned left {np.shape(left)}, s "
                       f"{np.shape(s)}, right {np.shape(right)}; expected ({rows}, q), (q,), (q, {cols}) with "
                       f"1 <= q <= {min(rows, cols)} (kernel {rows} x {cols}, storage layout)")


def decompose(params: Mapping, cfg: CompressionConfig, grams: Optional[Mapping] = None,
              calibration: Optional[Any] = None, *, ranks: Optional[Mapping[str, int]] = None) -> dict[str, tuple]:
  """Factors of every kernel ``cfg`` selects by ``cfg.decomposition``: ``{path: (left, s, right, dtype)}``.

  Args:
    params: the (dense) tree.
    cfg: selection and decomposition.
    grams: calibration Grams for a decomposition that needs them (``"whitened"``;
      :func:`softlm_jax.collect_grams`); an error for one that needs none.
    calibration: a :class:`softlm_jax.calib.Calibration`: the Grams are taken from it when ``grams`` is
      None (collected once per selection), and a decomposition with ``needs="calibration"`` gets it
      whole. Ignored by one that needs nothing, so a run can pass the same Calibration everywhere.
    ranks: ``{path: rank}`` the layers will run at, for a decomposition whose factors depend on them
      (``takes_ranks``: propagated); ignored by the others (their factors serve every rank).

  Returns:
    ``{path: (left (rows, q), s (q,), right (q, cols), dtype)}``, storage layout, ``s`` descending.

  Raises:
    ValueError: naming the layer and shape, for NaN/Inf kernels or misshapen factors; for missing
      statistics, naming what to pass.
  """
  d = get(cfg.decomposition)
  kernels = tree.selected_kernels(params, cfg)
  for path, k in kernels:
    check_finite(path, k)
  budget.dense_params(params, cfg)  # int32 range check
  stats = _stats(d, params, cfg, grams, calibration)
  out = dict(d.factors(params, cfg, stats, ranks=ranks) if d.takes_ranks else d.factors(params, cfg, stats))
  _check_factors(d, kernels, out)
  return out


__all__ = ["Decomposition", "NEEDS", "SVD", "WHITENED", "balance", "by_shape", "decompose", "get", "gram_layouts",
           "names", "plain_factors", "register", "svd_factors", "unregister", "whitened_factors",
           "whitened_layer_factors"]
