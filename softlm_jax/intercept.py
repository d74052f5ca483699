"""Running unmodified Flax models on factored parameter trees.

:func:`intercept` wraps ``flax.linen.intercept_methods``: while active, every linear module whose
parameters hold ``left``/``right`` factors (training form from :func:`compress_params` or exported
form from :func:`export_params`) is computed from the factors instead of calling the module's own
``__call__`` (which would look for its ``kernel``). Interception happens at trace time, so under
``jax.jit`` it costs nothing at run time; gradients flow to every factor and threshold.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from softlm_jax import hooks, rules
from softlm_jax.config import CompressionConfig
from softlm_jax.rules import singular_scale
from softlm_jax.tree import FACTOR_KEYS

#: Module class name -> kernel storage layout. "in_out": y = x @ K (nn.Dense);
#: "out_in": y = x @ K.T (Hugging Face's FlaxConv1D used by GPT-2).
LAYOUTS: dict[str, str] = {"Dense": "in_out", "FlaxConv1D": "out_in"}


def register_layout(module_type: type | str, layout: str) -> None:
  """Declares how a linear module stores its kernel, so its factored form can be intercepted."""
  if layout not in ("in_out", "out_in"):
    raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
  LAYOUTS[module_type if isinstance(module_type, str) else module_type.__name__] = layout


def layout_of(module: nn.Module) -> Optional[str]:
  """The kernel storage layout (:data:`LAYOUTS`) of ``module``'s class or its nearest registered base;
  None for a module type nobody registered. An NNX module's :class:`softlm_jax.hooks.ModuleView` carries
  its own layout."""
  if isinstance(module, hooks.ModuleView):
    return module.layout
  for cls in type(module).__mro__:
    if cls.__name__ in LAYOUTS:
      return LAYOUTS[cls.__name__]
  return None


#: How :func:`factored_apply` computes a layer: ``"factored"`` ``(x @ first) @ second``,
#: ``"merged"`` ``x @ W`` with ``W`` built from the factors in the step, ``"auto"`` the cheaper of the
#: two in FLOPs (decided per layer at trace time from static shapes, see :func:`apply_costs`).
MODES = ("auto", "factored", "merged")

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("softlm_jax_apply_mode", default="auto")


@contextlib.contextmanager
def apply_mode(mode: str):
  """Sets the mode of every factored layer traced inside (benchmarks and tests: e.g. time a jitted
  train step with ``"factored"`` forced against the default ``"auto"``). Takes effect at trace time,
  so wrap the first call (or ``.lower()``) of a jitted function."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


def apply_costs(tokens: int, rows: int, k: int, cols: int) -> dict[str, int]:
  """Multiply-adds of one forward pass of a factored layer, per way of computing it.

  ``factored``: ``tokens * k * (rows + cols)``; ``merged``: ``rows * k * cols`` to build the kernel
  once plus ``tokens * rows * cols`` to apply it. The backward pass costs twice the forward in both
  (``dx``, ``d(first)``, ``d(second)`` resp. ``dx``, ``dW``, then ``dW`` into both factors), so the
  cheaper forward is also the cheaper forward + backward. Merging wins when ``k`` is near full rank
  and ``tokens`` is large compared with ``k`` (training-form layers at ``init_rank="full"``); export
  keeps layers at/above break-even dense, so exported factored layers never merge.
  """
  return {"factored": tokens * k * (rows + cols), "merged": rows * k * cols + tokens * rows * cols}


