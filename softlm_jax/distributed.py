"""Several processes (hosts) under JAX's multi-controller runtime (``jax.distributed``).

The same program runs on every process; a device mesh then spans every process's devices, and each
process computes the same global batch schedule and places only the rows its own devices hold
(:func:`softlm_jax.shard.shard_batch`). One process (index 0) writes the run's files; the others wait for
it at the end and exit with its status. Every wait has a timeout, so a process that died or failed ends
the others with a message instead of a hang.

On one machine, ``JAX_NUM_CPU_DEVICES=K`` gives each process K CPU devices and gloo carries the
collectives: that is how the multi-process tests run (``tests/test_multiprocess.py``).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
from jax._src import distributed as _jd  # the coordination service client: barriers, key-value store

#: Seconds a process waits for the others at a barrier or for process 0's exit status.
DEFAULT_TIMEOUT_S = 600

_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
  """Another process failed or did not arrive in time."""


def cluster_size_from_env() -> int:
  """The process count a cluster manager announces (SLURM, Open MPI), or 1."""
  for key in _CLUSTER_ENV:
    try:
      n = int(os.environ.get(key, "1"))
    except ValueError:
      continue
    if n > 1:
      return n
  return 1


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: int = 300, heartbeat_s: int = 60) -> bool:
  """Starts JAX's distributed runtime when asked to (any argument given) or when a cluster manager
  announces several processes (then ``jax.distributed.initialize`` finds its arguments itself). Call it
  before anything touches a device. Returns whether this run has several processes.

  Args:
    coordinator: ``host:port`` of process 0's coordination service.
    num_processes / process_id: this run's size and this process's index.
    timeout_s: how long to wait for every process to join.
    heartbeat_s: a process silent this long is declared dead and the others stop.

  Raises:
    ValueError: for an incomplete or inconsistent set of arguments.
  """
  given = [a is not None for a in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator, --num-processes and --process-id go together (or none of them, under a "
                     "cluster manager that sets them)")
  if all(given):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
    if ":" not in coordinator:
      raise ValueError(f"--coordinator takes host:port, got {coordinator!r}")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_s)
    return True
  if cluster_size_from_env() > 1:
    jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s)
    return True
  return False


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_main() -> bool:
  """Whether this process writes the run's files: process 0, or the only one (answered without starting
  a backend when ``jax.distributed`` is not initialized)."""
  return _jd.global_state.client is None or jax.process_index() == 0


def _client():
  if _jd.global_state.client is None:
    raise DistributedError("jax.distributed is not initialized")
  return _jd.global_state.client


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Waits until every process reaches ``name`` (no-op with one process).

  Raises:
    DistributedError: naming the barrier when a process does not arrive within ``timeout_s``.
  """
  if jax.process_count() == 1:
    return
  try:
    _client().wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
    raise DistributedError(f"process {jax.process_index()}: not every process reached '{name}' within "
                           f"{timeout_s:.0f} s ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


_SYNCS: dict = {}


def sync(tag: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """A :func:`barrier` named by ``tag`` and how many times this process has synced on it (every process
  reaches the same syncs in the same order, so the names agree); no-op with one process."""
  if _jd.global_state.client is None or jax.process_count() == 1:
    return
  _SYNCS[tag] = _SYNCS.get(tag, 0) + 1
  barrier(f"{tag}#{_SYNCS[tag]}", timeout_s)


def publish(key: str, value: str) -> None:
  """Process 0 sets ``key`` in the coordination service's store (no-op with one process)."""
  if _jd.global_state.client is not None and is_main():
    _client().key_value_set(f"softlm/{key}", value)


def receive(key: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
  """The value process 0 published under ``key``, waiting up to ``timeout_s``.

  Raises:
    DistributedError: when nothing arrives in time (process 0 died or is stuck).
  """
  try:
    return _client().blocking_key_value_get(f"softlm/{key}", int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001
    raise DistributedError(f"process {jax.process_index()}: process 0 published no '{key}' within "
                           f"{timeout_s:.0f} s ({type(e).__name__})") from None


def finish(status: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
  """The run's exit status on every process: process 0 publishes its own, the others wait for it and
  return the worse of it and theirs (so a failure anywhere is a failure everywhere)."""
  if jax.process_count() == 1:
    return status
  if is_main():
    publish("exit_status", str(int(status)))
    return status
  return max(int(status), int(receive("exit_status", timeout_s)))
