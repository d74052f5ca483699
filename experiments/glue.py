"""GLUE fine-tuning: dense, SoftLM and the static-SVD baseline on one task, with the same steps.

Default (the README's main job): real all-MiniLM-L6-v2 on MRPC from ../shared/data, all three
methods at CR 0.5. Each method writes ``<out>/<method>/results.json`` (metrics, counts, ranks,
history, wall time), ``table.md`` and, for compressed models, ``ranks.png``; ``<out>/summary.md``
compares them. Interrupted runs resume from their orbax checkpoints.

  python experiments/glue.py --task mrpc --out runs/glue/mrpc
"""
from __future__ import annotations

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
from softlm_jax import data, metrics, report, shard, train  # noqa: E402
from softlm_jax.models import hf  # noqa: E402

MAX_LEN = {"mrpc": 128, "cola": 64, "sst2": 64, "qnli": 128}


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", default="mrpc", choices=sorted(metrics.GLUE_METRICS))
  ap.add_argument("--model", default="minilm", help="'minilm' (embedded) or a HF name/folder")
  ap.add_argument("--methods", default="softlm,static,dense")
  ap.add_argument("--cr", type=float, default=0.5, help="compression ratio (fraction removed)")
  ap.add_argument("--finetune-steps", type=int, default=150, help="steps after the budget is met")
  ap.add_argument("--max-compress-steps", type=int, default=300)
  ap.add_argument("--steps", type=int, default=None,
                  help="steps for dense/static (default: the SoftLM run's total, else 240)")
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--max-len", type=int, default=None)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--alpha-lr", type=float, default=5e-3)
  ap.add_argument("--gamma", type=float, default=1.0)
  ap.add_argument("--sharpness", type=float, default=1000.0)
  ap.add_argument("--loss", default="adaptive", choices=["adaptive", "linear"])
  ap.add_argument("--init-rank", default="full")
  ap.add_argument("--split", default="dev", help="evaluation split (GLUE test labels are hidden)")
  ap.add_argument("--eval-limit", type=int, default=None)
  ap.add_argument("--data-dir", default=None,
                  help="local data root (default $SOFTLM_DATA_DIR, ../shared/data, else hub)")
  ap.add_argument("--out", default="runs/glue/mrpc")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-progress", action="store_true")
  ap.add_argument("--mesh", default=None,
                  help="data=D,fsdp=F: train on a D x F device mesh, batches split D ways, params and Adam state "
                       "F ways (softlm_jax.make_mesh; default: one device)")
  return ap.parse_args(argv)


def make_cfg(args) -> sl.CompressionConfig:
  init_rank = int(args.init_rank) if str(args.init_rank).isdigit() else args.init_rank
  return sl.CompressionConfig(target_ratio=args.cr, sharpness=args.sharpness, gamma=args.gamma,
                              alpha_lr=args.alpha_lr, loss=args.loss, init_rank=init_rank)


def predict_fn(model, cfg):
  @jax.jit
  def predict(params, inputs):
    with sl.intercept(cfg):
      return model(**inputs, params=params, train=False).logits
  return predict


def evaluate(predict, params, enc, labels, task, batch_size) -> tuple[dict, np.ndarray]:
  n = len(labels)
  logits = []
  for idx, valid in data.eval_batches(n, batch_size):
    out = predict(params, {k: jnp.asarray(v[idx]) for k, v in enc.items()})
    logits.append(np.asarray(out)[valid])
  logits = np.concatenate(logits)
  return metrics.glue_metrics(task, logits.argmax(-1), labels), logits