def factored_apply(x: jax.Array, left: jax.Array, right: jax.Array, scale: Optional[jax.Array],
                   bias: Optional[jax.Array], *, layout: str = "in_out", precision=None,
                   mode: str = "auto") -> jax.Array:
  """``y = x @ W + b`` with ``W`` given as factors.

  Args:
    x: ``(..., in)``.
    left: ``(rows, k)``; right: ``(k, cols)``; the kernel in storage layout is
      ``K = left @ diag(scale) @ right`` (``scale=None`` means ones: exported form).
      ``layout="in_out"``: ``W = K`` (rows = in); ``"out_in"``: ``W = K.T`` (rows = out).
    bias: ``(out,)`` or None.
    mode: one of :data:`MODES`. Both ways give the same function and the same gradients (up to
      float rounding); ``"auto"`` picks the one with fewer FLOPs (:func:`apply_costs`), from static
      shapes, so the choice costs nothing at run time.

  Returns:
    ``(..., out)``. Factored cost ``k * (in + out)`` multiply-adds per row of ``x`` instead of
    ``in * out``.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "auto":
    tokens = math.prod(x.shape[:-1])
    costs = apply_costs(tokens, left.shape[0], left.shape[1], right.shape[1])
    mode = "merged" if costs["merged"] < costs["factored"] else "factored"
  if scale is not None:
    # Scale the (rows, k) factor, not the (tokens, k) activations: the same product and gradients,
    # k * rows multiplies instead of k * tokens, and the backward pass keeps one (tokens, k)
    # residual per layer instead of two (before and after the scale).
    left = left * scale
  if mode == "merged":
    kernel = jnp.matmul(left, right, precision=precision)  # K, storage layout (rows, cols)
    y = jnp.matmul(x, kernel if layout == "in_out" else kernel.T, precision=precision)
  else:
    first, second = (left, right) if layout == "in_out" else (right.T, left.T)
    y = jnp.matmul(jnp.matmul(x, first, precision=precision), second, precision=precision)
  return y if bias is None else y + bias


def make_interceptor(cfg: Optional[CompressionConfig] = None, *, mode: Optional[str] = None) -> Callable:
  """The ``intercept_methods`` interceptor (see :func:`intercept`). ``mode=None``: the mode set by
  :func:`apply_mode` when the layer is traced (default ``"auto"``)."""
  cfg = cfg or CompressionConfig()
  if mode is not None and mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None
        or not module.has_variable("params", "left")):
      return next_fun(*args, **kwargs)
    layout = layout_of(module)
    path = "/".join(module.scope.path)
    if layout is None:
      raise TypeError(f"layer '{path}': module type {type(module).__name__} holds factored params but "
                      f"softlm_jax does not know its kernel layout; call "
                      f"softlm_jax.register_layout({type(module).__name__}, 'in_out' or 'out_in')")
    layer = {k: module.get_variable("params", k) for k in FACTOR_KEYS + rules.selection_keys()
             if module.has_variable("params", k)}
    bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
    scale = singular_scale(layer, cfg) if "s" in layer else None
    x = args[0] if args else kwargs["inputs"]
    dtype = getattr(module, "dtype", None)
    x, left, right, scale, bias = promote_dtype(x, layer["left"], layer["right"], scale, bias, dtype=dtype)
    fan_in = left.shape[0] if layout == "in_out" else right.shape[1]
    if x.shape[-1] != fan_in:
      raise ValueError(f"layer '{path}': input has {x.shape[-1]} features but the factored kernel "
                       f"(left {left.shape}, right {right.shape}, layout {layout}) expects {fan_in}")
    return factored_apply(x, left, right, scale, bias, layout=layout,
                          precision=getattr(module, "precision", None), mode=mode or _MODE.get())

  return interceptor


@contextlib.contextmanager
def intercept(cfg: Optional[CompressionConfig] = None, *, mode: Optional[str] = None):
  """Context under which unmodified Flax models run trees from compress/export/static_svd.

  ``cfg`` supplies the threshold's ``sharpness`` and ``floor`` for training-form trees (default
  config when None); exported trees need none. ``mode`` (see :func:`factored_apply`; default: the
  :func:`apply_mode` in effect, ``"auto"``) is for benchmarks and tests: ``"auto"`` picks the cheaper
  computation per layer. Example::

    with softlm_jax.intercept(cfg):
      logits = model(input_ids, params=cparams).logits
  """
  with hooks.intercept_methods(make_interceptor(cfg, mode=mode)):
    yield
