"""Flax NNX models in the library's pipeline: one canonical parameter tree, modules rebuilt from it.

The core works on parameter trees (``{path: {"kernel": (rows, cols), "bias": ...}}`` for a dense linear
map, ``{"left", "s", "right", ...}`` for a factored one) and on interceptors
(:mod:`softlm_jax.hooks`). An NNX model enters it in three steps, each a pure function returning new
objects (the user's module is never changed):

1. :func:`adapt` returns a copy of the model in *canonical form*: each ``nnx.Linear`` and each einsum
   module that is a plain linear map of its input (``flax.nnx.Einsum``, tunix/bonsai-style ``Einsum``
   modules with a kernel ``w`` of any rank) becomes a :class:`LinearMap` holding its kernel as the
   ``rows x cols`` matrix of the contraction (:class:`MapSpec`, derived from the einsum string and the
   kernel shape); each block (``layers/<i>``) routes its calls through the interceptors. Every other
   module is kept as it is. Einsums that are not a linear map of one operand are left alone and
   listed in :attr:`NNXModel.skipped` with the reason.
2. :class:`NNXModel` keeps that module's structure. ``NNXModel.params`` is the canonical tree (plain
   nested dicts, string keys); :meth:`NNXModel.module_for` rebuilds an ``nnx.Module`` for any tree of
   the same model, dense, training form (thresholds or masks) or exported, so the core's
   ``compress_params`` / ``export_params`` / counting / Grams / block runs / training apply unchanged.
3. The rebuilt module is an ordinary NNX module: its :class:`LinearMap` layers compute
   ``x @ left diag(scale) @ right`` themselves (with the :class:`~softlm_jax.CompressionConfig` they
   were built with), and inside :func:`softlm_jax.intercept` as Linen layers do.

This is surgery in the style of penzai and levanter (a new tree, not a patched one), chosen over
qwix's interception of ``jnp.einsum`` calls: the factored layers are then real NNX variables that a
user's own NNX code (``nnx.Optimizer``, ``nnx.LoRA``, sharding rules) sees and trains.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softlm_jax import hooks, tree
from softlm_jax.blocks import HOMOGENEOUS_ATTRIBUTE, block_path
from softlm_jax.config import CompressionConfig
from softlm_jax.intercept import factored_apply
from softlm_jax.rules import singular_scale


# --- the contraction as a matrix (pure) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MapSpec:
  """How a linear module's kernel and input become a ``rows x cols`` matrix product.

  ``equation`` ``"<x>,<w>-><out>"`` (input first, kernel second, as ``flax.nnx.Einsum`` and tunix's
  ``Einsum`` call ``jnp.einsum``; ``...`` allowed in ``x`` and ``out``); ``None`` for ``nnx.Linear``
  (``(..., in) @ (in, out)``). ``contracted``: the kernel's letters summed with ``x`` (rows, in kernel
  order); ``free``: its letters that reach the output (cols, in kernel order). A kernel ``(D, N, H)`` of
  ``"BTD,DNH->BTNH"`` is the ``D x (N*H)`` matrix; ``(N, H, D)`` of ``"BTNH,NHD->BTD"`` is ``(N*H) x D``.
  """
  equation: Optional[str]
  kernel_shape: tuple
  contracted: str = ""
  free: str = ""

  @property
  def rows(self) -> int:
    return self.kernel_shape[0] if self.equation is None else math.prod(self._dims(self.contracted))

  @property
  def cols(self) -> int:
    return self.kernel_shape[1] if self.equation is None else math.prod(self._dims(self.free))

  def _parts(self) -> tuple[str, str, str]:
    lhs, out = self.equation.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    return xs, ws, out

  def _dims(self, letters: str) -> tuple:
    ws = self._parts()[1]
    return tuple(self.kernel_shape[ws.index(c)] for c in letters)

  @property
  def free_shape(self) -> tuple:
    """The kernel's output axes (``cols`` unflattened), in kernel order."""
    return self._dims(self.free)

  def _batch(self) -> tuple[str, str]:
    """``("..." or "", the input's batch letters)``: the axes ``x`` keeps (all but the contracted ones)."""
    xs = self._parts()[0]
    return ("..." if "..." in xs else ""), "".join(c for c in xs.replace("...", "") if c not in self.contracted)

  def matrix(self, kernel: jax.Array) -> jax.Array:
    """The kernel ``kernel_shape`` as the ``(rows, cols)`` matrix."""
    if self.equation is None:
      return kernel
    ws = self._parts()[1]
    return jnp.einsum(f"{ws}->{self.contracted}{self.free}", kernel).reshape(self.rows, self.cols)

  def flatten_input(self, x: jax.Array) -> jax.Array:
    """``x`` -> ``(..., rows)``: the batch axes first (in ``x``'s order), the contracted ones flattened."""
    if self.equation is None:
      return x
    ell, batch = self._batch()
    y = jnp.einsum(f"{self._parts()[0]}->{ell}{batch}{self.contracted}", x)
    return y.reshape(y.shape[:y.ndim - len(self.contracted)] + (self.rows,))

  def unflatten_output(self, y: jax.Array) -> jax.Array:
    """``(..., cols)`` (batch axes as :meth:`flatten_input` left them) -> the einsum's output layout."""
    if self.equation is None:
      return y
    ell, batch = self._batch()
    y = y.reshape(y.shape[:-1] + self.free_shape)
    return jnp.einsum(f"{ell}{batch}{self.free}->{self._parts()[2]}", y)


