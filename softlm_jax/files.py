"""Durable file writes, and the fault points that test them.

:func:`atomic_write` is how every file a run relies on when it resumes is written (the compact
checkpoint, ``results.json``, the refit's per-block files, the training history): the bytes go to a
temporary file in the destination folder, which is flushed to disk and then renamed over the
destination (``os.replace``, atomic on POSIX). A process killed at any point (``kill -9``, a power
cut) leaves the previous file or none, never a partial file that a later run would accept; the
temporary file's name starts with ``.`` and ends with ``.tmp``.

Fault points: :func:`fault_point` names a place where a process may die. With
``SOFTLM_FAULT="<name>:<n>"`` in the environment, the ``n``-th time the process reaches the point
``name`` it kills itself with SIGKILL, as an out-of-memory killer or a pre-empted machine would.
The kill tests (``tests/test_kill.py``) run a command under each fault point and check that the
same command run again ends bit-identical to an uninterrupted run. Without the variable a fault
point is a dictionary lookup.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from collections import Counter
from typing import Union

from softlm_jax import distributed

FAULT_ENV = "SOFTLM_FAULT"
_hits: Counter = Counter()


def fault_point(name: str) -> None:
  """Kills this process with SIGKILL at the ``n``-th visit of ``name`` when ``$SOFTLM_FAULT`` is
  ``"name:n"`` (module docstring); otherwise does nothing."""
  spec = os.environ.get(FAULT_ENV)
  if not spec:
    return
  want, _, n = spec.rpartition(":")
  if want != name:
    return
  _hits[name] += 1
  if _hits[name] == int(n):
    os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: Union[str, os.PathLike], data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (module docstring); the folder must exist. The fault point
  ``"file_write:<file name>"`` lies half-way through the bytes. Under several processes only process 0
  writes (:func:`softlm_jax.distributed.is_main`) and every process returns once the file is there."""
  if not distributed.is_main():  # several processes: process 0 writes, the others wait until it has
    distributed.sync("file_write")
    return
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      half = len(data) // 2
      f.write(data[:half])
      f.flush()
      fault_point(f"file_write:{os.path.basename(path)}")
      f.write(data[half:])
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  distributed.sync("file_write")


def write_text(text: str, path: Union[str, os.PathLike]) -> None:
  """``text`` (UTF-8) written with :func:`atomic_write`."""
  atomic_write(path, text.encode())


def write_json(obj, path: Union[str, os.PathLike]) -> None:
  """``obj`` as indented JSON (numpy scalars as floats), written with :func:`atomic_write`."""
  atomic_write(path, json.dumps(obj, indent=2, default=float).encode())
