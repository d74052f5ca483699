"""Propagated, error-aware decomposition: each layer fit on the inputs of the already-compressed model.

The whitened decomposition (:func:`softlm_jax.svd.whitened_factors`) fits every layer to the
dense model's inputs ``X_f``, collected once. Inside the compressed model, layer 20 reads the output
of 19 compressed blocks instead, and the errors compound. Here the model is compressed block by
block, in model order, and within a block group by group in call order (layers that read the same
input together: q/k/v, then o, then gate/up, then down for Llama). Each group's statistics are taken
with every earlier layer already compressed (at its target rank): the Gram of its compressed-model
inputs ``G_c = X_c^T X_c`` and the cross-Gram with the dense model's inputs ``C = X_c^T X_f``.

**The objective** (SAES-SVD's error-aware one, arXiv 2602.03051, written as a convex mix; SVD-LLM's
``whitening_local_update`` is ``mix = 0``). For ``y = x W`` (``W`` in x out) and ``0 <= mix <= 1``::

  L(W') = (1 - mix) ||X_c (W' - W)||^2 + mix ||X_c W' - X_f W||^2

(``a = mix / (1 - mix)`` in SAES-SVD's ``||X_c (W' - W)||^2 + a ||X_c W' - X_f W||^2``, up to the
factor ``1 + a``). Expanding, with ``G_c = S S^T``::

  L(W') = tr(W'^T G_c W') - 2 tr(W'^T ((1 - mix) G_c W + mix C W)) + const
        = ||S^T W' - S^T T||_F^2 + const',   T = (1 - mix) W + mix G_c^{-1} C W

so the unconstrained optimum is the least-squares map ``T`` and, since ``W' -> S^T W'`` is a
bijection that preserves rank, the rank-``r`` optimum is ``S^{-T}`` times the rank-``r`` truncation
of ``S^T T = (1 - mix) S^T W + mix S^{-1} C W = U diag(s) V^T`` (Eckart-Young): ``left = S^{-T} U``,
``right = V^T``. Dropping triplet ``i`` raises ``L`` by exactly ``s_i^2``, so ``s`` plays the same
role as the whitened spectrum (``normalize="uniform_rank"``, thresholds, masks, counting, allocation
and export are unchanged). With ``X_c = X_f`` (the first group, or any layer at full rank upstream)
``T = W`` and this is the whitened decomposition. ``G_c`` is factored with ``eigh``, eigenvalues
clipped at ``cfg.gram_floor`` x the largest, after ``cfg.gram_damp`` damping, exactly as whitened.

**Cost.** The hidden states at the current block's input are cached for the dense and for the
compressed model (calibration tokens x hidden float32 each), and the block runs alone
(:class:`softlm_jax.blocks.BlockRunner`): per block one dense pass (recording every group's dense
input), one partial compressed pass per group (XLA drops what follows the group's input) and one
full compressed pass to move on: about 3-4 forward passes of the calibration set in all, plus the
Grams. Memory: the two hidden-state caches, one block's dense group inputs and the group's
``(in, in)`` Grams, never the activations of the whole model.

The result is a factors dict, ``{layer path: (left (rows, q), s (q,), right (q, cols), dtype)}`` in
the module's storage layout (``q = min(rows, cols)``), exactly what
:func:`softlm_jax.svd.decompose` returns: pass it as ``factors=`` to
:func:`softlm_jax.compress_params` (with ``decomposition="whitened"``, so the factors are balanced),
:func:`softlm_jax.static_svd`, or per group through :func:`softlm_jax.stream_layers`
(``functools.partial(compress_params, factors=f)``).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from softlm_jax import budget, shard, svd, tree
from softlm_jax.blocks import BlockRunner, get_subtree, with_subtree
from softlm_jax.config import CompressionConfig
from softlm_jax.export import static_ranks
from softlm_jax.linalg import check_finite, thin_svd, whitening

#: Default mixing weight between the compressed-input (0) and dense-output (1) objectives, from the
#: SmolLM2-135M sweep at CR 0.5 (BENCHMARKS.md#ablations): ppl 2,528 / 461.6 / 468.5 / 554.1 /
#: 753.3 at 0 / 0.25 / 0.5 / 0.75 / 1 (whitened: 1,092). 0.5 sits in the flat optimum (0.25-0.5); 0 alone
#: is worse than whitened (each layer reproduces the error it receives), 1 alone leans on a noisy
#: ``G_c^{-1} C`` from few tokens.
DEFAULT_MIX = 0.5


def check_mix(mix: float) -> float:
  if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= float(mix) <= 1.0:
    raise ValueError(f"mix must be a number in [0, 1] (0: fit the compressed model's own inputs, "
                     f"1: fit the dense model's outputs), got {mix!r}")
  return float(mix)


def closed_form(w: np.ndarray, root: np.ndarray, q: np.ndarray, cross: np.ndarray, mix: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``left (in, k), s (k,), right (k, out)`` of ``T = (1 - mix) W + mix G_c^{-1} C W`` in the ``G_c``
  metric: ``S^T T = (1 - mix) S^T W + mix S^{-1} C W = U diag(s) V^T``, ``left = S^{-T} U``, ``right = V^T``.
  ``w (in, out)`` in x out, ``(root, q)`` from :func:`softlm_jax.linalg.whitening` of ``G_c``,
  ``cross (in, in)`` = ``C``."""
  w = np.asarray(w, np.float32)
  a = root[:, None] * (q.T @ w)  # S^T W
  if mix:
    a = (1.0 - mix) * a + mix * ((q.T @ (np.asarray(cross, np.float32) @ w)) / root[:, None])  # + S^{-1} C W
  u, s, vt = thin_svd(a)
  return q @ (u / root[:, None]), s, vt