def map_spec(equation: str, kernel_shape: tuple) -> MapSpec:
  """The :class:`MapSpec` of ``jnp.einsum(equation, x, kernel)``.

  Raises:
    ValueError: saying why, when the einsum is not a linear map of ``x`` by the kernel's matrix:
      a letter repeated in one operand, a kernel letter shared with both ``x`` and the output (a batched
      contraction such as per-head weights), a letter summed inside one operand, an output letter from
      neither operand, or a kernel whose rank does not match its subscripts.
  """
  eq = equation.replace(" ", "")
  if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
    raise ValueError(f"einsum {equation!r}: expected two operands and one output ('<x>,<w>-><out>')")
  lhs, out = eq.split("->")
  xs, ws = lhs.split(",")
  if "..." in ws:
    raise ValueError(f"einsum {equation!r}: the kernel's subscripts cannot hold '...'")
  if len(ws) != len(kernel_shape):
    raise ValueError(f"einsum {equation!r}: kernel subscripts {ws!r} do not match the kernel shape "
                     f"{tuple(kernel_shape)}")
  x_letters, o_letters = xs.replace("...", ""), out.replace("...", "")
  for name, s in (("input", x_letters), ("kernel", ws), ("output", o_letters)):
    if len(set(s)) != len(s):
      raise ValueError(f"einsum {equation!r}: a letter repeats in the {name}'s subscripts (a trace or diagonal)")
  if ("..." in xs) != ("..." in out):
    raise ValueError(f"einsum {equation!r}: '...' must appear in both the input and the output")
  shared = [c for c in ws if c in x_letters and c in o_letters]
  if shared:
    raise ValueError(f"einsum {equation!r}: kernel letters {''.join(shared)!r} are in both the input and the output "
                     "(a batched contraction, e.g. per-head weights), not one matrix product")
  contracted = "".join(c for c in ws if c in x_letters)
  free = "".join(c for c in ws if c in o_letters)
  lonely = [c for c in ws if c not in contracted and c not in free] + \
           [c for c in x_letters if c not in ws and c not in o_letters]
  if lonely:
    raise ValueError(f"einsum {equation!r}: letters {''.join(lonely)!r} are summed inside one operand")
  orphan = [c for c in o_letters if c not in x_letters and c not in ws]
  if orphan or not contracted or not free:
    raise ValueError(f"einsum {equation!r}: not a map from the input's contracted axes to the kernel's free axes")
  return MapSpec(eq, tuple(int(d) for d in kernel_shape), contracted, free)


# --- the canonical linear module -------------------------------------------------------------------------


