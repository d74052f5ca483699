"""The machine a benchmark ran on: accelerator, CPU, versions, load average."""
from __future__ import annotations

import importlib
import os
import platform
import re
from typing import Optional

import jax


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict:
  """The accelerator jax runs on and the host CPU."""
  d = jax.devices()[0]
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    mem = None
  return {"platform": d.platform, "device_kind": getattr(d, "device_kind", ""), "device": str(d),
          "num_devices": jax.device_count(), "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
          "host_memory_bytes": mem, "hostname": platform.node(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "transformers", "numpy", "softlm_jax"):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001 (a missing optional package is reported, not fatal)
      out[name] = None
  return out


def loadavg() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


#: XLA's CPU backend without its YNNPACK fusions: dots on the Eigen path. BERT-base batch 8 x 128 on this
#: machine's x86-64 CPU: dense 965 vs 1112 ms, CR 0.5 speed-up 1.72x vs 1.55x
#: (BENCHMARKS.md#inference-speed-and-memory).
EIGEN_DOTS_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
#: set to 0 to keep XLA's own CPU defaults in the library's processes
DEFAULT_FLAGS_ENV = "SOFTLM_DEFAULT_XLA_FLAGS"


def default_xla_flags(machine: Optional[str] = None, environ: Optional[dict] = None) -> str:
  """The XLA flags the library's own processes (``softlm``, ``python -m softlm_jax.bench``) add by
  default: :data:`EIGEN_DOTS_FLAG` on x86-64, where it measured faster for dense and compressed models
  alike; ``""`` on other machines (not measured), when ``$SOFTLM_DEFAULT_XLA_FLAGS`` is ``0``, or when
  the user's ``$XLA_FLAGS`` already sets that flag (the user's value wins). It only affects XLA's CPU
  backend (GPU runs ignore it)."""
  environ = os.environ if environ is None else environ
  machine = (machine or platform.machine()).lower()
  if environ.get(DEFAULT_FLAGS_ENV, "1") == "0" or machine not in ("x86_64", "amd64"):
    return ""
  if EIGEN_DOTS_FLAG.rstrip("=") in environ.get("XLA_FLAGS", ""):
    return ""
  return EIGEN_DOTS_FLAG


def _backends_started() -> bool:
  """Whether jax has created its backends (after which XLA has read its flags and ``$NPROC``)."""
  from jax._src import xla_bridge  # jax's private module: imported on use, so a jax without it fails only here
  return xla_bridge.backends_are_initialized()


def apply_default_xla_flags() -> str:
  """Appends :func:`default_xla_flags` to ``$XLA_FLAGS`` if jax has not started its backends yet (XLA
  reads the flags once per process); returns what it added (``""``: nothing)."""
  flags = default_xla_flags()
  if not flags or _backends_started():
    return ""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
  return flags


#: Threads per local CPU device in XLA's CPU client pool (:func:`default_cpu_threads`).
CPU_THREADS_PER_DEVICE = 8
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def local_cpu_devices(environ: Optional[dict] = None) -> int:
  """The CPU devices this process will have, read before jax starts: ``$JAX_NUM_CPU_DEVICES``, else
  ``--xla_force_host_platform_device_count`` in ``$XLA_FLAGS``, else 1."""
  environ = os.environ if environ is None else environ
  try:
    n = int(environ.get("JAX_NUM_CPU_DEVICES", "-1"))
  except ValueError:
    n = -1
  if n > 0:
    return n
  m = _DEVICE_COUNT_FLAG.search(environ.get("XLA_FLAGS", ""))
  return int(m.group(1)) if m else 1


def default_cpu_threads(environ: Optional[dict] = None, cores: Optional[int] = None) -> Optional[int]:
  """The thread count the library gives XLA's CPU client (``$NPROC``) when a process has several CPU
  devices; None when it has one or the user set ``$NPROC``.

  XLA sizes the pool that runs each device's part of a program at ``max(cores, local devices)``
  (``DefaultThreadPoolSize``, which reads ``$NPROC`` first): enough threads for one collective at a
  time. With several programs in flight (jax dispatches asynchronously) on a machine with fewer cores
  than devices, two collectives can each hold part of the pool and wait for the rest forever: a hang
  under ``jax.distributed`` with gloo, an abort after 40 s in one process (2 cores, 4 or 8 devices: in
  most runs of ``tests/test_cpu_threads.py``'s program). :data:`CPU_THREADS_PER_DEVICE` threads per
  device leave room for that many programs; idle threads cost nothing.
  """
  environ = os.environ if environ is None else environ
  if "NPROC" in environ:
    return None
  n = local_cpu_devices(environ)
  if n <= 1:
    return None
  return max(cores or os.cpu_count() or 1, CPU_THREADS_PER_DEVICE * n)


def apply_default_cpu_threads() -> Optional[int]:
  """Sets ``$NPROC`` to :func:`default_cpu_threads` if jax has not started its backends yet (the CPU
  client reads it once); returns the value set (None: nothing)."""
  threads = default_cpu_threads()
  if threads is None or _backends_started():
    return None
  os.environ["NPROC"] = str(threads)
  return threads
