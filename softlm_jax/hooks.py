"""Method interception for Flax Linen and Flax NNX modules alike.

Every whole-model algorithm of the library (Gram collection, block-by-block runs, factored layers,
benchmarks' skipped layers) is an *interceptor* in the sense of ``flax.linen.intercept_methods``:
``interceptor(next_fun, args, kwargs, context)`` with ``context.module`` and ``context.method_name``.
Linen runs them around every module method. NNX has no such hook, so the NNX modules that the library
builds or adapts (:mod:`softlm_jax.nnx_bridge`: its linear maps and the blocks of an adapted model) call
:func:`run` themselves, with a :class:`ModuleView` as ``context.module``: an object with the small part of
the Linen module interface the interceptors read (``scope.path``, ``has_variable``, ``get_variable``,
``dtype``, ``precision``) plus the kernel layout and the class names.

:func:`intercept_methods` installs an interceptor for both kinds of module at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn

Interceptor = Callable[..., Any]

_STACK: contextvars.ContextVar[tuple] = contextvars.ContextVar("softlm_jax_interceptors", default=())


@dataclasses.dataclass(frozen=True)
class Scope:
  """``scope.path`` of a :class:`ModuleView` (a Linen module's ``scope.path``: names from the root)."""
  path: tuple


@dataclasses.dataclass(frozen=True)
class ModuleView:
  """What an interceptor sees of an NNX module (the Linen module interface it reads).

  Attributes:
    path: names from the root (``("layers", "0", "attn", "q_proj")``).
    variables: ``{name: array}`` of the module's parameters (its ``"params"`` collection).
    layout: ``"in_out"`` (``y = x @ K``) for a linear map, None for any other module.
    class_names: the module's class names, most derived first (``HOMOGENEOUS_BLOCKS`` reads them).
    dtype / precision: the module's computation dtype and matmul precision (None: the inputs').
  """
  path: tuple
  variables: Mapping
  layout: Optional[str] = None
  class_names: tuple = ()
  dtype: Any = None
  precision: Any = None

  @property
  def scope(self) -> Scope:
    return Scope(self.path)

  def has_variable(self, col: str, name: str) -> bool:
    return col == "params" and name in self.variables

  def get_variable(self, col: str, name: str):
    if not self.has_variable(col, name):
      raise KeyError(f"module '{'/'.join(self.path)}' has no {col} variable {name!r}")
    return self.variables[name]


@dataclasses.dataclass(frozen=True)
class Context:
  """``context`` of an NNX interception (``flax.linen.module.InterceptorContext``'s fields)."""
  module: ModuleView
  method_name: str
  orig_method: Callable


def class_names(module: Any) -> tuple:
  """The class names of a Linen module (its MRO) or of an NNX module's :class:`ModuleView`."""
  if isinstance(module, ModuleView):
    return module.class_names
  return tuple(c.__name__ for c in type(module).__mro__)


@contextlib.contextmanager
def intercept_methods(interceptor: Interceptor):
  """``flax.linen.intercept_methods(interceptor)`` that also reaches the library's NNX modules."""
  token = _STACK.set(_STACK.get() + (interceptor,))
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    _STACK.reset(token)


def run(view: ModuleView, fun: Callable, args: tuple, kwargs: dict, method_name: str = "__call__"):
  """Calls ``fun(*args, **kwargs)`` through the installed interceptors, wrapped in the order Linen
  wraps them (``flax.linen.module.run_interceptors``): the innermost is the first installed."""
  context = Context(view, method_name, fun)

  def wrap(interceptor, inner):
    @functools.wraps(inner)
    def wrapped(*a, **k):
      return interceptor(inner, a, k, context)
    return wrapped

  for interceptor in _STACK.get():
    fun = wrap(interceptor, fun)
  return fun(*args, **kwargs)
