"""Walking parameter trees: where the kernels and the factored layers are.

A *factored layer* is a module's parameter dict that holds ``left`` (rows x k) and ``right``
(k x cols) instead of ``kernel`` (rows x cols, in the module's own storage layout), plus, in training
form, ``s`` (k,) and its selection rule's parameters (:mod:`softlm_jax.rules`, e.g. SoftLM's threshold).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

from softlm_jax.config import CompressionConfig

#: The factor names of a factored layer, for every selection rule: ``left``, ``right`` and, in training form
#: only, the singular values ``s``. A rule's own names come from :func:`softlm_jax.rules.selection_keys`;
#: everything else in the module (bias) passes through untouched.
FACTOR_KEYS = ("left", "right", "s")


def join(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def is_factored(node: Any) -> bool:
  """Whether ``node`` is a factored layer (holds ``left`` and ``right``; training or exported form)."""
  return isinstance(node, Mapping) and "left" in node and "right" in node


def iter_modules(params: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Mapping]]:
  """Yields ``(path, node)`` for every dict in the tree that directly holds arrays (a module's params)."""
  has_leaf = any(not isinstance(v, Mapping) for v in params.values())
  if has_leaf:
    yield prefix, params
  for k, v in params.items():
    if isinstance(v, Mapping):
      yield from iter_modules(v, prefix + (k,))


def factored_layers(params: Mapping) -> list[tuple[str, Mapping]]:
  """``[(path, layer_params)]`` of every factored layer (training or exported form), in tree order."""
  return [(join(p), n) for p, n in iter_modules(params) if is_factored(n)]


def selected_kernels(params: Mapping, cfg: CompressionConfig, *, strict: bool = True
                     ) -> list[tuple[str, Any]]:
  """``[(module_path, kernel)]`` of the dense kernels ``cfg`` selects.

  Raises a ValueError naming the layer when an explicit ``cfg.include`` selects a kernel that is not
  2-D (with the default pattern such kernels, e.g. Mamba's depthwise conv, are skipped), and, when
  ``strict``, when nothing at all is selected.
  """
  out = []
  for path, node in iter_modules(params):
    if "kernel" not in node:
      continue
    name = join(path)
    if not cfg.matches(name):
      continue
    shape = np.shape(node["kernel"])
    if len(shape) != 2:
      if cfg.include is not None:
        raise ValueError(f"layer '{name}': selected kernel has shape {shape}, but only 2-D kernels "
                         f"(a linear layer's in x out or out x in matrix) can be factored; "
                         f"narrow `include` (currently {cfg.include!r}) or add it to `exclude`")
      continue
    out.append((name, node["kernel"]))
  if strict and not out and not factored_layers(params):
    raise ValueError(f"no kernel matched include={cfg.include_re.pattern!r} (exclude="
                     f"{cfg.exclude_re.pattern!r}); kernel paths in this tree are, e.g.: "
                     f"{[join(p) for p, n in iter_modules(params) if 'kernel' in n][:8]}")
  return out


def flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (nested mappings only; leaves are arrays)."""
  out = {}
  for k, v in params.items():
    key = f"{prefix}{k}"
    if "/" in str(k):
      raise ValueError(f"parameter name {key!r} contains '/', which the flat checkpoint keys use as separator")
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten`."""
  out: dict = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def map_modules(params: Mapping, fn, prefix: tuple = ()) -> dict:
  """Rebuilds the tree as plain dicts, replacing each module dict ``node`` by ``fn(path, node)``."""
  out = {}
  has_leaf = any(not isinstance(v, Mapping) for v in params.values())
  node = fn(join(prefix), params) if has_leaf else params
  for k, v in node.items():
    out[k] = map_modules(v, fn, prefix + (k,)) if isinstance(v, Mapping) else v
  return out
