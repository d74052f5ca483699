"""Data + FSDP sharding on a ``("data", "fsdp")`` device mesh, with ``jax.sharding`` (no engine of our own).

One rule places every array: :func:`fsdp_spec`. A parameter or optimizer-state leaf is split along
``"fsdp"`` on its largest axis whose size the fsdp axis divides, and replicated when none does; the
selection rules' small leaves (:func:`softlm_jax.rules.replicated_keys`: SoftLM's scalar ``alpha``,
LLRC's ``mask_logits``) are always replicated. Batches are split along ``"data"`` on their leading
axis. The jitted train step (:func:`softlm_jax.train.make_train_step` with ``mesh=``) then works on
*global* arrays: XLA's SPMD partitioner inserts the all-gathers and reductions, so the parameter
count, the budget freeze and the compression loss are computed on the whole model and come out
replicated, the same on every device.

Several hosts: call ``jax.distributed.initialize()`` first on every host; ``jax.devices()`` then
lists all of them and the same code runs on each (every host builds the same global batch from the
step number; :func:`shard_batch` keeps the rows its devices hold).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from softlm_jax import rules

AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``(data, fsdp)`` mesh with axes ``("data", "fsdp")`` over the first ``data * fsdp`` devices.

  Args:
    data: size of the batch axis (data parallelism).
    fsdp: size of the parameter axis (each param / optimizer-state leaf split ``fsdp`` ways).
    devices: default ``jax.devices()`` (all hosts' devices after ``jax.distributed.initialize``).

  Raises:
    ValueError: naming the sizes, when ``data * fsdp`` does not divide the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if int(data) != data or int(fsdp) != fsdp or data < 1 or fsdp < 1:
    raise ValueError(f"mesh sizes must be positive ints, got data={data!r}, fsdp={fsdp!r}")
  size = data * fsdp
  if len(devices) % size:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {size} devices does not divide the {len(devices)} "
                     f"available devices ({devices[0].platform}); pick sizes whose product divides {len(devices)}")
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:size])


def parse_mesh(text: Optional[str]) -> Optional[Mesh]:
  """``"data=2,fsdp=4"`` -> :func:`make_mesh` ``(data=2, fsdp=4)``; None or ``""`` -> None (one device).

  The experiments' ``--mesh`` flag. Missing axes default to 1.
  """
  if not text:
    return None
  sizes = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in AXES or not value.strip().isdigit():
      raise ValueError(f"--mesh expects 'data=D,fsdp=F' (axes {AXES}), got {text!r}")
    sizes[name.strip()] = int(value)
  return make_mesh(**sizes)


def fsdp_spec(path: str, shape: Sequence[int], fsdp: int) -> PartitionSpec:
  """THE sharding rule for a parameter or optimizer-state leaf.

  Args:
    path: the leaf's path, ``"/"``-joined (only its last name is read: the selection rules' replicated
      keys, e.g. ``alpha`` and ``mask_logits``, are replicated, and so are Adam's moments of them,
      which end in the same name).
    shape: the leaf's (global) shape.
    fsdp: size of the mesh's ``"fsdp"`` axis.

  Returns:
    ``PartitionSpec`` with ``"fsdp"`` on the largest axis whose size ``fsdp`` divides (the first
    such axis on ties), ``PartitionSpec()`` (replicated) when no axis divides, for scalars, for
    :func:`softlm_jax.rules.replicated_keys` and when ``fsdp == 1``.
  """
  name = path.rsplit("/", 1)[-1]
  if fsdp == 1 or len(shape) == 0 or name in rules.replicated_keys():
    return PartitionSpec()
  best = None
  for axis, n in enumerate(shape):
    if n >= fsdp and n % fsdp == 0 and (best is None or n > shape[best]):
      best = axis
  if best is None:
    return PartitionSpec()
  return PartitionSpec(*[("fsdp" if a == best else None) for a in range(len(shape))])


def _name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def path_str(keypath) -> str:
  return "/".join(_name(k) for k in keypath)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """``NamedSharding`` for every leaf of a params / optimizer-state tree by :func:`fsdp_spec`.

  Works on arrays, ``jax.ShapeDtypeStruct`` s and tracers (only shapes are read).
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, fsdp_spec(path_str(kp), np.shape(x), fsdp)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def jit_replicated(fn: Any, mesh: Optional[Mesh]) -> Any:
  """``jax.jit(fn)``; with ``mesh``, its outputs replicated on it (so the host can read them on every
  process: statistics summed across ``data`` from batches :func:`shard_batch` split)."""
  return jax.jit(fn) if mesh is None else jax.jit(fn, out_shardings=replicated(mesh))


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """Shardings of a :class:`softlm_jax.train.TrainState`: params and opt_state by :func:`fsdp_spec`,
  ``step`` and ``rng`` replicated."""
  return type(state)(step=replicated(mesh), params=tree_shardings(state.params, mesh),
                     opt_state=tree_shardings(state.opt_state, mesh), rng=replicated(mesh))


