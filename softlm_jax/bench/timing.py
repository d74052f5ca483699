"""Timing: compiled cases run interleaved, their per-round times, paired speed-ups."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from softlm_jax.bench.memory import memory_stats
from softlm_jax.intercept import intercept


def summarize(times: Sequence[float]) -> dict:
  t = np.asarray(times, np.float64)
  med = float(np.median(t))
  p25, p75 = (float(v) for v in np.percentile(t, [25, 75]))
  return {"median_s": med, "p25_s": p25, "p75_s": p75, "min_s": float(t.min()), "max_s": float(t.max()),
          "mean_s": float(t.mean()), "n": int(t.size), "spread": (p75 - p25) / med if med else 0.0}


@dataclasses.dataclass
class Case:
  """A compiled function and the state to call it with. ``call()`` runs once and returns something
  to block on; a case with donated state (decode cache, train state) threads it through."""
  name: str
  fn: Callable
  args: tuple
  donate: tuple = ()
  ctx: Callable = intercept
  compiled: Any = None
  compile_s: float = 0.0
  lower_s: float = 0.0
  memory: dict = dataclasses.field(default_factory=dict)
  carry: Optional[Callable] = None  # (args, out) -> next args

  def compile(self):
    with self.ctx():
      t = time.perf_counter()
      lowered = jax.jit(self.fn, donate_argnums=self.donate).lower(*self.args)
      self.lower_s = time.perf_counter() - t
    t = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t
    self.memory = memory_stats(self.compiled)
    return self

  def call(self):
    out = self.compiled(*self.args)
    if self.carry is not None:
      self.args = self.carry(self.args, out)
    return out


def time_interleaved(cases: Sequence[Case], reps: int, warmup: int = 1) -> dict[str, list[float]]:
  """``reps`` rounds; in each round every case runs once (order rotated each round), timed to
  ``block_until_ready``. Returns the per-round times of each case (paired by index)."""
  for c in cases:
    for _ in range(warmup):
      jax.block_until_ready(c.call())
  times: dict[str, list[float]] = {c.name: [] for c in cases}
  n = len(cases)
  for r in range(reps):
    for i in range(n):
      c = cases[(i + r) % n]
      t = time.perf_counter()
      jax.block_until_ready(c.call())
      times[c.name].append(time.perf_counter() - t)
  return times


def paired_speedup(base: Sequence[float], other: Sequence[float]) -> dict:
  """Per-round ratios ``base / other`` (rounds are interleaved, so load drift cancels)."""
  r = np.asarray(base, np.float64) / np.asarray(other, np.float64)
  return {"median": float(np.median(r)), "p25": float(np.percentile(r, 25)),
          "p75": float(np.percentile(r, 75)), "of_medians": float(np.median(base) / np.median(other))}
