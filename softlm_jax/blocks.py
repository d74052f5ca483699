"""Running one block of an unmodified Flax model at a time, on cached hidden states.

The propagated decomposition (:mod:`softlm_jax.propagate`) and the block refit
(:mod:`softlm_jax.refit`) work block by block: the hidden states at a block's input are cached for
the calibration set (tokens x hidden, float32; 16k tokens x 576 is 38 MB), the block runs on them
alone, and its output is the next block's input. A full forward pass per step would cost a whole
model each time (120 of them for the four layer groups of SmolLM2's 30 blocks).

No per-family code is needed for this. :class:`BlockRunner` runs the **whole** model function
``apply_fn(params, batch)`` under ``flax.linen.intercept_methods`` with an interceptor that, at the
chosen block's ``__call__``, replaces the block's hidden-state input (its first positional argument,
or ``hidden_states=`` / ``x=``) by the cached array and records the block's output (the first
element when the block returns a tuple, as every HF block and the Mamba port do). Everything before
the block (whose output is then unused) and after it (nothing reads it) is dead code, which XLA
removes under ``jax.jit``: one call costs one block. The block's other arguments (attention mask,
position ids, rotary tables) come from the real forward pass of ``batch``, so they are right by
construction. Inside the block any linear layer's input can be recorded too (the same interception
as :func:`softlm_jax.collect_grams`), and factored layers run through :func:`softlm_jax.intercept`.

Blocks are the modules at paths ``.../(layer|layers|h|block|blocks)/<i>`` (the default selection's
numbered stacks: HF BERT, GPT-2, Llama and the GGUF SmolLM2, the Mamba port). For the families whose
blocks are all alike (:data:`HOMOGENEOUS_BLOCKS`: HF Llama incl. the GGUF SmolLM2, GPT-2, BERT, the
Mamba port), block ``i`` is run *in block 0's place* (its parameters put at block 0's path), so one
compiled function serves every block. Any other family runs each block at its own path: correct, one
compilation per block.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import jax
import numpy as np

from softlm_jax import hooks
from softlm_jax.intercept import intercept, layout_of

#: Block module paths: the default selection's numbered stacks (``config.DEFAULT_INCLUDE``).
BLOCK_RE = re.compile(r"^(.*?(?:^|/)(?:layer|layers|h|blocks?)/\d+)(?:/|$)")

#: Block classes (by name, anywhere in the module's MRO) that are the same function of their
#: parameters at every depth, so any block may run in block 0's place.
HOMOGENEOUS_BLOCKS = ("FlaxLlamaDecoderLayer", "FlaxGPT2Block", "FlaxBertLayer", "MambaBlock", "HomogeneousBlock")
#: An NNX block class says it is homogeneous with a true ``homogeneous_block`` class attribute (its
#: :class:`softlm_jax.hooks.ModuleView` then lists ``"HomogeneousBlock"`` among its class names).
HOMOGENEOUS_ATTRIBUTE = "homogeneous_block"

_HIDDEN_KWARGS = ("hidden_states", "x", "inputs")


def block_path(layer: str) -> Optional[str]:
  """The block a layer path (``'model/layers/3/self_attn/q_proj'``) sits in (``'model/layers/3'``), or None."""
  m = BLOCK_RE.match(layer)
  return m.group(1) if m else None


def get_subtree(params: Mapping, path: str) -> Mapping:
  node = params
  for k in path.split("/"):
    node = node[k]
  return node


def with_subtree(params: Mapping, path: str, value: Mapping) -> dict:
  """A copy of ``params`` (new dicts along ``path`` only, leaves shared) with ``path`` set to ``value``."""
  keys = path.split("/")

  def put(node: Mapping, i: int):
    out = dict(node)
    out[keys[i]] = value if i == len(keys) - 1 else put(node[keys[i]], i + 1)
    return out

  return put(params, 0)


def _hidden_arg(path: str, args: tuple, kwargs: dict):
  if args:
    return args[0], lambda h: ((h,) + tuple(args[1:]), kwargs)
  for k in _HIDDEN_KWARGS:
    if k in kwargs:
      return kwargs[k], lambda h, k=k: (args, {**kwargs, k: h})
  raise TypeError(f"block '{path}' was called without a positional hidden-state argument or one of "
                  f"{_HIDDEN_KWARGS}; got keywords {sorted(kwargs)}")


@contextlib.contextmanager
def _block_io(block: str, record: dict, capture: Sequence[str], h_in=None):
  """Interceptor context: at module ``block``'s call, feed ``h_in`` (if given) as its hidden state and
  record ``record["in"]`` / ``record["out"]``; record ``record[path]`` = the input of each module in
  ``capture`` (first call)."""
  capture = set(capture)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    path = "/".join(module.scope.path)
    if path in capture and path not in record:
      record[path] = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
    if path != block:
      return next_fun(*args, **kwargs)
    x, rebuild = _hidden_arg(path, args, kwargs)
    record["in"] = x
    if h_in is not None:
      if tuple(h_in.shape) != tuple(x.shape):
        raise ValueError(f"block '{path}': cached hidden state has shape {tuple(h_in.shape)}, but this batch's "
                         f"hidden state has shape {tuple(x.shape)}")
      args, kwargs = rebuild(h_in.astype(x.dtype))
    y = next_fun(*args, **kwargs)
    record["out"] = y[0] if isinstance(y, (tuple, list)) else y
    return y

  with hooks.intercept_methods(interceptor):
    yield


class BlockRunner:
  """Runs one block of ``apply_fn(params, batch)`` on a given hidden state (module docstring).

  Args:
    apply_fn: ``apply_fn(params, batch)`` runs the whole model (its output is discarded).
    params: the dense tree (used to find the blocks and, by :meth:`embed`, the first block's inputs).
    example_batch: one batch (the structure of the model's call is traced on it).
    blocks: the block paths to use, in model order; default: every block of ``params`` that holds a
      kernel, ordered as the model calls them.

  Attributes:
    blocks: block paths in call order.
    linears: ``{block: [(layer path, input key, layout)]}``: each linear module (one with a ``kernel``
      or ``left`` param) the block calls, in call order; layers with equal ``input key`` read the
      same array (q/k/v, gate/up).
    homogeneous: whether blocks run in block 0's place (one compilation for all).
  """

  def __init__(self, apply_fn: Callable, params: Mapping, example_batch: Any, *,
               blocks: Optional[Sequence[str]] = None):
    self.apply_fn = apply_fn
    calls: list[tuple] = []  # (block, path, id(input), layout, class MRO names)
    keep: list = []  # the inputs, alive while tracing (their ids stay unique)

    def rec(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and module.scope is not None:
        path = "/".join(module.scope.path)
        names = hooks.class_names(module)
        if block_path(path) is not None:
          is_linear = (module.has_variable("params", "kernel") or module.has_variable("params", "left"))
          x = args[0] if args else next(iter(kwargs.values()), None)
          keep.append(x)
          calls.append((block_path(path), path, id(x), layout_of(module) if is_linear else None, names, is_linear))
      return next_fun(*args, **kwargs)

    with hooks.intercept_methods(rec), intercept():
      # a fresh function: jax caches traces by function, and a cached trace would run no interceptor
      jax.eval_shape(lambda p, b: apply_fn(p, b), params, example_batch)
    order: list[str] = []
    self.linears: dict[str, list] = {}
    classes: dict[str, tuple] = {}
    for blk, path, key, layout, names, is_linear in calls:
      if path == blk:
        classes[blk] = names
        if blk not in order:
          order.append(blk)
      elif is_linear and layout is not None and path not in {p for p, _, _ in self.linears.get(blk, [])}:
        self.linears.setdefault(blk, []).append((path, key, layout))
    keep.clear()
    order = [b for b in order if b in self.linears]
    if blocks is not None:
      missing = [b for b in blocks if b not in order]
      if missing:
        raise ValueError(f"blocks {missing[:4]} were not called by apply_fn (blocks found: {order[:4]}...)")
      order = [b for b in order if b in set(blocks)]
    if not order:
      raise ValueError("apply_fn calls no numbered block (paths like 'model/layers/0', 'transformer/h/0') "
                       "holding a linear layer")
    self.blocks = order
    first = get_subtree(params, order[0])
    shapes0 = jax.tree.map(np.shape, first)
    self.homogeneous = all(
        any(n in HOMOGENEOUS_BLOCKS for n in classes.get(b, ())) and jax.tree.map(np.shape, get_subtree(params, b))
        == shapes0 for b in order)
    self._fns: dict = {}

  # -------------------------------------------------------------------------------------------------

  def slot(self, block: str) -> str:
    """The path block ``block`` runs at (block 0's when :attr:`homogeneous`)."""
    return self.blocks[0] if self.homogeneous else block

  def to_slot(self, block: str, path: str) -> str:
    """A layer path of ``block`` as it reads when the block runs at :meth:`slot`."""
    return self.slot(block) + path[len(block):]

  def place(self, base: Mapping, block: str, block_params: Mapping) -> dict:
    """The tree to run ``block`` with ``block_params``: ``base`` with them at :meth:`slot`."""
    return with_subtree(base, self.slot(block), block_params)

  def _fn(self, key):
    if key not in self._fns:
      slot, capture, want_out, feed = key

      def run(tree, h, batch):
        record: dict = {}
        with _block_io(slot, record, capture, h if feed else None), intercept():
          self.apply_fn(tree, batch)
        if "out" not in record:
          raise ValueError(f"block '{slot}' was not called by apply_fn")
        caps = tuple(record[p] for p in capture)
        return (record["out"] if want_out else None), caps, (record["in"] if not feed else None)

      self._fns[key] = jax.jit(run)
    return self._fns[key]

  def run(self, tree: Mapping, block: str, h: jax.Array, batch: Any, *, capture: Sequence[str] = (),
          output: bool = True):
    """``(block output or None, (input of each layer in capture))`` of block ``block`` fed ``h``.

    Args:
      tree: a full parameter tree holding the block's parameters at :meth:`slot` (:meth:`place`);
        factored layers (left/right) run through :func:`softlm_jax.intercept`.
      h: ``(B, T, hidden)`` the block's hidden-state input.
      batch: the batch ``h`` belongs to (the block's other arguments come from its forward pass).
      capture: layer paths inside the block, at :meth:`slot` (:meth:`to_slot`).
      output: also return the block's output (``False``: only what leads to the captures is computed).
    """
    return self._fn((self.slot(block), tuple(capture), bool(output), True))(tree, h, batch)[:2]

  def embed(self, params: Mapping, batch: Any) -> jax.Array:
    """The first block's hidden-state input for ``batch`` under ``params``."""
    key = (self.blocks[0], (), False, False)
    return self._fn(key)(params, None, batch)[2]


def finite_count(x: jax.Array) -> int:
  return int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))
