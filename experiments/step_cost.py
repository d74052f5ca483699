"""Costs of SoftLM training on real all-MiniLM-L6-v2, measured in one process (ratios to dense).

- train step time: dense vs SoftLM at init_rank "full" and "break_even" (same jitted step, Adam);
- how far the compressed model starts from the dense one, per sharpness (max |logit diff| / max |logit|);
- compress_params time vs numpy's SVD of the same kernels.

  python experiments/step_cost.py --out runs/step_cost.json
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import train  # noqa: E402
from softlm_jax.models import hf  # noqa: E402


def median_time(fn, reps):
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, nargs="+", default=[64, 128])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default="runs/step_cost.json")
  args = ap.parse_args()
  model, _ = hf.load_classifier("minilm", 2)
  rng = np.random.RandomState(0)
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "batch": args.batch}

  ids = jnp.asarray(rng.randint(1000, 20000, (8, 64)))
  dense_logits = np.asarray(model(ids, params=model.params).logits)
  res["start_deviation"] = {}
  for k in (50, 200, 1000, 1e6):
    cfg = sl.CompressionConfig(sharpness=k)
    with sl.intercept(cfg):
      out = np.asarray(model(ids, params=sl.compress_params(model.params, cfg)).logits)
    res["start_deviation"][str(k)] = float(np.max(np.abs(out - dense_logits)) / np.max(np.abs(dense_logits)))

  cfg = sl.CompressionConfig()
  kernels = [np.asarray(k, np.float32) for _, k in sl.tree.selected_kernels(model.params, cfg)]
  sl.compress_params(model.params, cfg)  # compile the batched SVD
  res["compress_params_s"] = median_time(lambda: jax.tree.leaves(sl.compress_params(model.params, cfg))[0], args.reps)
  res["numpy_svd_s"] = median_time(lambda: [np.linalg.svd(k, full_matrices=False) for k in kernels][0][1], args.reps)

  def task_loss(p, batch, rng_):
    logits = model(batch["ids"], params=p, dropout_rng=rng_, train=True).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  variants = {"dense": (model.params, None),
              "softlm_full": (sl.compress_params(model.params, cfg), cfg),
              "softlm_break_even": (sl.compress_params(model.params, cfg.replace(init_rank="break_even")), cfg)}
  res["step_s"] = {}
  for seq in args.seq:
    batch = {"ids": jnp.asarray(rng.randint(1000, 20000, (args.batch, seq))),
             "labels": jnp.zeros(args.batch, jnp.int32)}
    row = {}
    for name, (params, c) in variants.items():
      tx = sl.make_optimizer(cfg, optax.adam(1e-4)) if c else optax.adam(1e-4)
      step = train.make_train_step(task_loss, tx, c)
      holder = [step(train.init_state(params, tx), batch)[0]]  # compile

      def run():
        holder[0], m = step(holder[0], batch)
        return m["loss"]
      row[name] = median_time(run, args.reps)
    row.update({f"{n}/dense": row[n] / row["dense"] for n in ("softlm_full", "softlm_break_even")})
    res["step_s"][f"{args.batch}x{seq}"] = row
  res["compress_vs_numpy_svd"] = res["compress_params_s"] / res["numpy_svd_s"]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
