"""LLRC on real all-MiniLM-L6-v2 (GLUE): fine-tuning-free compression of a fine-tuned classifier.

1. Teacher: the dense model fine-tuned on the task's train split (``--teacher-steps``, checkpointed
   in ``<out>/teacher``, reused by later runs).
2. For each CR, with the teacher's weights frozen and ``--calib`` train sentences (labels unused):
     static-noft   static SVD (same keep-ratio per layer), no training;
     softlm-noft   SoftLM thresholds learned by distillation to the teacher, weights frozen;
     llrc          LLRC masks learned by distillation to the teacher, weights frozen;
     llrc-ft       the llrc export, then ``--ft-steps`` of task fine-tuning (labels).
   All are exported and scored on the dev split (GLUE test labels are hidden).
Writes ``<out>/<method>_cr<CR>/results.json`` (+ ``ranks.png``) and ``<out>/summary.md``.

  python experiments/glue_llrc.py --task sst2 --out runs/glue_llrc/sst2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import softlm_jax as sl  # noqa: E402
from softlm_jax import data, finetune, metrics, report, train  # noqa: E402
from softlm_jax.models import hf  # noqa: E402

METHODS = ("static-noft", "softlm-noft", "llrc", "llrc-ft")


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", default="sst2", choices=sorted(metrics.GLUE_METRICS))
  ap.add_argument("--model", default="minilm")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--crs", type=finetune.fractions, default="0.2,0.3,0.5",
                  help="compression ratios in (0, 1), comma-separated")
  ap.add_argument("--teacher-steps", type=int, default=215)
  ap.add_argument("--ft-steps", type=int, default=50)
  ap.add_argument("--max-compress-steps", type=int, default=300)
  ap.add_argument("--calib", type=int, default=256, help="calibration sentences (train split, first N)")
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--max-len", type=int, default=None)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--alpha-lr", type=float, default=5e-3)
  ap.add_argument("--mask-lr", type=float, default=5e-2)
  ap.add_argument("--tv-weight", type=float, default=1e-3)
  ap.add_argument("--gamma", type=float, default=1.0)
  ap.add_argument("--budget-growth", type=float, default=1.0,
                  help="LLRC: the budget weight is gamma * growth**step until the budget is met (1 = constant)")
  ap.add_argument("--sharpness", type=float, default=1000.0)
  ap.add_argument("--split", default="dev")
  ap.add_argument("--eval-limit", type=int, default=None)
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--out", default="runs/glue_llrc/sst2")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-progress", action="store_true")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  t_all = time.time()
  max_len = args.max_len or finetune.MAX_LEN[args.task]
  model, tok = hf.load_classifier(args.model, 2, seed=args.seed)
  tr_texts, tr_labels = data.load_glue(args.task, "train", args.data_dir)
  dv_texts, dv_labels = data.load_glue(args.task, args.split, args.data_dir)
  if args.eval_limit:
    dv_texts, dv_labels = dv_texts[:args.eval_limit], dv_labels[:args.eval_limit]
  train_enc, dev_enc = data.tokenize(tok, tr_texts, max_len), data.tokenize(tok, dv_texts, max_len)
  calib_enc = {k: v[:args.calib] for k, v in train_enc.items()}
  progress = not args.no_progress

  def logits_fn(p, inputs):
    return model(**inputs, params=p, train=False).logits

  def task_loss(p, batch, rng):
    logits = model(**batch["inputs"], params=p, dropout_rng=rng, train=True).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def label_batch(step):
    idx = data.batch_indices(len(tr_labels), args.batch_size, step, args.seed)
    return {"inputs": {k: jnp.asarray(v[idx]) for k, v in train_enc.items()},
            "labels": jnp.asarray(tr_labels[idx])}

  def fit(params, tx, cfg, task, batch_fn, ckpt, **kw):
    state = train.init_state(params, tx, seed=args.seed)
    return train.fit(state, train.make_train_step(task, tx, cfg), batch_fn, ckpt_dir=ckpt, save_every=50,
                     progress=progress, max_compress_steps=args.max_compress_steps, **kw)

  # 1. the dense teacher (its checkpoint is kept: later invocations restore it instead of training)
  t0 = time.time()
  teacher_state, _ = fit(model.params, optax.adam(args.lr), None, task_loss, label_batch,
                         os.path.join(args.out, "teacher", "ckpt"), steps=args.teacher_steps)
  teacher = teacher_state.params
  dense_eval = finetune.predict_fn(model, None)
  teacher_metrics, _ = finetune.evaluate(dense_eval, teacher, dev_enc, dv_labels, args.task, 64)
  rows = [{"method": "dense teacher", "CR": 0.0, "removed": "0", **teacher_metrics,
           "steps": args.teacher_steps, "wall (s)": round(time.time() - t0)}]
  print(json.dumps(rows[0]))

  def calib_batch(step):
    idx = data.batch_indices(args.calib, args.batch_size, step, args.seed)
    return {"inputs": {k: jnp.asarray(v[idx]) for k, v in calib_enc.items()}, "teacher": teacher}

  exported_llrc = {}
  methods = args.methods.split(",")
  for cr in args.crs:
    for method in sorted(methods, key=lambda m: m == "llrc-ft"):
      out = os.path.join(args.out, f"{method}_cr{cr}")
      done = os.path.join(out, "results.json")
      if os.path.exists(done) and not (method == "llrc" and "llrc-ft" in methods):
        with open(done) as f:
          res = json.load(f)
        rows.append(res["row"])
        continue
      os.makedirs(out, exist_ok=True)
      t0 = time.time()
      cfg = sl.CompressionConfig(target_ratio=cr, sharpness=args.sharpness, gamma=args.gamma,
                                 alpha_lr=args.alpha_lr, mask_lr=args.mask_lr, tv_weight=args.tv_weight,
                                 budget_growth=args.budget_growth,
                                 method="llrc" if method.startswith("llrc") else "softlm")
      res = {"method": method, "cr": cr, "task": args.task, "eval_split": args.split,
             "calibration": f"{args.task} train, first {args.calib} sentences", "config": vars(args)}
      predict = finetune.predict_fn(model, cfg)
      steps, ev = 0, None  # ev: dev metrics of `final` once computed
      if method == "static-noft":
        final = sl.static_svd(teacher, cfg)
      elif method == "llrc-ft" and cr in exported_llrc:
        final, steps = exported_llrc[cr]
      else:
        cp = sl.compress_params(teacher, cfg)
        tx = sl.make_optimizer(cfg) if cfg.method == "llrc" else sl.make_optimizer(cfg, optax.set_to_zero())
        state, hist = fit(cp, tx, cfg, train.distill_task(logits_fn), calib_batch, os.path.join(out, "ckpt"),
                          target=sl.target_params(cp, cfg))
        steps = int(state.step)
        res.update(history=hist, freeze_step=int(sl.budget_state(state.opt_state).freeze_step))
        train_form, train_logits = finetune.evaluate(predict, state.params, dev_enc, dv_labels, args.task, 64)
        final = sl.export_params(state.params, cfg)
        ev, exp_logits = finetune.evaluate(predict, final, dev_enc, dv_labels, args.task, 64)
        res.update(training_form_metrics=train_form,
                   export_max_abs_logit_diff=float(abs(exp_logits - train_logits).max()))
        if method == "llrc":
          exported_llrc[cr] = (final, steps)
      if method == "llrc-ft":
        ft_state, res["finetune_history"] = fit(final, optax.adam(args.lr), None, task_loss, label_batch,
                                                os.path.join(out, "ckpt_ft"), steps=args.ft_steps)
        final, steps, ev = ft_state.params, steps + args.ft_steps, None
      if ev is None:
        ev, _ = finetune.evaluate(predict, final, dev_enc, dv_labels, args.task, 64)
      res.update(report.budget_results(final, cfg, out, f"{method} {args.model} {args.task} CR={cr}: rank per layer"),
                 metrics=ev, train_steps=steps, wall_s=time.time() - t0)
      res["row"] = report.summary_row(res, {"method": method, "CR": cr}, {k: round(v, 4) for k, v in ev.items()})
      report.write_json(res, done)
      for d in ("ckpt", "ckpt_ft"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
      rows.append(res["row"])
      print(json.dumps(res["row"]))
  cols = list(dict.fromkeys(c for r in rows for c in r))
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(f"# {args.model} {args.task}: fine-tuning-free compression of a fine-tuned teacher "
            f"({args.split} split; calibration: {args.calib} train sentences)\n\n" + report.markdown_table(rows, cols))
  print(open(os.path.join(args.out, "summary.md")).read())
  print(f"total wall {time.time() - t_all:.0f}s")
  return rows


if __name__ == "__main__":
  main()
