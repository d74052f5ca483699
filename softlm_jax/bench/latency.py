"""Inference latency: dense vs compressed exports (forward and per-token decode), the share of time
outside the compressed linears, and the Amdahl bound it gives."""
from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from softlm_jax import tree
from softlm_jax.bench.machine import device_info, loadavg, versions
from softlm_jax.bench.memory import linear_bytes, tree_bytes
from softlm_jax.bench.models import BenchModel, build_model
from softlm_jax.bench.power import measure_power, power_probe
from softlm_jax.bench.timing import Case, paired_speedup, summarize, time_interleaved
from softlm_jax.bench.variants import flop_ratio, linear_shapes, make_variants
from softlm_jax.config import CompressionConfig
from softlm_jax import hooks
from softlm_jax.intercept import intercept, layout_of


@dataclasses.dataclass(frozen=True)
class _Skip:
  cfg: CompressionConfig

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None
        or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)
    layout = layout_of(module)
    kernel = module.get_variable("params", "kernel")
    if layout is None or np.ndim(kernel) != 2 or not self.cfg.matches("/".join(module.scope.path)):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    out = kernel.shape[1] if layout == "in_out" else kernel.shape[0]
    reps = -(-out // x.shape[-1])
    y = jnp.tile(x, (1,) * (x.ndim - 1) + (reps,))[..., :out]
    if module.has_variable("params", "bias"):
      y = y + module.get_variable("params", "bias")
    return y.astype(getattr(module, "dtype", None) or y.dtype)


def skip_linears(cfg: Optional[CompressionConfig] = None):
  """Context: every linear ``cfg`` selects returns its input copied to its output width (+ bias)
  instead of multiplying. Time outside the compressed linears = time of the dense model under it."""
  return hooks.intercept_methods(_Skip(cfg or CompressionConfig()))


def _forward_fn(bm: BenchModel):
  def f(params, ids):
    return bm.forward(params, ids)
  return f


def _decode_fn(bm: BenchModel):
  def f(params, cache, ids, pos):
    return bm.decode(params, cache, ids, pos)
  return f


def _cases_for(bm: BenchModel, variants: Mapping[str, dict], mode: str, batch: int, seq: int,
               cfg: CompressionConfig, donate: bool) -> list[Case]:
  rng = np.random.RandomState(batch * 1000 + seq)
  ids = jnp.asarray(rng.randint(0, bm.vocab, (batch, seq if mode == "forward" else 1)), jnp.int32)
  out = []
  names = list(variants) + ["outside"]
  for name in names:
    params = variants["dense" if name == "outside" else name]["params"]
    ctx = (lambda: skip_linears(cfg)) if name == "outside" else intercept
    if mode == "forward":
      out.append(Case(name, _forward_fn(bm), (params, ids), ctx=ctx))
    else:
      cache = bm.init_cache(batch, seq)
      pos = jnp.full((batch, 1), seq // 2, jnp.int32)
      out.append(Case(name, _decode_fn(bm), (params, cache, ids, pos), donate=(1,) if donate else (),
                      ctx=ctx, carry=lambda a, o: (a[0], o[1], a[2], a[3])))
  return out


def run_benchmark(model: str = "bert-base", *, batches: Sequence[int] = (8,), seqs: Sequence[int] = (128,),
                  crs: Sequence[float] = (0.25, 0.5, 0.75), decode: Optional[bool] = None,
                  forward: bool = True, reps: int = 7, warmup: int = 2, dtype: str = "float32",
                  rank_multiples: Sequence[int] = (1,), factors: str = "svd", softlm_run: Optional[str] = None,
                  donate: bool = True, power: bool = True, bm: Optional[BenchModel] = None,
                  extra_variants: Optional[Mapping[str, dict]] = None, cfg: Optional[CompressionConfig] = None,
                  log: Callable[[str], None] = print) -> dict:
  """Times the dense model against its compressed exports for every (mode, batch, seq).

  ``mode`` is ``"forward"`` (whole sequence: encoder, or decoder prefill) and, for decoders with
  ``decode`` (default: on for decoders), ``"decode"`` (one token per sequence with a KV cache of
  ``seq`` positions, the cache donated when ``donate``). Returns the JSON-able result (see
  BENCHMARKS.md#inference-speed-and-memory for the fields). ``extra_variants``: more cases, ``{name: {"params", "kind",
  "cr", "rank_multiple"}}`` (e.g. a loaded compact checkpoint, as ``softlm bench`` does); ``cfg``: the
  compression config that selects the linears (default ``CompressionConfig()``).
  """
  t_start = time.perf_counter()
  load0 = loadavg()
  cfg = cfg or CompressionConfig()
  t = time.perf_counter()
  bm = bm or build_model(model, dtype)
  build_s = time.perf_counter() - t
  variants, prep = make_variants(bm, crs, softlm_run=softlm_run, rank_multiples=rank_multiples,
                                 factors=factors, cfg=cfg)
  variants.update(extra_variants or {})
  shapes = linear_shapes(bm.params, cfg)
  probe = power_probe() if power else {"available": False, "skipped": "power/energy not requested"}
  dense_bytes, dense_lin = tree_bytes(bm.params), linear_bytes(bm.params, shapes)
  meta = {}
  for name, v in variants.items():
    p = v["params"]
    fr = flop_ratio(p, cfg)
    ranks = {path: int(np.shape(layer["left"])[1]) for path, layer in tree.factored_layers(p)}
    meta[name] = {"kind": v["kind"], "cr": v["cr"], "rank_multiple": v["rank_multiple"], "flop_ratio": fr,
                  "ideal_linear_speedup": 1.0 / fr,
                  "weight_bytes": tree_bytes(p), "linear_weight_bytes": linear_bytes(p, shapes),
                  "weight_saving": 1.0 - tree_bytes(p) / dense_bytes,
                  "linear_weight_saving": 1.0 - linear_bytes(p, shapes) / dense_lin,
                  "factored_layers": len(ranks), "dense_layers": len(shapes) - len(ranks),
                  "ranks": sorted(set(ranks.values()))}
    if "run" in v:
      meta[name]["run"] = v["run"]
  modes = (["forward"] if forward else []) + (["decode"] if (bm.decoder if decode is None else decode) else [])
  results = []
  for mode in modes:
    for batch in batches:
      for seq in seqs:
        label = f"{mode} b{batch} s{seq}"
        t = time.perf_counter()
        cases = [c.compile() for c in _cases_for(bm, variants, mode, batch, seq, cfg, donate)]
        log(f"[bench] {bm.name} {label}: compiled {len(cases)} cases in {time.perf_counter() - t:.1f}s "
            f"(load {loadavg()})")
        load_before = loadavg()
        t = time.perf_counter()
        times = time_interleaved(cases, reps, warmup)
        timed_s = time.perf_counter() - t
        tokens = batch * (seq if mode == "forward" else 1)
        dense_t, outside_t = times["dense"], times["outside"]
        o = float(np.median(outside_t) / np.median(dense_t))
        for c in cases:
          row = {"mode": mode, "batch": batch, "seq": seq, "case": c.name, "tokens": tokens,
                 **summarize(times[c.name]), "times_s": times[c.name], "compile_s": c.compile_s,
                 "lower_s": c.lower_s, "memory": c.memory, "us_per_token": 1e6 * np.median(times[c.name]) / tokens}
          if c.name == "outside":
            row.update(kind="outside", outside_share=o)
          else:
            m = meta[c.name]
            sp = paired_speedup(dense_t, times[c.name])
            oc = min(max(o, 0.0), 1.0)  # a share outside [0, 1] is timing noise (tiny models)
            bound = 1.0 / (oc + (1.0 - oc) * m["flop_ratio"])
            lin_dense = np.median(dense_t) - np.median(outside_t)
            lin_case = np.median(times[c.name]) - np.median(outside_t)
            row.update({k: m[k] for k in ("kind", "cr", "rank_multiple", "flop_ratio", "ideal_linear_speedup",
                                          "weight_bytes", "weight_saving", "linear_weight_bytes",
                                          "linear_weight_saving")},
                       speedup=sp["median"], speedup_p25=sp["p25"], speedup_p75=sp["p75"],
                       speedup_of_medians=sp["of_medians"], amdahl_bound=bound,
                       outside_share=o, of_bound=sp["median"] / bound,
                       linear_speedup_measured=float(lin_dense / lin_case) if lin_case > 0 else None)
          if probe["available"] and c.name != "outside":
            row["power"] = measure_power(probe, c, tokens)
          elif c.name != "outside":
            row["power"] = {"skipped": probe["skipped"]}
          results.append(row)
        if probe["available"]:
          dense_e = next(r for r in results[-len(cases):] if r["case"] == "dense")["power"]["energy_per_token_j"]
          for r in results[-len(cases):]:
            if "energy_per_token_j" in r.get("power", {}):
              r["power"]["energy_saving"] = 1.0 - r["power"]["energy_per_token_j"] / dense_e
        log(f"[bench] {bm.name} {label}: timed {reps} rounds in {timed_s:.1f}s; " + ", ".join(
            f"{r['case']} {1e3 * r['median_s']:.2f}ms" + (f" x{r['speedup']:.2f} (bound {r['amdahl_bound']:.2f})"
                                                          if "speedup" in r else "")
            for r in results[-len(cases):]))
        for c in cases:  # free donated caches before the next grid point
          c.args = c.compiled = None
        results[-1]["load_before"] = load_before
  power_note = {k: v for k, v in probe.items() if k != "handle"}
  return {
      "kind": "inference", "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "device": device_info(), "versions": versions(),
      "config": {"model": bm.name, "family": bm.family, "model_config": bm.config, "dtype": bm.dtype,
                 "batches": list(batches), "seqs": list(seqs), "crs": [float(c) for c in crs],
                 "modes": modes, "reps": reps, "warmup": warmup, "rank_multiples": list(rank_multiples),
                 "factors": factors, "softlm_run": softlm_run, "donate_cache": donate,
                 "selected_linears": len(shapes), "dense_linear_params": sum(m * n for m, n in shapes.values()),
                 "compression": dataclasses.asdict(cfg)},
      "variants": meta, "power": power_note, "cases": results,
      "loadavg": {"start": load0, "end": loadavg()},
      "timing": {"build_s": build_s, **prep, "total_s": time.perf_counter() - t_start},
  }
