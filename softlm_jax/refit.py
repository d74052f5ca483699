"""Calibration-only block refit: each compressed block fit to the dense block's output, before any fine-tuning.

For each block, in model order, Adam trains that block's factors (``left``, ``right``) and the biases
of its factored layers to minimise the relative squared error between the compressed block's output
and the dense block's output on the calibration tokens (``RefitConfig.loss="total"``, the default)::

  L_i = sum_tokens ||block_i^c(h^in) - block_i^f(h^f)||^2 / sum_tokens ||block_i^f(h^f)||^2

or each token's error relative to its own norm, averaged (``loss="token"``, :func:`softlm_jax.losses.block_loss`). On
SmolLM2 the attention sink (position 0) holds 90-99.5% of the hidden states' energy in blocks 12-27, so
``"total"`` is mostly that one token's error; yet both give the same perplexity after the refit at CR 0.5
(BENCHMARKS.md#ablations), so the default stays the sums' ratio.

``h^f`` is the dense model's hidden state at the block's input (the targets are the dense block's
outputs on it); ``h^in`` is, with ``RefitConfig.inputs="compressed"`` (the default), the hidden state
of the compressed model with every earlier block already refit, so a block also learns to undo the
error it receives; with ``"dense"`` it is ``h^f`` (a purely local fit). Both lower every block's held-out
error on the tiny test model (``tests/test_refit.py``). The defaults are ``"compressed"``, ``steps=32``
and ``lr=3e-4``; the ``lm`` preset refits at ``lr=1e-3`` (``TrainConfig.refit_lr``), which gives the
lower perplexity on SmolLM2 at CR 0.2, 0.3 and 0.5 (BENCHMARKS.md#ablations). No labels are used. Blocks run
alone on cached hidden states (:class:`softlm_jax.blocks.BlockRunner`), so a step costs one block's
forward and backward pass, about 1/30 of the model's for SmolLM2.

The tree is an **exported** one (:func:`softlm_jax.export_params` or :func:`softlm_jax.static_svd`:
plain ``left (rows, r)`` / ``right (r, cols)`` factors, or kernels where a layer is kept dense). The
factor pairs are balanced first (:func:`softlm_jax.svd.balance`: the same kernels; Adam's steps
are then of the same relative size on both sides), and no shape changes: every rank, and so the
parameter count, is exactly as given. Norms, dense-kept kernels and everything outside the blocks
are left as they are.

A held-out guard (``RefitConfig.holdout = H > 0``): the last ``H`` calibration batches are never
trained on; a block's refit is kept only if it lowers that block's error on them (same inputs and error
measure as the training), otherwise the block keeps its starting factors. A refit that overfits its
steps' few windows (on SmolLM2 from 512 calibration windows, 32 steps see 128 of them: the refit raised
the perplexity, BENCHMARKS.md#ablations) then cannot make a block worse on data it has not seen.

Resumable: with ``ckpt_dir`` each finished block is written atomically to ``block_<i>.npz``; a rerun
loads the finished blocks and continues with the next, giving bit-identical parameters. The files record
the config and a fingerprint of the calibration batches: a rerun on other calibration data refuses them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from softlm_jax import files, shard, tree
from softlm_jax.blocks import BlockRunner, get_subtree, with_subtree
from softlm_jax.losses import block_error_sums, block_loss
from softlm_jax.propagate import unpack_calibration
from softlm_jax.svd import balance

INPUTS = ("compressed", "dense")
#: the refit's error measure: ``"total"`` (the summed squared error relative to the summed target norm)
#: or ``"token"`` (each token's squared error relative to its own target norm, averaged over tokens)
LOSSES = ("total", "token")


@dataclasses.dataclass(frozen=True)
class RefitConfig:
  """How each block is refit.

  Attributes:
    steps: Adam steps per block; each step takes one calibration batch, cycling through them in order.
    lr: Adam's learning rate.
    inputs: ``"compressed"`` (the compressed model's hidden states, earlier blocks refit) or
      ``"dense"`` (the dense model's) as the compressed block's input; the targets are always the dense
      block's outputs on the dense inputs.
    loss: ``"total"`` (the default) or ``"token"``, see :func:`softlm_jax.losses.block_loss`.
    b1, b2: Adam's moment decays.
    holdout: the last ``holdout`` calibration batches are held out of the steps; a block's refit is
      kept only if it lowers the block's error on them (0: no guard, every batch is trained on).
  """

  steps: int = 32
  lr: float = 3e-4
  inputs: str = "compressed"
  loss: str = "total"
  b1: float = 0.9
  b2: float = 0.999
  holdout: int = 0

  def __post_init__(self):
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
      raise ValueError(f"RefitConfig.steps must be an int >= 0, got {self.steps!r}")
    if not self.lr > 0:
      raise ValueError(f"RefitConfig.lr must be > 0, got {self.lr!r}")
    if self.inputs not in INPUTS:
      raise ValueError(f"RefitConfig.inputs must be one of {INPUTS}, got {self.inputs!r}")
    if self.loss not in LOSSES:
      raise ValueError(f"RefitConfig.loss must be one of {LOSSES}, got {self.loss!r}")
    if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
      raise ValueError(f"RefitConfig.holdout must be an int >= 0, got {self.holdout!r}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"RefitConfig.b1, b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")


def split_block(block: Mapping, path: str = "") -> tuple[dict, dict]:
  """``(trainable, frozen)`` flat dicts of a block's leaves: ``left``, ``right`` and ``bias`` of each
  factored (exported) module are trainable; everything else is frozen.

  Raises:
    ValueError: naming the layer, for a training-form layer (``s`` / ``alpha`` / ``mask_logits``).
  """
  trainable, frozen = {}, {}
  for mpath, node in tree.iter_modules(block):
    name = tree.join(mpath)
    factored = tree.is_factored(node)
    if factored and any(k in node for k in ("s", "alpha", "mask_logits")):
      raise ValueError(f"layer '{path}/{name}': a training-form layer (keys {sorted(node)}); the refit takes an "
                       "exported tree: softlm_jax.export_params(params, cfg) or softlm_jax.static_svd(...)")
    for k, v in node.items():
      if isinstance(v, Mapping):
        continue
      key = f"{name}/{k}" if name else k
      (trainable if factored and k in ("left", "right", "bias") else frozen)[key] = v
  return trainable, frozen


def _balanced(block: Mapping) -> dict:
  def fix(_, node):
    if not tree.is_factored(node):
      return node
    left, right = balance(np.asarray(node["left"], np.float32), np.asarray(node["right"], np.float32))
    return {**node, "left": jnp.asarray(left, node["left"].dtype), "right": jnp.asarray(right, node["right"].dtype)}
  return tree.map_modules(block, fix)


class _Streams:
  """The calibration set's hidden states at the current block's input, dense and compressed.

  With a ``mesh`` the batches and token weights are split along its ``data`` axis
  (:func:`softlm_jax.shard.shard_batch`) and the dense tree is placed by :func:`softlm_jax.shard.shard_tree`,
  so every block runs data-parallel and the hidden states stay on the devices."""

  def __init__(self, apply_fn, dense, batches, mask_fn, mesh=None):
    self.runner = BlockRunner(apply_fn, dense, batches[0])
    self.mesh = mesh
    weights = [None if mask_fn is None else np.asarray(mask_fn(b), np.float32) for b in batches]
    if mesh is None:
      dense, weights = jax.tree.map(jnp.asarray, dense), [None if w is None else jnp.asarray(w) for w in weights]
    else:
      dense = shard.shard_tree(dense, mesh)
      batches = [shard.shard_batch(b, mesh) for b in batches]
      weights = [None if w is None else shard.shard_batch(w, mesh) for w in weights]
    self.dense, self.batches, self.weights = dense, batches, weights
    self.h_f = [self.runner.embed(dense, b) for b in batches]
    self.h_c = list(self.h_f)
    self.error_sums = {loss: shard.jit_replicated(functools.partial(block_error_sums, loss=loss), mesh)
                       for loss in LOSSES}

  def place_block(self, block: Mapping) -> Mapping:
    """A block's parameters where its jitted steps take them: replicated on the mesh (as they are without one)."""
    return block if self.mesh is None else shard.replicate(block, self.mesh)

  def dense_outputs(self, blk):
    t = self.runner.place(self.dense, blk, get_subtree(self.dense, blk))
    return [self.runner.run(t, blk, h, b)[0] for h, b in zip(self.h_f, self.batches)]

  def compressed_outputs(self, blk, block_params, inputs):
    t = self.runner.place(self.dense, blk, self.place_block(block_params))
    src = self.h_c if inputs == "compressed" else self.h_f
    return [self.runner.run(t, blk, h, b)[0] for h, b in zip(src, self.batches)]


def fingerprint(batches) -> str:
  """A sha1 of the calibration batches' leaves (values, shapes and dtypes), in order."""
  h = hashlib.sha1()
  for b in batches:
    for leaf in jax.tree.leaves(b):
      a = np.asarray(leaf)
      h.update(f"{a.shape}{a.dtype}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _meta(config: RefitConfig, blk: str, calib: str) -> str:
  return json.dumps({"block": blk, "config": dataclasses.asdict(config), "calibration": calib}, sort_keys=True)


def _save_block(path: str, flat: Mapping, meta: str, info: Mapping) -> None:
  buf = io.BytesIO()
  np.savez(buf, __meta__=np.asarray(meta), __info__=np.asarray(json.dumps(dict(info))),
           **{k: np.asarray(v) for k, v in flat.items()})
  files.atomic_write(path, buf.getvalue())


def _load_block(path: str, meta: str, like: Mapping) -> dict:
  with np.load(path) as z:
    got = str(z["__meta__"])
    if got != meta:
      raise ValueError(f"refit checkpoint {path} was written for {got}, not {meta}: use another ckpt_dir or "
                       "delete it")
    info = json.loads(str(z["__info__"])) if "__info__" in z.files else {}
    flat = {k: z[k] for k in z.files if k not in ("__meta__", "__info__")}
  if set(flat) != set(like) or any(np.shape(flat[k]) != np.shape(like[k]) for k in like):
    raise ValueError(f"refit checkpoint {path} does not match the block's parameters (keys or shapes differ)")
  return {k: jnp.asarray(flat[k], like[k].dtype) for k in like}, info


def refit_blocks(dense_params: Mapping, params: Mapping, calibration: Any, config: RefitConfig = RefitConfig(), *,
                 heldout: Optional[list] = None, ckpt_dir: Optional[str] = None, progress: bool = True,
                 on_block: Optional[Callable[[int, str, dict], None]] = None) -> dict:
  """Refits every block of an exported tree to the dense model's block outputs (module docstring).

  Args:
    dense_params: the dense tree (the targets).
    params: the exported compressed tree of the same model (same block paths).
    calibration: ``apply_fn``, ``batches``, ``mask_fn`` (an object with those attributes or a tuple), as
      :func:`softlm_jax.propagate.propagated_factors`; ``mask_fn`` weights the loss's tokens. With a
      ``mesh`` attribute (a :class:`softlm_jax.Calibration` built with ``mesh=``) the refit runs
      data-parallel: each batch split along ``data``, the dense tree placed as training places it, the
      block's parameters and Adam state replicated and its gradient summed across ``data`` by XLA. Every
      process passes the same global batches; the result is the same as on one device up to the sums' order.
    config: :class:`RefitConfig`.
    heldout: the guard's batches (model inputs, as the calibration batches), never trained on: a block's
      refit is kept only if it lowers that block's error on them. None: the last ``config.holdout``
      calibration batches are held out instead (0: no guard).
    ckpt_dir: write each finished block there (atomic) and resume from it.
    progress: a tqdm bar over all steps.
    on_block: called as ``on_block(index, block path, info)`` after each block (when it is saved), with
      ``info`` ``{"loss_first", "loss_last"}`` of its steps and, under a guard, ``{"heldout_before",
      "heldout_after", "kept"}`` (a block resumed from ``ckpt_dir`` reports the same as when it ran).

  Returns:
    ``params`` with each block's factors and factored-layer biases refit (balanced pairs), as plain
    dicts; every leaf keeps its shape and dtype.
  """
  apply_fn, batches, mask_fn = unpack_calibration(calibration)
  if heldout:
    batches, n_held = batches + list(heldout), len(heldout)
  else:
    n_held = config.holdout
  nb = len(batches) - n_held
  if nb < 1 and config.steps:
    raise ValueError(f"RefitConfig.holdout={config.holdout} holds out every one of the {len(batches)} calibration "
                     "batches: nothing is left to train on (use fewer held-out batches or more calibration data)")
  held = list(range(nb, len(batches)))
  calib_id = fingerprint(batches)  # of the host batches, before any placement
  mesh = getattr(calibration, "mesh", None)
  params = tree.map_modules(jax.tree.map(jnp.asarray, params), lambda _, n: n)
  streams = _Streams(apply_fn, dense_params, batches, mask_fn, mesh)
  runner, dense_params, batches = streams.runner, streams.dense, streams.batches
  if ckpt_dir:
    os.makedirs(ckpt_dir, exist_ok=True)
  tx = optax.adam(config.lr, b1=config.b1, b2=config.b2)
  bar = None
  if progress:
    bar = tqdm(total=len(runner.blocks) * config.steps, desc="block refit", dynamic_ncols=True, mininterval=2.0)

  def make_step(blk):
    def loss_fn(trainable, frozen, h, target, batch, w):
      block = tree.unflatten({**frozen, **trainable})
      y, _ = runner.run(runner.place(dense_params, blk, block), blk, h, batch)
      return block_loss(y, target, w, config.loss)

    def step(trainable, opt_state, frozen, h, target, batch, w):
      loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, h, target, batch, w)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss
    # on a mesh: the rows split along data, the block's gradient summed across it, its state replicated
    return shard.jit_replicated(step, mesh)

  steps_fns: dict = {}
  for i, blk in enumerate(runner.blocks):
    block = get_subtree(params, blk)
    targets = streams.dense_outputs(blk)
    path = os.path.join(ckpt_dir, f"block_{i:03d}.npz") if ckpt_dir else None
    meta = _meta(config, blk, calib_id)
    trainable, frozen = split_block(block, blk)
    info: dict = {}
    if path and os.path.exists(path):
      trainable, info = _load_block(path, meta, split_block(_balanced(block), blk)[0])
      if bar is not None:
        bar.update(config.steps)
    else:
      if trainable and config.steps:
        trainable, frozen = streams.place_block(split_block(_balanced(block), blk))
        key = runner.slot(blk) if runner.homogeneous else blk
        if key not in steps_fns:  # one compiled step for every block when they run at the same slot
          steps_fns[key] = make_step(blk)
        step = steps_fns[key]
        opt_state = tx.init(trainable)
        src = streams.h_c if config.inputs == "compressed" else streams.h_f
        losses = []
        for t in range(config.steps):
          b = t % nb
          trainable, opt_state, loss = step(trainable, opt_state, frozen, src[b], targets[b], batches[b],
                                            streams.weights[b])
          losses.append(float(loss))
          if bar is not None:
            bar.update(1)
            bar.set_postfix(block=i, loss=f"{losses[-1]:.3g}")
        info = {"loss_first": losses[0], "loss_last": losses[-1]}
        if held:
          start = streams.place_block(split_block(_balanced(block), blk)[0])
          before = _held_error(streams, blk, tree.unflatten({**frozen, **start}), held, targets, config)
          after = _held_error(streams, blk, tree.unflatten({**frozen, **trainable}), held, targets, config)
          info.update(heldout_before=before, heldout_after=after, kept=bool(after < before))
          if not after < before:  # the block as it was given, bit for bit (not its balanced pair)
            trainable = split_block(block, blk)[0]
      elif bar is not None:
        bar.update(config.steps)
      if path:
        _save_block(path, trainable, meta, info)
    new_block = tree.unflatten({**frozen, **trainable})
    params = with_subtree(params, blk, new_block)
    if config.inputs == "compressed":
      streams.h_c = streams.compressed_outputs(blk, new_block, "compressed")
    streams.h_f = targets
    if on_block is not None:
      on_block(i, blk, info)
  if bar is not None:
    bar.close()
  return params


def _held_error(streams: _Streams, blk: str, block: Mapping, held: list, targets: list,
                config: RefitConfig) -> float:
  """The block's error (``config.loss``) over the held-out batches ``held`` against the dense outputs
  ``targets`` (one per calibration batch)."""
  t = streams.runner.place(streams.dense, blk, streams.place_block(block))
  src = streams.h_c if config.inputs == "compressed" else streams.h_f
  d = n = 0.0
  for b in held:
    y = streams.runner.run(t, blk, src[b], streams.batches[b])[0]
    dd, nn_ = streams.error_sums[config.loss](y, targets[b], streams.weights[b])
    d, n = d + float(dd), n + float(nn_)
  return d / max(n, 1e-30)


def block_errors(dense_params: Mapping, params: Mapping, calibration: Any, *, inputs: str = "compressed",
                 loss: str = "total") -> dict[str, float]:
  """``{block path: relative squared output error}`` of ``params``' blocks against the dense blocks on
  the calibration set (:func:`softlm_jax.losses.block_loss`'s measure ``loss`` over all of it) with ``h^in`` the
  compressed model's own hidden states (``inputs="compressed"``) or the dense ones (``"dense"``)."""
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  apply_fn, batches, mask_fn = unpack_calibration(calibration)
  params = jax.tree.map(jnp.asarray, params)
  streams = _Streams(apply_fn, dense_params, batches, mask_fn, getattr(calibration, "mesh", None))
  out = {}
  for blk in streams.runner.blocks:
    targets = streams.dense_outputs(blk)
    ys = streams.compressed_outputs(blk, get_subtree(params, blk), inputs)
    d = n = 0.0
    for y, t, w in zip(ys, targets, streams.weights):
      dd, nn_ = streams.error_sums[loss](y, t, w)
      d, n = d + float(dd), n + float(nn_)
    out[blk] = d / max(n, 1e-30)
    if inputs == "compressed":
      streams.h_c = ys
    streams.h_f = targets
  return out
