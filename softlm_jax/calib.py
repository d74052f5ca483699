"""Calibration statistics: the input Gram matrix ``X^T X`` of every selected linear layer.

Activation-aware decomposition (SVD-LLM's "truncation-aware data whitening", Wang et al., ICLR 2025)
needs, for each layer ``y = x W``, the Gram of its inputs over a calibration set. They are collected
by running the **unmodified** model under ``flax.linen.intercept_methods``: the interceptor computes
``x^T x`` of each selected dense module's input at trace time, so the whole forward pass plus the
Gram products compile into one jitted step, and the sums are accumulated batch by batch. Memory is
one ``(in, in)`` float32 matrix per layer, never the activations.

Layers that read the same input (q/k/v, gate/up) are computed once per traced input and share the
value.

:class:`Calibration` bundles what a collection needs (``apply_fn``, batches, mask) so that a run builds it
once and hands it to every :func:`softlm_jax.compress_params` / :func:`softlm_jax.static_svd` call:
Grams are collected on the first call that needs them and shared by every method and CR after it, and a
decomposition that draws statistics while the model is being compressed gets the object itself.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from softlm_jax import shard, tree
from softlm_jax.config import CompressionConfig
from softlm_jax import hooks
from softlm_jax.intercept import intercept, layout_of


class Grams(dict):
  """``{layer path: (in, in) float32 Gram}`` plus ``layouts``: ``{layer path: "in_out" | "out_in"}``.

  A plain dict for every purpose; the layouts tell the whitened decomposition on which side of a
  *square* kernel the Gram acts (its shape alone says it for the others). ``tokens`` is the number of
  input rows summed (after masking).
  """

  def __init__(self, grams: Mapping = (), layouts: Optional[Mapping[str, str]] = None, tokens: int = 0):
    super().__init__(grams)
    self.layouts = dict(layouts or {})
    self.tokens = int(tokens)


@contextlib.contextmanager
def _capture(cfg: CompressionConfig, out: dict, layouts: dict, weights: Optional[jax.Array]):
  """Interceptor context: for each selected dense module, ``out[path] = x^T x`` (traced)."""
  # id(input) -> (input, Gram). The input is kept so that its id cannot be reused by another traced
  # array while this trace runs (a freed tracer's id may be handed to the next one).
  seen: dict[int, tuple] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None
        or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)
    path = "/".join(module.scope.path)
    kernel = module.get_variable("params", "kernel")
    layout = layout_of(module)
    if kernel.ndim != 2 or layout is None or not cfg.matches(path):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    key = id(x)
    if key not in seen:
      x2 = jnp.asarray(x, jnp.float32)
      if weights is not None:
        if tuple(x2.shape[:-1]) != tuple(weights.shape):
          raise ValueError(f"layer '{path}': input rows have shape {tuple(x2.shape[:-1])} but the token "
                           f"weights from mask_fn have shape {tuple(weights.shape)}")
        x2 = x2 * weights[..., None]
      x2 = x2.reshape(-1, x2.shape[-1])
      seen[key] = (x, jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST))
    out[path] = seen[key][1]
    layouts[path] = layout
    return next_fun(*args, **kwargs)

  with hooks.intercept_methods(interceptor):
    yield


def collect_grams(apply_fn: Callable[[Any, Any], Any], params: Mapping, batches: Iterable, cfg: CompressionConfig,
                  *, mask_fn: Optional[Callable[[Any], jax.Array]] = None, progress: bool = True,
                  total: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None) -> Grams:
  """Sums ``X^T X`` of each selected layer's inputs over ``batches``.

  Args:
    apply_fn: ``apply_fn(params, batch)`` runs the unmodified model on dense ``params`` (e.g.
      ``lambda p, b: model(b["input_ids"], params=p).logits``); its output is discarded.
    params: the tree; Grams are collected for the dense kernels ``cfg`` selects in it. It may be
      partly compressed (some selected layers already factored): ``apply_fn`` then runs under
      :func:`softlm_jax.intercept` ``(cfg)``, so the remaining layers see the inputs the compressed
      ones produce.
    batches: an iterable of batches (streamed: one batch in memory at a time). Every batch should
      have the same shapes, or each new shape compiles once more.
    cfg: selects the layers (``include`` / ``exclude``), as :func:`softlm_jax.compress_params` will.
    mask_fn: optional ``mask_fn(batch) -> (B, T)`` 0/1 token weights (e.g. the attention mask), so
      padding positions do not count. Without it every input row counts.
    progress: show a tqdm bar.
    total: number of batches for the bar, when ``batches`` has no ``len``.
    mesh: a ``("data", "fsdp")`` mesh (:func:`softlm_jax.make_mesh`; it may span several processes):
      each batch is split along ``data`` (:func:`softlm_jax.shard.shard_batch`; every process passes
      the same global batches), each device sums the Grams of its rows and XLA adds the partial sums
      across ``data``; the sums come back replicated. ``params`` may be placed on the mesh or not.

  Returns:
    :class:`Grams`: ``{path: (in, in) float32}`` for every selected kernel of ``params`` (the
    module's input width ``in``: ``rows`` of an ``nn.Dense`` kernel, ``cols`` of an out x in
    ``FlaxConv1D`` kernel), with ``layouts`` and ``tokens``.

  Raises:
    ValueError: when a selected kernel never ran (its module was not called by ``apply_fn``), or
      ``batches`` is empty.
  """
  layouts: dict[str, str] = {}  # filled while tracing (layouts are static)
  factored = bool(tree.factored_layers(params))

  def grams_of(p, batch):
    """``({path: Gram}, token count or None)`` of one batch (traced)."""
    grams: dict[str, jax.Array] = {}
    weights = None if mask_fn is None else jnp.asarray(mask_fn(batch), jnp.float32)
    with _capture(cfg, grams, layouts, weights), (intercept(cfg) if factored else contextlib.nullcontext()):
      apply_fn(p, batch)
    return grams, (jnp.sum(weights) if weights is not None else None)

  def accumulate_fn(acc, p, batch):
    grams, count = grams_of(p, batch)
    return {k: acc[k] + grams[k] for k in acc}, count

  accumulate = shard.jit_replicated(accumulate_fn, mesh)
  it = iter(batches)
  if total is None and hasattr(batches, "__len__"):
    total = len(batches)
  bar = None
  if progress:
    bar = tqdm(total=total, desc="calibration grams", dynamic_ncols=True, mininterval=2.0)
  acc, tokens, n = None, 0, 0
  for batch in it:
    if acc is None:
      shapes, _ = jax.eval_shape(grams_of, params, batch)
      acc = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}
      if mesh is not None:
        acc = shard.replicate(acc, mesh)
    acc, count = accumulate(acc, params, batch if mesh is None else shard.shard_batch(batch, mesh))
    leaves = [x for x in jax.tree_util.tree_leaves(batch) if hasattr(x, "shape")]
    tokens += int(count) if count is not None else _rows(leaves)
    n += 1
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if acc is None:
    raise ValueError("collect_grams got no batches")
  missing = [p for p, _ in tree.selected_kernels(params, cfg) if p not in acc]
  if missing:
    raise ValueError(f"{len(missing)} selected layers never ran under apply_fn, e.g. {missing[:4]}; "
                     f"collected Grams for {sorted(acc)[:4]}...: check apply_fn runs the whole model")
  return Grams({k: np.asarray(v) for k, v in acc.items()}, layouts, tokens)


class Calibration:
  """A calibration set: ``apply_fn`` + batches + mask, with the Grams it gives collected once per selection.

  Build one per run and pass it as ``calibration=`` to :func:`softlm_jax.compress_params`,
  :func:`softlm_jax.static_svd` and :func:`softlm_jax.svd.decompose`: a decomposition that needs Grams
  (``"whitened"``) takes :meth:`grams` (collected on the first call, then served from the cache to
  every method and CR with the same selection), one that needs nothing ignores it, and one registered
  with ``needs="calibration"`` gets this object and may call :meth:`collect` on partly compressed
  trees as it goes.

  Args:
    apply_fn: ``apply_fn(params, batch)``, as for :func:`collect_grams` (output discarded).
    batches: the calibration batches: a sequence (iterated once per collection) or a zero-argument
      callable returning a fresh iterable each time (for streamed data; a one-shot iterator serves one
      collection only).
    mask_fn: optional ``mask_fn(batch) -> (B, T)`` 0/1 token weights (e.g. the attention mask).
    progress: show a tqdm bar while collecting.
    total: number of batches for the bar, when ``batches`` has no ``len``.
    mesh: collect data-parallel on this mesh (:func:`collect_grams`).

  Attributes:
    collections: how many times Grams were actually collected (cache misses and :meth:`collect` calls).
  """

  def __init__(self, apply_fn: Callable[[Any, Any], Any], batches: Any,
               mask_fn: Optional[Callable[[Any], jax.Array]] = None, *, progress: bool = True,
               total: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None):
    self.apply_fn = apply_fn
    self.mesh = mesh
    self.batches = batches
    self.mask_fn = mask_fn
    self.progress = progress
    self.total = total
    self.collections = 0
    self._cache: dict[tuple, Grams] = {}

  def iter_batches(self) -> Iterable:
    """The batches of one pass (a fresh iterable when ``batches`` is a callable)."""
    return self.batches() if callable(self.batches) else self.batches

  @staticmethod
  def selection(params: Mapping, cfg: CompressionConfig) -> tuple:
    """The cache key: ``((path, shape, dtype, fingerprint), ...)`` of the dense kernels ``cfg`` selects in
    ``params``. The fingerprint is a digest of a few entries of each kernel (its first and last row's
    ends: no pass over the weights), so trees with other weights (the dense model and a fine-tuned
    teacher) get their own Grams."""
    key = []
    for path, k in tree.selected_kernels(params, cfg):
      probe = np.concatenate([np.asarray(k[0, :8]).ravel(), np.asarray(k[-1, -8:]).ravel()])
      digest = hashlib.blake2b(probe.tobytes(), digest_size=8).hexdigest()
      key.append((path, tuple(np.shape(k)), str(probe.dtype), digest))
    return tuple(key)

  def collect(self, params: Mapping, cfg: CompressionConfig) -> Grams:
    """Collects the Grams of ``cfg``'s selection in ``params`` now (no cache): :func:`collect_grams`.

    ``params`` may be partly compressed (its factored layers run under :func:`softlm_jax.intercept`).
    """
    self.collections += 1
    return collect_grams(self.apply_fn, params, self.iter_batches(), cfg, mask_fn=self.mask_fn,
                         progress=self.progress, total=self.total, mesh=self.mesh)

  def grams(self, params: Mapping, cfg: CompressionConfig) -> Grams:
    """The Grams of ``cfg``'s selection in the dense ``params``, collected on the first call for that
    selection and those weights (:meth:`selection`) and shared after it: every method and CR that
    compresses the same tree with the same ``include`` / ``exclude`` gets one collection.

    A partly compressed tree is never served from the cache (its inputs depend on what was
    compressed): it is collected anew each time.
    """
    if tree.factored_layers(params):
      return self.collect(params, cfg)
    key = self.selection(params, cfg)
    if key not in self._cache:
      self._cache[key] = self.collect(params, cfg)
    return self._cache[key]

  def __repr__(self) -> str:
    return (f"Calibration(apply_fn={getattr(self.apply_fn, '__name__', self.apply_fn)!r}, "
            f"batches={type(self.batches).__name__}, mask_fn={'yes' if self.mask_fn else None}, "
            f"collections={self.collections}, cached={len(self._cache)})")


def _rows(leaves) -> int:
  """Token rows of an integer-id batch (the first 2-D+ integer array's ``B * T``); 0 if unknown."""
  for x in leaves:
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.ndim(x) >= 2:
      return int(np.prod(np.shape(x)[:2]))
  return 0