def error_aware_factors(kernels: np.ndarray, grams: np.ndarray, cross: np.ndarray, *, mix: float,
                        layout: str = "in_out", floor: float = 1e-6, damp: float = 0.0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Error-aware decomposition of a stack of kernels in float32: ``T = left @ diag(s) @ right``.

  ``T = (1 - mix) W + mix G_c^{-1} C W`` is the minimiser of
  ``(1 - mix) ||X_c (W' - W)||^2 + mix ||X_c W' - X_f W||^2`` and truncating the factors at rank ``r``
  gives the rank-``r`` minimiser; dropping triplet ``i`` costs exactly ``s_i^2`` (module docstring).

  Args:
    kernels: ``(B, rows, cols)`` in the modules' storage layout (``W``, or ``W^T`` for ``"out_in"``).
    grams: ``(B, in, in)`` ``G_c = X_c^T X_c`` of the layer's inputs in the compressed model.
    cross: ``(B, in, in)`` ``C = X_c^T X_f`` with the dense model's inputs ``X_f`` (same tokens).
    mix: in [0, 1].
    layout: ``"in_out"`` (``in = rows``) or ``"out_in"`` (``in = cols``, HF ``FlaxConv1D``).
    floor, damp: the Gram's eigenvalue clip and damping, as :func:`softlm_jax.whitened_factors`.

  Returns:
    ``left (B, rows, q)``, ``s (B, q)`` descending, ``right (B, q, cols)``, ``q = min(rows, cols)``,
    float32 numpy, in the storage layout.
  """
  mix = check_mix(mix)
  if layout not in ("in_out", "out_in"):
    raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
  k = np.asarray(kernels, np.float32)
  if layout == "out_in":
    k = np.swapaxes(k, -1, -2)
  n = k.shape[1]
  if np.shape(grams)[1:] != (n, n) or np.shape(cross)[1:] != (n, n):
    raise ValueError(f"grams {np.shape(grams)} and cross {np.shape(cross)} must be (B, {n}, {n}) for kernels "
                     f"{np.shape(kernels)} in layout {layout!r}")
  outs = [closed_form(k[i], *whitening(grams[i], floor=floor, damp=damp), cross[i], mix) for i in range(len(k))]
  left, s, vt = (np.stack([o[j] for o in outs]) for j in range(3))
  if layout == "out_in":  # K = T^T = V diag(s) (S^{-T} U)^T
    left, vt = np.swapaxes(vt, -1, -2), np.swapaxes(left, -1, -2)
  return left, s, vt


def _cross_grams(xc: jax.Array, xf: jax.Array, w: Optional[jax.Array]):
  """``(X_c^T X_c, X_c^T X_f, #non-finite in X_c, #non-finite in X_f)`` of one batch, rows weighted 0/1."""
  n = xc.shape[-1]
  xc = xc.astype(jnp.float32).reshape(-1, n)
  xf = xf.astype(jnp.float32).reshape(-1, n)
  if w is not None:
    w = w.reshape(-1, 1).astype(jnp.float32)
    xc, xf = xc * w, xf * w
  hi = jax.lax.Precision.HIGHEST
  return (jnp.matmul(xc.T, xc, precision=hi), jnp.matmul(xc.T, xf, precision=hi),
          jnp.sum(~jnp.isfinite(xc)), jnp.sum(~jnp.isfinite(xf)))


@functools.lru_cache(maxsize=8)
def _cross_grams_jit(mesh: Optional[jax.sharding.Mesh]) -> Callable:
  """:func:`_cross_grams` jitted once per mesh; with one, the rows split along ``data`` and the partial
  Grams summed across it by XLA, replicated (:func:`softlm_jax.shard.jit_replicated`)."""
  return shard.jit_replicated(_cross_grams, mesh)


def unpack_calibration(calibration: Any) -> tuple[Callable, list, Optional[Callable]]:
  """``(apply_fn, batches as a list, mask_fn)`` from an object with those attributes (e.g. a
  ``Calibration``) or a tuple ``(apply_fn, batches[, mask_fn])``."""
  if hasattr(calibration, "iter_batches"):  # softlm_jax.Calibration (batches may be a callable)
    apply_fn, batches, mask_fn = calibration.apply_fn, calibration.iter_batches(), calibration.mask_fn
  elif all(hasattr(calibration, a) for a in ("apply_fn", "batches")):
    apply_fn, batches, mask_fn = calibration.apply_fn, calibration.batches, getattr(calibration, "mask_fn", None)
  elif isinstance(calibration, (tuple, list)) and len(calibration) in (2, 3):
    apply_fn, batches, mask_fn = (tuple(calibration) + (None,))[:3]
  else:
    raise TypeError("calibration must have apply_fn, batches and mask_fn attributes (a Calibration) or be a "
                    f"tuple (apply_fn, batches, mask_fn); got {type(calibration).__name__}")
  batches = list(batches)
  if not batches:
    raise ValueError("the calibration set has no batches")
  return apply_fn, batches, mask_fn


def token_count(batch: Any, weights: Optional[jax.Array], h: jax.Array) -> int:
  return int(np.sum(np.asarray(weights))) if weights is not None else int(np.prod(np.shape(h)[:-1]))


def propagated_factors(params: Mapping, cfg: CompressionConfig, calibration: Any, *, mix: float = DEFAULT_MIX,
                       ranks: Optional[Mapping[str, int]] = None, progress: bool = True) -> dict[str, tuple]:
  """The propagated, error-aware decomposition of every kernel ``cfg`` selects (module docstring).

  Args:
    params: the dense tree.
    cfg: selection (``include`` / ``exclude``), ``target_ratio`` (the uniform ranks of the upstream
      layers when ``ranks`` is None), ``gram_floor`` and ``gram_damp``.
    calibration: ``apply_fn(params, batch)`` running the whole model, the calibration ``batches`` (a
      list or iterable; all are used, block by block) and ``mask_fn(batch) -> (B, T)`` 0/1 token
      weights or None: an object with those attributes or a tuple ``(apply_fn, batches, mask_fn)``.
      With a ``mesh`` attribute (a :class:`softlm_jax.Calibration` built with ``mesh=``) the blocks run
      data-parallel: each batch split along ``data`` (every process passes the same global batches), the
      hidden states kept on the devices, the Grams summed across ``data`` by XLA. The per-layer
      eigendecomposition and SVD (one ``(in, in)`` and one ``(in, out)`` problem per layer group) run on
      the host, as without a mesh.
    mix: in [0, 1], the weight of the dense-output term (:data:`DEFAULT_MIX`).
    ranks: ``{layer path: rank}`` each compressed layer runs at while later layers are fit (e.g. a
      global allocation); default :func:`softlm_jax.static_ranks` (the uniform keep-ratio).
    progress: a tqdm bar over the layer groups.

  Returns:
    ``{layer path: (left (rows, q), s (q,), right (q, cols), dtype)}``, full ``q = min(rows, cols)``,
    float32, in the storage layout, in model order; ``left[:, :r] * s[:r] @ right[:r]`` is the layer's
    rank-``r`` optimum given the compressed model upstream.

  Raises:
    ValueError: naming the layer: a NaN/Inf kernel, a NaN/Inf input (in the dense or the compressed
      model), a selected layer outside the numbered blocks ``apply_fn`` calls, a bad rank; ``mix``
      outside [0, 1]. Warns, naming the layer, when the calibration set has fewer tokens than the
      layer has input features (its Gram is rank-deficient; the eigenvalue floor then applies).
  """
  mix = check_mix(mix)
  apply_fn, batches, mask_fn = unpack_calibration(calibration)
  kernels = dict(tree.selected_kernels(params, cfg))
  for path, k in kernels.items():
    check_finite(path, k)
  budget.dense_params(params, cfg)
  params = jax.tree.map(jnp.asarray, params)
  ranks = dict(static_ranks(params, cfg) if ranks is None else ranks)
  for path, k in kernels.items():
    q = min(np.shape(k))
    r = ranks.get(path)
    if r is None or isinstance(r, bool) or int(r) != r or not 0 < int(r) <= q:
      raise ValueError(f"layer '{path}': rank {r!r} is not an int in [1, {q}] (kernel {np.shape(k)})")

  runner = BlockRunner(apply_fn, params, batches[0])
  layouts = {p: lay for blk in runner.blocks for p, _, lay in runner.linears[blk]}
  outside = [p for p in kernels if p not in layouts]
  if outside:
    raise ValueError(f"layer '{outside[0]}' ({len(outside)} in all) is not a linear layer inside a numbered "
                     f"block that apply_fn calls (blocks: {runner.blocks[:3]}...): the propagated decomposition "
                     "compresses block by block; exclude it or use decomposition='whitened'")
  plan = []  # (block, [[paths of one group]])
  for blk in runner.blocks:
    groups: dict = {}
    for path, key, _ in runner.linears[blk]:
      if path in kernels:
        groups.setdefault(key, []).append(path)
    plan.append((blk, list(groups.values())))
  while plan and not plan[-1][1]:  # nothing to fit after the last block holding a selected layer
    plan.pop()

  weights = [None if mask_fn is None else jnp.asarray(mask_fn(b), jnp.float32) for b in batches]
  host_weights = weights  # the token count reads them on the host
  mesh = getattr(calibration, "mesh", None)
  cross_grams = _cross_grams_jit(mesh)
  if mesh is not None:  # data-parallel: every block runs on its rows of each batch
    batches = [shard.shard_batch(b, mesh) for b in batches]
    weights = [None if w is None else shard.shard_batch(w, mesh) for w in weights]
  h_f = [runner.embed(params, b) for b in batches]
  tokens = sum(token_count(b, w, h) for b, w, h in zip(batches, host_weights, h_f))
  h_c = list(h_f)
  bar = None
  if progress:
    bar = tqdm(total=sum(len(g) for _, g in plan), desc="propagated decomposition", dynamic_ncols=True,
               mininterval=2.0)
  out: dict[str, tuple] = {}
  for blk, groups in plan:
    dense_blk = get_subtree(params, blk)
    comp_blk = dense_blk
    dense_tree = runner.place(params, blk, dense_blk)
    caps = tuple(runner.to_slot(blk, g[0]) for g in groups)
    xf, new_hf = [], []
    for b, batch in enumerate(batches):
      y, xs = runner.run(dense_tree, blk, h_f[b], batch, capture=caps)
      new_hf.append(y)
      xf.append(xs)
    for gi, group in enumerate(groups):
      comp_tree = runner.place(params, blk, comp_blk)
      g_acc = c_acc = None
      for b, batch in enumerate(batches):
        _, (xc,) = runner.run(comp_tree, blk, h_c[b], batch, capture=(caps[gi],), output=False)
        g, c, bad_c, bad_f = cross_grams(xc, xf[b][gi], weights[b])
        for bad, where in ((bad_c, "compressed"), (bad_f, "dense")):
          if int(bad):
            raise ValueError(f"layer '{group[0]}': its input in the {where} model has {int(bad)} NaN/Inf entries "
                             f"(calibration batch {b}, input shape {tuple(xc.shape)}); check the model and "
                             "the upstream factors")
        g_acc, c_acc = (g, c) if g_acc is None else (g_acc + g, c_acc + c)
      n = g_acc.shape[0]
      if tokens < n:
        warnings.warn(f"layer '{group[0]}' (and {len(group) - 1} more sharing its input): {tokens} calibration "
                      f"tokens for {n} input features, so its Gram is rank-deficient; its eigenvalues are clipped "
                      f"at gram_floor={cfg.gram_floor} x the largest", stacklevel=2)
      root, q = whitening(np.asarray(g_acc), floor=cfg.gram_floor, damp=cfg.gram_damp)  # one per group
      c_np = np.asarray(c_acc)
      for path in group:
        k = np.asarray(kernels[path], np.float32)
        left, s, right = closed_form(k if layouts[path] == "in_out" else k.T, root, q, c_np, mix)
        if layouts[path] == "out_in":
          left, right = right.T, left.T
        out[path] = (left, s, right, np.asarray(kernels[path]).dtype)
        r = int(ranks[path])
        rel = path[len(blk) + 1:]
        node = {key: v for key, v in get_subtree(comp_blk, rel).items() if key != "kernel"}
        node["left"] = jnp.asarray(left[:, :r] * s[:r])
        node["right"] = jnp.asarray(right[:r])
        comp_blk = with_subtree(comp_blk, rel, node)
      if bar is not None:
        bar.update(1)
    comp_tree = runner.place(params, blk, comp_blk)
    h_c = [runner.run(comp_tree, blk, h_c[b], batch)[0] for b, batch in enumerate(batches)]
    h_f = new_hf
    del xf
  if bar is not None:
    bar.close()
  return {p: out[p] for p in kernels}


#: ``CompressionConfig(decomposition="propagated")``: drawn from the run's Calibration while compressing
#: (the upstream layers at ``ranks``, default the uniform rank of ``cfg.target_ratio``), with the default mix.
PROPAGATED = svd.register(svd.Decomposition(
    "propagated", needs="calibration", balance=True, takes_ranks=True,
    reads=("gram_floor", "gram_damp", "target_ratio"),
    factors=lambda params, cfg, calibration, ranks=None: propagated_factors(
        params, cfg, calibration, ranks=ranks, progress=getattr(calibration, "progress", True))))