class LinearMap(nnx.Module):
  """A linear map ``y = x W + b`` as the library stores it, dense or factored.

  Its parameters are those of one node of the canonical tree: ``kernel (rows, cols)`` (dense),
  or ``left (rows, k)``, ``right (k, cols)`` and, in training form, ``s (k,)`` with the selection
  rule's parameters (SoftLM ``alpha``, LLRC ``mask_logits``); ``bias (cols,)`` optional. ``spec``
  maps the original input / output layout (:class:`MapSpec`). Factored layers compute
  :func:`softlm_jax.factored_apply` with ``scale = singular_scale(params, cfg)``; every call goes
  through the installed interceptors first (:func:`softlm_jax.hooks.run`).

  Args:
    spec: the layout.
    params: ``{name: array}`` as above.
    path: names from the model's root (what interceptors and selection regexes see).
    cfg: the config a training-form layer's scale uses outside :func:`softlm_jax.intercept`.
    dtype / precision: as the replaced module's (None: the input's dtype, default precision).
  """

  def __init__(self, spec: MapSpec, params: Mapping[str, Any], *, path: tuple, cfg: Optional[CompressionConfig] = None,
               dtype: Any = None, precision: Any = None):
    self.spec = spec
    self.path = tuple(str(p) for p in path)
    self.cfg = cfg
    self.dtype = dtype
    self.precision = precision
    self.names = tuple(sorted(params))
    for k, v in params.items():
      setattr(self, k, nnx.Param(v))

  def variables(self) -> dict:
    return {k: getattr(self, k).get_value() for k in self.names}

  def _compute(self, x: jax.Array) -> jax.Array:
    p = self.variables()
    bias = p.get("bias")
    if "kernel" in p:
      kernel = p["kernel"]
      if self.dtype is not None:
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        bias = None if bias is None else bias.astype(self.dtype)
      y = jnp.matmul(x, kernel, precision=self.precision)
      return y if bias is None else y + bias
    scale = singular_scale(p, self.cfg or CompressionConfig()) if "s" in p else None
    return factored_apply(x, p["left"], p["right"], scale, bias, precision=self.precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    x2 = self.spec.flatten_input(x)
    view = hooks.ModuleView(self.path, self.variables(), "in_out", ("LinearMap",), self.dtype, self.precision)
    y2 = hooks.run(view, self._compute, (x2,), {})
    return self.spec.unflatten_output(y2)


# --- surgery ---------------------------------------------------------------------------------------------


def _einsum_kernel(module: nnx.Module) -> Optional[tuple[str, str, Any, Any]]:
  """``(equation, kernel attribute, kernel, bias)`` of an einsum module (an ``einsum_str`` attribute and
  one kernel parameter ``kernel`` or ``w``), else None."""
  eq = getattr(module, "einsum_str", None)
  if not isinstance(eq, str):
    return None
  for name in ("kernel", "w"):
    var = getattr(module, name, None)
    if isinstance(var, nnx.Variable) and var.get_value() is not None:
      bias = getattr(module, "bias", None)
      return eq, name, var.get_value(), (bias.get_value() if isinstance(bias, nnx.Variable) else None)
  return None


def _linear_node(module: nnx.Module, path: tuple) -> tuple[Optional[MapSpec], Optional[dict], Optional[str]]:
  """``(spec, params, None)`` for a linear module the library can factor, ``(None, None, why)`` for an
  einsum it cannot, ``(None, None, None)`` for any other module."""
  if isinstance(module, nnx.Linear):
    p = {"kernel": module.kernel.get_value()}
    if getattr(module, "bias", None) is not None and isinstance(module.bias, nnx.Variable) \
            and module.bias.get_value() is not None:
      p["bias"] = module.bias.get_value()
    return MapSpec(None, tuple(np.shape(p["kernel"]))), p, None
  found = _einsum_kernel(module)
  if found is None:
    return None, None, None
  eq, _, kernel, bias = found
  try:
    spec = map_spec(eq, np.shape(kernel))
  except ValueError as e:
    return None, None, str(e)
  abstract = isinstance(kernel, jax.ShapeDtypeStruct)  # an abstract module (nnx.eval_shape): shapes only
  p = {"kernel": jax.ShapeDtypeStruct((spec.rows, spec.cols), kernel.dtype) if abstract else spec.matrix(kernel)}
  if bias is not None:
    out = spec._parts()[2].replace("...", "")
    if tuple(np.shape(bias)) != spec.free_shape or not out.endswith(spec.free):
      return None, None, (f"einsum {eq!r}: bias of shape {tuple(np.shape(bias))} is not over the output's "
                          f"trailing kernel axes {spec.free!r}")
    p["bias"] = (jax.ShapeDtypeStruct((spec.cols,), bias.dtype) if isinstance(bias, jax.ShapeDtypeStruct)
                 else jnp.reshape(bias, (spec.cols,)))
  return spec, p, None


@functools.lru_cache(maxsize=None)
def _hooked_class(cls: type) -> type:
  """``cls`` with ``__call__`` routed through the interceptors (one subclass per class, cached, so that
  graph definitions of adapted models compare equal)."""
  names = tuple(c.__name__ for c in cls.__mro__)
  if getattr(cls, HOMOGENEOUS_ATTRIBUTE, False):
    names += ("HomogeneousBlock",)

  def __call__(self, *args, **kwargs):
    view = hooks.ModuleView(tuple(self.softlm_path), {}, None, names)
    return hooks.run(view, functools.partial(cls.__call__, self), args, kwargs)

  return type(cls)(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "_softlm_base": cls})


