"""Board power and energy per token (NVIDIA GPUs through pynvml; skipped elsewhere, with why)."""
from __future__ import annotations

import threading
import time

import jax
import numpy as np

from softlm_jax.bench.timing import Case


def power_probe() -> dict:
  """``{"available": True, "handle": ...}`` when jax runs on an NVIDIA GPU and pynvml answers, else
  ``{"available": False, "skipped": <why>}``."""
  platform_ = jax.devices()[0].platform
  if platform_ != "gpu":
    return {"available": False, "skipped": f"power/energy skipped: no NVIDIA GPU (jax platform "
                                           f"{platform_!r}); they need pynvml on an NVIDIA device"}
  try:
    import pynvml  # NVIDIA GPUs only: imported on use
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(int(getattr(jax.devices()[0], "local_hardware_id", 0) or 0))
    name = pynvml.nvmlDeviceGetName(handle)
  except Exception as e:  # noqa: BLE001
    return {"available": False, "skipped": f"power/energy skipped: pynvml failed ({type(e).__name__}: {e})"}
  return {"available": True, "handle": handle, "gpu": name if isinstance(name, str) else name.decode()}


def measure_power(probe: dict, case: Case, tokens: int, min_seconds: float = 2.0) -> dict:
  """Mean board power (W, sampled every 10 ms) and energy per token (J) while ``case`` runs back to
  back for at least ``min_seconds``; also the idle power just before."""
  import pynvml  # NVIDIA GPUs only: imported on use
  handle = probe["handle"]
  samples: list[float] = []
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      samples.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
      time.sleep(0.01)

  time.sleep(0.5)
  idle = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
  try:
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # mJ, Volta and newer
  except Exception:  # noqa: BLE001
    e0 = None
  th = threading.Thread(target=sample, daemon=True)
  th.start()
  calls, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < min_seconds:
    jax.block_until_ready(case.call())
    calls += 1
  wall = time.perf_counter() - t0
  stop.set()
  th.join()
  out = {"idle_power_w": idle, "mean_power_w": float(np.mean(samples)) if samples else None,
         "seconds": wall, "calls": calls, "samples": len(samples)}
  if e0 is not None:
    joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) / 1000.0
    out["energy_j"] = joules
  else:
    joules = (out["mean_power_w"] or 0.0) * wall
    out["energy_j_from_samples"] = joules
  out["energy_per_token_j"] = joules / (calls * tokens)
  return out
