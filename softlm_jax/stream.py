"""Streaming decomposition: a tree transform applied to a few layers at a time, with a bound on memory.

:func:`softlm_jax.compress_params` and :func:`softlm_jax.static_svd` decompose every selected kernel
in one batched call per shape: the dense model, the stacked copies, every full SVD and the new tree
all exist at once (more than 2x the dense bytes on a 1B model, BENCHMARKS.md). :func:`stream_layers`
runs the same function on groups of modules instead (each group's dense kernels at most
``group_bytes``, in tree order), so only one group's working set exists at a time; with
``donate=True`` a group's dense kernels are released as soon as its factors are built, so the
resident size stays near one model. The per-group function is pluggable: any
``fn(params, cfg) -> params`` that rewrites the selected modules of the tree it is given, e.g.
``compress_params``, ``static_svd``, ``functools.partial(static_svd, ranks=...)`` or a whitened
decomposition taking calibration statistics collected on the whole model first
(``functools.partial(compress_params, grams=calibration.grams(params, cfg))``: a group's sub-tree is
not a model that ``apply_fn`` can run, so a decomposition registered with ``needs="calibration"``
cannot be streamed). Applied per group, ``compress_params`` and
``static_svd`` give exactly the one-shot result (each kernel's SVD does not depend on the others).

With ``mesh`` each group's new leaves go straight into their place on the mesh
(:func:`softlm_jax.shard.fsdp_spec`), so no device ever holds the whole factored model.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import numpy as np

from softlm_jax import budget, shard, tree
from softlm_jax.config import CompressionConfig

#: Default bound on one group's dense kernel bytes (a group holds at least one module).
DEFAULT_GROUP_BYTES = 256 * 2**20


def _nbytes(x: Any) -> int:
  return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _get(params: Mapping, path: tuple) -> Mapping:
  node = params
  for k in path:
    node = node[k]
  return node


def _set(params: dict, path: tuple, value: Any) -> None:
  node = params
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = value


def layer_groups(params: Mapping, cfg: CompressionConfig, group_bytes: int = DEFAULT_GROUP_BYTES) -> list[list[tuple]]:
  """Module paths (tuples) of the selected kernels, in tree order, cut into consecutive groups whose
  dense kernel bytes are at most ``group_bytes`` (a single larger kernel is a group of its own)."""
  if group_bytes <= 0:
    raise ValueError(f"group_bytes must be > 0, got {group_bytes}")
  selected = {name for name, _ in tree.selected_kernels(params, cfg)}
  groups, current, size = [], [], 0
  for path, node in tree.iter_modules(params):
    if tree.join(path) not in selected:
      continue
    n = _nbytes(node["kernel"])
    if current and size + n > group_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(path)
    size += n
  if current:
    groups.append(current)
  return groups


def stream_layers(fn: Callable[[Mapping, CompressionConfig], Mapping], params: Mapping, cfg: CompressionConfig, *,
                  group_bytes: int = DEFAULT_GROUP_BYTES, donate: bool = False, mesh=None,
                  on_group: Optional[Callable[[int, int], None]] = None) -> dict:
  """``fn(params, cfg)`` computed a group of layers at a time.

  Args:
    fn: ``(tree, cfg) -> tree`` that rewrites the modules whose kernels ``cfg`` selects and nothing
      else (``softlm_jax.compress_params``, ``softlm_jax.static_svd``, a ``functools.partial`` of
      either, a whitened decomposition). It is called on sub-trees that hold only one group's
      modules (each with its kernel, bias and any other leaves), at their full paths.
    params: the dense tree. Its selected kernels are ``(rows, cols)`` arrays (numpy or jax).
    cfg: the compression config (selection, rank rule, target).
    group_bytes: bound on a group's dense kernel bytes; peak memory is about the resident trees plus
      a few times this (the stacked copy, the SVD's input and outputs, the new factors).
    donate: release each group's dense kernels as soon as its new modules exist: the kernel entries
      are removed from ``params``' module dicts (jax arrays are also ``delete()``-d, as with
      ``jax.jit``'s donation). ``params`` is then left without those kernels: do not use it again.
    mesh: place each group's output on this ``("data", "fsdp")`` mesh as it is built, and the
      untouched leaves at the end (:func:`softlm_jax.shard.shard_tree`).
    on_group: called as ``on_group(done, total)`` after each group (progress, memory probes).

  Returns:
    The same tree as ``fn(params, cfg)``, as plain dicts.

  Raises:
    ValueError: from the selection (nothing selected, a non-2-D kernel), with the layer's name; from
      ``fn`` (e.g. NaN kernels), naming the layer.
  """
  groups = layer_groups(params, cfg, group_bytes)
  budget.dense_params(params, cfg)  # the int32 range check on the whole selection, before any work
  out = tree.map_modules(params, lambda _, node: node)  # new containers, leaves shared
  for i, group in enumerate(groups):
    sub: dict = {}
    for path in group:
      _set(sub, path, dict(_get(params, path)))
    new = fn(sub, cfg)
    if mesh is not None:
      new = shard.shard_tree(new, mesh)
    for path in group:
      node = _get(new, path)
      _set(out, path, node)
      if donate:
        source = _get(params, path)
        if not isinstance(source, dict):
          raise TypeError(f"donate=True needs a tree of plain dicts to take the kernels out of; module "
                          f"'{tree.join(path)}' is a {type(source).__name__}")
        kernel = source.pop("kernel")
        if isinstance(kernel, jax.Array) and not any(v is kernel for v in node.values()):
          kernel.delete()
        del kernel
    del sub, new
    if on_group is not None:
      on_group(i + 1, len(groups))
  return shard.shard_tree(out, mesh) if mesh is not None else out
