"""Running unmodified Flax models on factored parameter trees.

:func:`intercept` wraps ``flax.linen.intercept_methods``: while active, every linear module whose
parameters hold ``left``/``right`` factors (training form from :func:`compress_params` or exported
form from :func:`export_params`) is computed from the factors instead of calling the module's own
``__call__`` (which would look for its ``kernel``). Interception happens at trace time, so under
``jax.jit`` it costs nothing at run time; gradients flow to every factor and threshold.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from softlm_jax.compress import FACTOR_KEYS, singular_scale
from softlm_jax.config import CompressionConfig

#: Module class name -> kernel storage layout. "in_out": y = x @ K (nn.Dense);
#: "out_in": y = x @ K.T (Hugging Face's FlaxConv1D used by GPT-2).
LAYOUTS: dict[str, str] = {"Dense": "in_out", "FlaxConv1D": "out_in"}


def register_layout(module_type: type | str, layout: str) -> None:
  """Declares how a linear module stores its kernel, so its factored form can be intercepted."""
  if layout not in ("in_out", "out_in"):
    raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
  LAYOUTS[module_type if isinstance(module_type, str) else module_type.__name__] = layout


def _layout(module: nn.Module) -> Optional[str]:
  for cls in type(module).__mro__:
    if cls.__name__ in LAYOUTS:
      return LAYOUTS[cls.__name__]
  return None


def factored_apply(x: jax.Array, left: jax.Array, right: jax.Array, scale: Optional[jax.Array],
                   bias: Optional[jax.Array], *, layout: str = "in_out", precision=None) -> jax.Array:
  """``y = x @ W + b`` with ``W`` given as factors.

  Args:
    x: ``(..., in)``.
    left: ``(rows, k)``; right: ``(k, cols)``; the kernel in storage layout is
      ``K = left @ diag(scale) @ right`` (``scale=None`` means ones: exported form).
      ``layout="in_out"``: ``W = K`` (rows = in); ``"out_in"``: ``W = K.T`` (rows = out).
    bias: ``(out,)`` or None.

  Returns:
    ``(..., out)``. Cost ``k * (in + out)`` multiply-adds per row of ``x`` instead of ``in * out``.
  """
  if layout == "in_out":
    first, second = left, right
  else:
    first, second = right.T, left.T
  h = jnp.matmul(x, first, precision=precision)
  if scale is not None:
    h = h * scale
  y = jnp.matmul(h, second, precision=precision)
  return y if bias is None else y + bias


def make_interceptor(cfg: Optional[CompressionConfig] = None) -> Callable:
  """The ``intercept_methods`` interceptor (see :func:`intercept`)."""
  cfg = cfg or CompressionConfig()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None
        or not module.has_variable("params", "left")):
      return next_fun(*args, **kwargs)
    layout = _layout(module)
    path = "/".join(module.scope.path)
    if layout is None:
      raise TypeError(f"layer '{path}': module type {type(module).__name__} holds factored params but "
                      f"softlm_jax does not know its kernel layout; call "
                      f"softlm_jax.register_layout({type(module).__name__}, 'in_out' or 'out_in')")
    layer = {k: module.get_variable("params", k) for k in FACTOR_KEYS
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
                          precision=getattr(module, "precision", None))

  return interceptor


@contextlib.contextmanager
def intercept(cfg: Optional[CompressionConfig] = None):
  """Context under which unmodified Flax models run trees from compress/export/static_svd.

  ``cfg`` supplies the threshold's ``sharpness`` and ``floor`` for training-form trees (default
  config when None); exported trees need none. Example::

    with softlm_jax.intercept(cfg):
      logits = model(input_ids, params=cparams).logits
  """
  with nn.intercept_methods(make_interceptor(cfg)):
    yield