def _set_child(root: nnx.Module, path: tuple, value: Any) -> None:
  parent = root
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _modules(model: nnx.Module) -> list[tuple[tuple, Any]]:
  return [(tuple(p), m) for p, m in nnx.iter_modules(model)]


def adapt(model: nnx.Module, *, cfg: Optional[CompressionConfig] = None) -> tuple[nnx.Module, dict]:
  """The canonical form of ``model`` (module docstring, step 1) and the einsums left alone.

  Returns ``(canonical module, {path: why})``. The input module is not modified (its arrays are
  shared, not copied). A module that is already canonical is returned as a copy. ``cfg`` (optional):
  only the einsums it would select are reported.
  """
  graphdef, state = nnx.split(model)
  m = nnx.merge(graphdef, state)
  skipped: dict[str, str] = {}
  for path, mod in _modules(m):
    if not path or isinstance(mod, LinearMap):
      continue
    spec, params, why = _linear_node(mod, path)
    name = tree.join(path)
    if why is not None:
      if cfg is None or cfg.matches(name):
        skipped[name] = why
      continue
    if spec is not None:
      _set_child(m, path, LinearMap(spec, params, path=path, dtype=getattr(mod, "dtype", None),
                                    precision=getattr(mod, "precision", None)))
  for path, mod in _modules(m):
    name = tree.join(path)
    if path and block_path(name) == name and not hasattr(type(mod), "_softlm_base"):
      mod.softlm_path = tuple(str(p) for p in path)
      mod.__class__ = _hooked_class(type(mod))
  return m, skipped


def _pure(x: Any) -> Any:
  """An nnx state's pure dict with string keys (``0`` -> ``"0"``)."""
  if isinstance(x, Mapping):
    return {str(k): _pure(v) for k, v in x.items()}
  return x


def _restore_keys(template: Mapping, params: Mapping) -> dict:
  """``params`` (string keys) with the key types of ``template`` (a state's pure dict)."""
  out = {}
  for k, v in template.items():
    p = params[str(k)]
    out[k] = _restore_keys(v, p) if isinstance(v, Mapping) else p
  return out