def run_method(method, args, cfg, model, train_enc, train_labels, dev_enc, dev_labels, steps):
  out = os.path.join(args.out, method)
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  params = model.params
  adam = optax.adam(args.lr)
  if method == "softlm":
    params = sl.compress_params(params, cfg)
    tx, step_cfg = sl.make_optimizer(cfg, adam), cfg
  elif method == "static":
    params = sl.static_svd(params, cfg)
    tx, step_cfg = adam, cfg
  else:
    tx, step_cfg = adam, None

  def task_loss(p, batch, rng):
    logits = model(**batch["inputs"], params=p, dropout_rng=rng, train=True).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  n = len(train_labels)

  def batch_fn(step):
    idx = data.batch_indices(n, args.batch_size, step, args.seed)
    return {"inputs": {k: jnp.asarray(v[idx]) for k, v in train_enc.items()},
            "labels": jnp.asarray(train_labels[idx])}

  mesh = shard.parse_mesh(args.mesh)
  state = train.init_state(params, tx, seed=args.seed, mesh=mesh)
  step_fn = train.make_train_step(task_loss, tx, step_cfg, mesh=mesh)
  state, history = train.fit(state, step_fn, batch_fn, steps=steps, finetune_steps=args.finetune_steps,
                             max_compress_steps=args.max_compress_steps,
                             ckpt_dir=os.path.join(out, "ckpt"), save_every=50,
                             progress=not args.no_progress,
                             target=sl.target_params(params, cfg) if method == "softlm" else None, mesh=mesh)
  train_time = time.time() - t0
  predict = predict_fn(model, step_cfg)
  res = {"method": method, "task": args.task, "model": args.model, "eval_split": args.split,
         "train_steps": int(state.step), "train_wall_s": train_time, "history": history,
         "config": vars(args)}
  final = state.params
  if method == "softlm":
    bs = sl.budget_state(state.opt_state)
    res["freeze_step"] = int(bs.freeze_step)
    train_metrics, train_logits = evaluate(predict, final, dev_enc, dev_labels, args.task, 64)
    final = sl.export_params(final, cfg)
    res["training_form_metrics"] = train_metrics
  ev, logits = evaluate(predict, final, dev_enc, dev_labels, args.task, 64)
  if method == "softlm":
    res["export_max_abs_logit_diff"] = float(np.max(np.abs(logits - train_logits)))
  res["metrics"] = ev
  res["main_metric"] = metrics.GLUE_METRICS[args.task][0]
  if method != "dense":
    rep = sl.budget_report(state.params if method == "softlm" else final, cfg)
    res["budget"] = {k: v for k, v in rep.items() if k != "layers"}
    ranks = {p: v["rank"] for p, v in rep["layers"].items()}
    res["ranks"] = ranks
    full = {p: min(v["shape"]) for p, v in rep["layers"].items()}
    report.rank_heatmap(ranks, os.path.join(out, "ranks.png"), full=full,
                        title=f"{method} {args.model} {args.task} CR={args.cr}: rank per layer")
  res["wall_s"] = time.time() - t0
  report.write_json(res, os.path.join(out, "results.json"))
  row = summary_row(res)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(report.markdown_table([row], list(row)))
  return res


def summary_row(res) -> dict:
  return report.summary_row(res, {"method": res["method"], "task": res["task"]},
                            {k: round(v, 4) for k, v in res["metrics"].items()})


def main(argv=None):
  args = parse(argv)
  cfg = make_cfg(args)
  max_len = args.max_len or MAX_LEN[args.task]
  num_labels = 2
  model, tok = hf.load_classifier(args.model, num_labels, seed=args.seed)
  tr_texts, tr_labels = data.load_glue(args.task, "train", args.data_dir)
  dv_texts, dv_labels = data.load_glue(args.task, args.split, args.data_dir)
  if args.eval_limit:
    dv_texts, dv_labels = dv_texts[:args.eval_limit], dv_labels[:args.eval_limit]
  train_enc, dev_enc = data.tokenize(tok, tr_texts, max_len), data.tokenize(tok, dv_texts, max_len)
  print(f"{args.task}: train {len(tr_labels)} / {args.split} {len(dv_labels)} examples, max_len {max_len}")
  results = {}
  for method in args.methods.split(","):
    steps = args.steps
    if steps is None:
      steps = results["softlm"]["train_steps"] if "softlm" in results else 240
    results[method] = run_method(method, args, cfg, model, train_enc, tr_labels, dev_enc, dv_labels, steps)
    print(json.dumps({k: results[method][k] for k in ("method", "metrics", "train_steps", "wall_s")}))
  rows = [summary_row(r) for r in results.values()]
  cols = list(dict.fromkeys(c for r in rows for c in r))
  table = report.markdown_table(rows, cols)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(f"# {args.model} on {args.task} ({args.split} split), CR {args.cr}\n\n" + table)
  print(table)


if __name__ == "__main__":
  main()
