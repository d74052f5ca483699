"""Training cost: the SoftLM train step vs dense fine-tuning (time, peak memory), and
``compress_params`` vs numpy's LAPACK SVD."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softlm_jax import train, tree
from softlm_jax.bench.machine import loadavg
from softlm_jax.bench.models import BenchModel, build_model
from softlm_jax.bench.timing import Case, paired_speedup, summarize, time_interleaved
from softlm_jax.compress import compress_params
from softlm_jax.config import CompressionConfig
from softlm_jax.intercept import apply_mode
from softlm_jax.optim import make_optimizer


def _task_loss(bm: BenchModel):
  def loss(p, batch, rng):
    logits = bm.train_logits(p, batch["ids"], rng)
    if bm.decoder:  # next-token cross-entropy
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss


def train_cost(model: str = "minilm", *, batch: int = 32, seq: int = 128, reps: int = 5, warmup: int = 1,
               init_ranks: Sequence[str] = ("full", "break_even"), apply_modes: Sequence[str] = ("auto", "factored"),
               lr: float = 1e-4, bm: Optional[BenchModel] = None, log: Callable[[str], None] = print) -> dict:
  """Time per step and peak memory of the trainer's own jitted step (``train.make_train_step``,
  Adam, dropout on, state donated): dense fine-tuning vs SoftLM per ``init_rank`` and per
  :func:`softlm_jax.intercept.apply_mode` (``"auto"``: the default; ``"factored"``: before the merged
  high-rank path existed). Random token ids stand in for data."""
  bm = bm or build_model(model)
  cfg = CompressionConfig()
  rng = np.random.RandomState(0)
  data = {"ids": jnp.asarray(rng.randint(0, bm.vocab, (batch, seq)), jnp.int32),
          "labels": jnp.zeros((batch,), jnp.int32)}
  loss = _task_loss(bm)
  load0 = loadavg()
  cases = []
  specs = [("dense", bm.params, None, "auto")]
  for ir in init_ranks:
    cp = compress_params(bm.params, cfg.replace(init_rank=ir))
    for m in apply_modes:
      specs.append((f"softlm_{ir}" + ("" if m == "auto" else f"_{m}"), cp, cfg, m))
  for name, params, c, m in specs:
    tx = make_optimizer(cfg, optax.adam(lr)) if c is not None else optax.adam(lr)
    step = train.make_train_step(loss, tx, c)
    cases.append(Case(name, step, (train.init_state(params, tx), data), donate=(0,),
                      ctx=lambda m=m: apply_mode(m), carry=lambda a, o: (o[0], a[1])).compile())
  log(f"[train] {bm.name} {batch}x{seq}: compiled {len(cases)} steps (load {loadavg()})")
  times = time_interleaved(cases, reps, warmup)
  rows = {}
  for c in cases:
    rows[c.name] = {**summarize(times[c.name]), "times_s": times[c.name], "compile_s": c.compile_s,
                    "lower_s": c.lower_s, "memory": c.memory}
    if c.name != "dense":
      sp = paired_speedup(times[c.name], times["dense"])  # step time ratio case / dense
      rows[c.name].update(step_vs_dense=sp["median"], step_vs_dense_p25=sp["p25"],
                          step_vs_dense_p75=sp["p75"])
      peak, dense_peak = c.memory.get("peak_bytes"), cases[0].memory.get("peak_bytes")
      if peak is not None and dense_peak:
        rows[c.name]["peak_memory_vs_dense"] = peak / dense_peak
  for c in cases:
    c.args = c.compiled = None
  return {"kind": "train", "model": bm.name, "batch": batch, "seq": seq, "reps": reps,
          "optimizer": f"adam({lr})", "steps": rows, "loadavg": {"start": load0, "end": loadavg()}}


def compress_cost(model: str = "bert-base", *, reps: int = 3, bm: Optional[BenchModel] = None,
                  log: Callable[[str], None] = print) -> dict:
  """``compress_params`` (end to end: SVD batched per shape, factors into a new tree) against
  ``np.linalg.svd(..., full_matrices=False)`` of the same matrices stacked per shape, interleaved.
  The first ``compress_params`` call (which compiles the batched SVD) is reported apart."""
  bm = bm or build_model(model)
  cfg = CompressionConfig()
  kernels = [np.asarray(k, np.float32) for _, k in tree.selected_kernels(bm.params, cfg)]
  groups: dict[tuple, list] = {}
  for k in kernels:
    groups.setdefault(k.shape, []).append(k)
  stacks = [np.stack(g) for g in groups.values()]
  t = time.perf_counter()
  jax.block_until_ready(compress_params(bm.params, cfg))
  first = time.perf_counter() - t
  times: dict[str, list[float]] = {"compress_params": [], "numpy_svd": []}
  load0 = loadavg()
  for r in range(reps):
    for name in (("compress_params", "numpy_svd") if r % 2 == 0 else ("numpy_svd", "compress_params")):
      t = time.perf_counter()
      if name == "compress_params":
        jax.block_until_ready(compress_params(bm.params, cfg))
      else:
        for s in stacks:
          np.linalg.svd(s, full_matrices=False)
      times[name].append(time.perf_counter() - t)
  sp = paired_speedup(times["compress_params"], times["numpy_svd"])
  log(f"[compress] {bm.name}: compress_params {np.median(times['compress_params']):.2f}s, numpy SVD "
      f"{np.median(times['numpy_svd']):.2f}s (x{sp['median']:.2f})")
  return {"kind": "compress", "model": bm.name, "matrices": {f"{a}x{b}": len(g) for (a, b), g in groups.items()},
          "first_call_s": first, "compress_params": summarize(times["compress_params"]),
          "numpy_svd": summarize(times["numpy_svd"]), "compress_vs_numpy_svd": sp["median"],
          "times_s": times, "reps": reps, "loadavg": {"start": load0, "end": loadavg()}}
