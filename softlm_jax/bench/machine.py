"""The machine a benchmark ran on: accelerator, CPU, versions, load average."""
from __future__ import annotations

import importlib
import os
import platform
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
