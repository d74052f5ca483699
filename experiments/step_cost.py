"""Costs of SoftLM training on real all-MiniLM-L6-v2, measured in one process (ratios to dense). Regenerates
the training-step and ``compress_params`` rows of BENCHMARKS.md#compression-cost.

- train step time and peak memory (XLA's memory analysis of the compiled step): dense fine-tuning vs
  SoftLM at init_rank "full" and "break_even", each with the default apply mode ("auto": a
  factored layer near full rank runs as one merged kernel) and with "factored" forced (every factored
  layer as its two matmuls); steps interleaved, median of --reps after compile;
- how far the compressed model starts from the dense one, per sharpness (max |logit diff| / max |logit|);
- compress_params time vs numpy's SVD of the same kernels (interleaved).

  python experiments/step_cost.py --out runs/step_cost.json
  python experiments/step_cost.py --model bert-base --batch 8 --seq 128 --out runs/step_cost_bert.json
"""
import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import bench  # noqa: E402


def start_deviation(bm, sharpness=(50, 200, 1000, 1e6)):
  ids = jnp.asarray(np.random.RandomState(0).randint(1000, 20000, (8, 64)) % bm.vocab)
  dense = np.asarray(bm.forward(bm.params, ids))
  out = {}
  for k in sharpness:
    cfg = sl.CompressionConfig(sharpness=k)
    with sl.intercept(cfg):
      got = np.asarray(bm.forward(sl.compress_params(bm.params, cfg), ids))
    out[str(k)] = float(np.max(np.abs(got - dense)) / np.max(np.abs(dense)))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="minilm", help=f"any of {sorted(bench.MODELS)}")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, nargs="+", default=[64, 128])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--modes", nargs="+", default=["auto", "factored"])
  ap.add_argument("--no-deviation", action="store_true")
  ap.add_argument("--out", default="runs/step_cost.json")
  args = ap.parse_args()
  bm = bench.build_model(args.model)
  res = {"device": bench.device_info(), "versions": bench.versions(), "model": args.model,
         "batch": args.batch, "loadavg_start": bench.loadavg()}
  if not args.no_deviation:
    res["start_deviation"] = start_deviation(bm)
  comp = bench.compress_cost(args.model, reps=3, bm=bm)
  res["compress"] = comp
  res["compress_vs_numpy_svd"] = comp["compress_vs_numpy_svd"]
  res["train"] = {}
  res["step_s"] = {}
  for seq in args.seq:
    tr = bench.train_cost(args.model, batch=args.batch, seq=seq, reps=args.reps, bm=bm, apply_modes=args.modes)
    res["train"][f"{args.batch}x{seq}"] = tr
    res["step_s"][f"{args.batch}x{seq}"] = {
        name: {"median_s": row["median_s"], "vs_dense": row.get("step_vs_dense", 1.0),
               "peak_bytes": row["memory"].get("peak_bytes"),
               "peak_vs_dense": row.get("peak_memory_vs_dense", 1.0)} for name, row in tr["steps"].items()}
  res["loadavg_end"] = bench.loadavg()
  bench.write_json(res, args.out)
  print(json.dumps({k: res[k] for k in ("step_s", "compress_vs_numpy_svd", "start_deviation") if k in res},
                   indent=1))


if __name__ == "__main__":
  main()