class NNXModel:
  """The pipeline's handle on an NNX model (module docstring, step 2).

  Args:
    module: an ``nnx.Module`` (adapted here if it is not yet canonical).
    cfg: reports the einsums this config would select but cannot factor (:attr:`skipped`).
    call: ``call(module, inputs)`` -> the model's output (default ``module(inputs)``).

  Attributes:
    config: the module's ``config`` attribute (None if it has none).
    params: the canonical tree of the module's parameters (plain dicts, string keys; shapes only
      when ``module`` is abstract, e.g. built under ``nnx.eval_shape`` to receive a checkpoint's arrays).
    abstract: whether ``params`` holds shapes only.
    skipped: ``{path: why}`` of the einsums left as they are.
  """

  def __init__(self, module: nnx.Module, *, cfg: Optional[CompressionConfig] = None,
               call: Optional[Callable[[nnx.Module, Any], Any]] = None):
    self.config = getattr(module, "config", None)
    canonical, self.skipped = adapt(module, cfg=cfg)
    self.graphdef, state = nnx.split(canonical)
    self.params = _pure(state.to_pure_dict())
    self._abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), state)
    self.abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(self.params))
    self._abstract_pure = self._abstract.to_pure_dict()
    self.call = call or (lambda m, x: m(x))
    self._structures: dict[tuple, tuple] = {}
    self._maps: Optional[dict] = None

  def linear_maps(self) -> dict[str, LinearMap]:
    """``{path: LinearMap}`` of the canonical module (abstract: shapes only; built once)."""
    if self._maps is None:
      m = nnx.merge(self.graphdef, self._abstract)
      self._maps = {tree.join(p): mod for p, mod in _modules(m) if isinstance(mod, LinearMap)}
    return self._maps

  def _structure(self, params: Mapping, cfg: Optional[CompressionConfig]) -> tuple:
    """``(graphdef, abstract state)`` of the module holding ``params``' parameters (cached by which
    layers hold which parameter names, and ``cfg``)."""
    maps = self.linear_maps()
    changed = []
    for name, lm in maps.items():
      node = params
      for k in name.split("/"):
        node = node[k]
      keys = tuple(sorted(node))
      if keys != lm.names or (cfg is not None and "left" in keys):
        changed.append((name, keys, tuple((k, tuple(np.shape(node[k])), jnp.result_type(node[k])) for k in keys)))
    sig = (tuple((n, k) for n, k, _ in changed), cfg)
    if sig not in self._structures:
      m = nnx.merge(self.graphdef, self._abstract)
      for name, keys, shapes in changed:
        lm = maps[name]
        abstract = {k: jax.ShapeDtypeStruct(s, d) for k, s, d in shapes}
        path = tuple(int(p) if isinstance(q, int) else p for p, q in zip(name.split("/"), self._key_types(name)))
        _set_child(m, path, LinearMap(lm.spec, abstract, path=lm.path, cfg=cfg, dtype=lm.dtype, precision=lm.precision))
      graphdef, state = nnx.split(m)
      self._structures[sig] = (graphdef, state)
    return self._structures[sig]

  def _key_types(self, name: str) -> list:
    """For each part of ``name``, the key as the state stores it (int list indices)."""
    out, node = [], self._abstract_pure
    for part in name.split("/"):
      key = next(k for k in node if str(k) == part)
      out.append(key)
      node = node[key]
    return out

  def module_for(self, params: Mapping, cfg: Optional[CompressionConfig] = None) -> nnx.Module:
    """An ``nnx.Module`` holding ``params`` (any tree of this model: dense, training form, exported).

    ``cfg``: stored in the factored layers for their scale when called outside
    :func:`softlm_jax.intercept` (None: the default config; exported layers need none). Works on traced
    ``params`` too (inside ``jax.jit``).
    """
    graphdef, abstract = self._structure(params, cfg)
    state = jax.tree.map(lambda a: a, abstract)
    state.replace_by_pure_dict(_restore_keys(state.to_pure_dict(), params))
    return nnx.merge(graphdef, state)

  def apply(self, params: Mapping, inputs: Any) -> Any:
    """The model's output on ``inputs`` with ``params`` (a pure function of both)."""
    return self.call(self.module_for(params), inputs)


def params_of(module: nnx.Module) -> dict:
  """The canonical tree of an adapted module's parameters (plain dicts, string keys)."""
  return _pure(nnx.state(module, nnx.Param).to_pure_dict())