def shard_tree(tree: Any, mesh: Mesh) -> Any:
  """``tree`` placed on ``mesh`` by :func:`fsdp_spec` (``jax.device_put``; a no-op for leaves that are
  already placed so)."""
  return jax.device_put(tree, tree_shardings(tree, mesh))


def shard_state(state: Any, mesh: Mesh) -> Any:
  """A TrainState placed on ``mesh`` (:func:`state_shardings`)."""
  return jax.device_put(state, state_shardings(state, mesh))


#: Batch keys that hold parameters, not examples: :func:`softlm_jax.train.distill_task`'s teacher tree.
PARAM_BATCH_KEYS = ("teacher",)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """Every batch leaf split on its leading axis along ``"data"`` (the ``"teacher"`` tree by
  :func:`fsdp_spec`, scalars replicated).

  Raises:
    ValueError: naming the leaf and sizes, when a leading axis is not divisible by the data axis.
  """
  data = mesh.shape["data"]

  def one(kp, x):
    path = path_str(kp)
    if path.split("/", 1)[0] in PARAM_BATCH_KEYS:
      return NamedSharding(mesh, fsdp_spec(path, np.shape(x), mesh.shape["fsdp"]))
    shape = np.shape(x)
    if len(shape) == 0:
      return replicated(mesh)
    if shape[0] % data:
      raise ValueError(f"batch leaf '{path}' has {shape[0]} rows (shape {tuple(shape)}), which the mesh's "
                       f"data axis of size {data} does not divide; use a batch size that is a multiple of {data}")
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (len(shape) - 1))))

  return jax.tree_util.tree_map_with_path(one, batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """``batch`` placed on ``mesh`` (:func:`batch_shardings`).

  With one process this is ``jax.device_put``. With several (``jax.distributed``), every process is
  expected to hold the same *global* batch (e.g. ``batch_fn(step)`` is a pure function of the step);
  each keeps the slices its own devices hold (``jax.make_array_from_callback``).
  """
  shardings = batch_shardings(batch, mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)

  def place(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(place, batch, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` replicated on every device of ``mesh``. Host leaves (numpy, or one process's jax arrays)
  must hold the same values on every process: with several processes each process places its own copy
  (``jax.make_array_from_callback``, no cross-process check); leaves already replicated on ``mesh`` are
  kept as they are."""
  s = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, s)

  def place(x):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(place, tree)


def per_device_bytes(tree: Any) -> dict:
  """``{device id: bytes of tree's shards held there}`` (addressable devices)."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for s in leaf.addressable_shards:
      out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
  return out


def describe(mesh: Optional[Mesh]) -> str:
  """``"data=2,fsdp=4 (8 cpu devices)"`` or ``"one device"``."""
  if mesh is None:
    return "one device"
  return f"data={mesh.shape['data']},fsdp={mesh.shape['fsdp']} ({mesh.size} {mesh.devices.flat[0].platform} devices)"


__all__ = ["AXES", "batch_shardings", "describe", "fsdp_spec", "jit_replicated", "make_mesh", "parse_mesh",
           "per_device_bytes", "replicate", "replicated", "shard_batch", "shard_state", "shard_tree",
           "state_shardings", "tree_shardings"]
