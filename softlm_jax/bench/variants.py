"""The compressed variants a benchmark times: static SVD per CR, a SoftLM run's export, rank rounding,
and their FLOP ratio (the ideal speed-up's denominator)."""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, checkpoint, run, tree
from softlm_jax.bench.models import BenchModel, cast_params
from softlm_jax.config import CompressionConfig
from softlm_jax.export import emit_layer, export_params, static_ranks, static_svd
from softlm_jax.svd import decompose


def random_factors(params: Mapping, cfg: CompressionConfig, ranks: Mapping[str, int], seed: int = 0) -> dict:
  """``decompose``-like factors cut at ``ranks`` without an SVD (timing-equivalent: the exported
  tree has exactly the shapes and dtypes the real SVD gives). For the big shapes, where the SVD of
  every kernel would take minutes and twice the model's memory."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, k in tree.selected_kernels(params, cfg):
    rows, cols = np.shape(k)
    r = max(1, min(int(ranks[path]), rows, cols))
    u = rng.standard_normal((rows, r), np.float32) / np.sqrt(rows)
    vt = rng.standard_normal((r, cols), np.float32) / np.sqrt(cols)
    out[path] = (u, np.linspace(1.0, 0.01, r, dtype=np.float32), vt, np.asarray(k).dtype)
  return out


def _export_random(params, cfg, ranks, rank_multiple):
  factors = random_factors(params, cfg, ranks)

  def convert(path, node):
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    return emit_layer(node, u * s, vt, dtype, rank_multiple)
  return tree.map_modules(params, convert)


def load_softlm_params(run_dir: str) -> tuple[dict, CompressionConfig]:
  """Params and config of a SoftLM run of ``experiments/glue.py`` / ``softlm train``: the training form
  from its orbax checkpoint ``<run_dir>/ckpt`` when kept (``--keep-ckpt``), else the exported tree of
  ``<run_dir>/compact.safetensors``; the config from ``run.json`` (:func:`softlm_jax.run.load_run`)."""
  import orbax.checkpoint as ocp  # heavy: imported on use
  cfg = run.load_run(run_dir)["compression"]
  ckpt = os.path.join(run_dir, "ckpt")
  step = ocp.CheckpointManager(os.path.abspath(ckpt)).latest_step() if os.path.isdir(ckpt) else None
  if step is None:
    compact = os.path.join(run_dir, "compact.safetensors")
    if os.path.exists(compact):
      return checkpoint.load_compact(compact)[0], cfg
    raise FileNotFoundError(f"no checkpoint in {ckpt} and no {compact}")
  state = ocp.CheckpointManager(os.path.abspath(ckpt)).restore(step, args=ocp.args.StandardRestore())
  return state["params"], cfg


def linear_shapes(params: Mapping, cfg: CompressionConfig) -> dict[str, tuple[int, int]]:
  """(rows, cols) of every selected linear of a dense tree."""
  return {p: tuple(int(d) for d in np.shape(k)) for p, k in tree.selected_kernels(params, cfg)}


def flop_ratio(variant: Mapping, cfg: CompressionConfig) -> float:
  """Multiply-adds per token of the compressed linears over the dense ones. A linear's
  multiply-adds per token equal its counted params (``r (m + n)`` factored, ``m n`` kept dense), so
  this is :func:`softlm_jax.count_params` over :func:`softlm_jax.dense_params`."""
  return int(budget.count_params(variant, cfg)) / budget.dense_params(variant, cfg)


def _suffix(m: int) -> str:
  return "" if m == 1 else f"_m{m}"


def make_variants(bm: BenchModel, crs: Sequence[float], *, softlm_run: Optional[str] = None,
                  rank_multiples: Sequence[int] = (1,), factors: str = "svd",
                  cfg: Optional[CompressionConfig] = None) -> tuple[dict[str, dict], dict]:
  """``{case: {"params", "kind", "cr", ...}}``: dense, ``static_cr<CR>`` for each CR and, with
  ``softlm_run``, the exported SoftLM run (its learned non-uniform ranks); each compressed case once
  per rank multiple (suffix ``_m<multiple>``, ranks rounded down). Returns also timings of the
  preparation (SVD, exports)."""
  cfg = cfg or CompressionConfig()
  prep: dict[str, Any] = {"factors": factors}
  out = {"dense": {"params": bm.params, "kind": "dense", "cr": 0.0, "rank_multiple": 1}}
  t = time.perf_counter()
  fac = decompose(bm.params, cfg) if (crs and factors == "svd") else None
  prep["svd_s"] = time.perf_counter() - t if fac is not None else None
  for cr in crs:
    c = cfg.replace(target_ratio=float(cr))
    for m in rank_multiples:
      t = time.perf_counter()
      if factors == "svd":
        p = static_svd(bm.params, c, factors=fac, rank_multiple=m)
      elif factors == "random":
        p = _export_random(bm.params, c, static_ranks(bm.params, c), m)
      else:
        raise ValueError(f"factors must be 'svd' or 'random', got {factors!r}")
      prep[f"export_cr{cr:g}{_suffix(m)}_s"] = time.perf_counter() - t
      out[f"static_cr{cr:g}{_suffix(m)}"] = {"params": p, "kind": "static_svd", "cr": float(cr),
                                            "rank_multiple": m}
  del fac
  if softlm_run:
    trained, scfg = load_softlm_params(softlm_run)
    shapes = linear_shapes(bm.params, cfg)
    for path, layer in tree.factored_layers(trained):
      if shapes.get(path) != tuple(int(d) for d in budget.layer_shape(layer)):
        raise ValueError(f"the SoftLM run in {softlm_run} does not fit model {bm.name!r}: layer {path} "
                         f"is {budget.layer_shape(layer)} there, {shapes.get(path)} here")
    exported = not any(budget.has_selection(layer) for _, layer in tree.factored_layers(trained))
    if exported and any(m != 1 for m in rank_multiples):
      raise ValueError(f"{softlm_run} holds only the exported model: rank rounding needs its training checkpoint "
                       "(rerun the training with --keep-ckpt)")
    for m in rank_multiples:
      ex = export_params(trained, scfg, rank_multiple=m)
      out[f"softlm{_suffix(m)}"] = {"params": cast_params(ex, jnp.dtype(bm.dtype)), "kind": "softlm",
                                    "cr": scfg.target_ratio, "run": softlm_run, "rank_multiple": m}
  return out, prep
