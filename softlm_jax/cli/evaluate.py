"""``softlm eval``: the task metric (GLUE, your data) or the perplexity of a compact checkpoint."""
from __future__ import annotations

import os
import time

from softlm_jax import data, files, models, report, tasks
from softlm_jax.cli import common, options

COMMAND, ORDER = "eval", 3


def add_parser(sub):
  p = sub.add_parser(COMMAND, help="GLUE metric / your data's metric / perplexity of a compact checkpoint")
  p.add_argument("checkpoint", help="a compact .safetensors file, or a --model spec (e.g. smollm2): the dense model "
                 "as loaded, the reference for the same windows")
  options.add_data_args(p)
  for action in p._actions:
    if action.dest == "task":
      action.help = "default: the task it was trained on; a GLUE task or 'wikitext'"
  p.add_argument("--heldout", action="store_true",
                 help="wikitext: the windows of the raw test split after the scored first 200,000 characters "
                 "(text no run scores or tunes on), instead of the scored ones")
  p.add_argument("--batch-size", type=options.positive_int, default=32)
  p.add_argument("--out", default=None, help="results folder (default: next to the checkpoint)")
  return p


def load(args):
  """``(params, info, model, cfg, load_s)``: the compact file's (:func:`common.load_compact_model`), or
  with a model spec the dense model as loaded (a causal LM for ``--task wikitext``)."""
  if os.path.isfile(args.checkpoint) or args.checkpoint.endswith(".safetensors"):
    return common.load_compact_model(args.checkpoint)
  t = time.time()
  model = models.load(args.checkpoint, "causal_lm" if args.task == tasks.LM_TASK else "classifier")
  info = {"metadata": {"method": "dense"}, "source_model": model.name, "achieved_ratio": 0.0, "counted_params": None}
  return model.params, info, model, None, time.time() - t


def run(args) -> dict:
  params, info, model, cfg, load_s = load(args)
  meta = info["metadata"]
  task = args.task or (None if args.train_file else meta.get("task"))
  # a dense model spec has no compression config and no file to sit beside
  out = args.out or (os.path.join("runs", "eval") if cfg is None else os.path.dirname(os.path.abspath(args.checkpoint)))
  os.makedirs(out, exist_ok=True)
  t = time.time()
  res = {"checkpoint": os.path.abspath(args.checkpoint), "method": meta.get("method"), "model": info["source_model"],
         "achieved_ratio": info["achieved_ratio"], "counted_params": info["counted_params"], "load_s": load_s}
  if task == tasks.LM_TASK:
    windows = tasks.wikitext_windows(model.tokenizer, seq_len=8, eval_len=args.eval_len or 512,
                                     eval_windows=args.eval_windows or 16, data_dir=args.data_dir, train=False,
                                     heldout=args.heldout)
    model.check_ids(windows["test"], f"softlm eval {args.checkpoint}: the wikitext test windows")
    split = "heldout" if args.heldout else "test"
    res.update(task=tasks.LM_TASK, eval_split=tasks.eval_split_name(windows["test"], args.heldout), main_metric="ppl",
               metrics={split: {"ppl": tasks.perplexity(model, params, cfg, windows["test"], progress=True)}})
  else:
    if task is None and not args.train_file:
      raise SystemExit("softlm: give --task (or --train-file/--eval-file): the checkpoint does not name its task")
    if args.train_file:
      kind = "regression" if meta.get("num_labels") == 1 else "classification"
      eval_file = args.eval_file or args.train_file
      d = data.load_table(eval_file, args.text_cols, args.label_col, task_type=kind,
                          label_names=meta.get("label_names")).head(args.eval_limit)
      evals, task_name = {"eval": d}, os.path.splitext(os.path.basename(eval_file))[0]
    else:
      t_ = data.glue_task(task)
      evals = {s: data.load_glue_split(t_.name, s, args.data_dir).head(args.eval_limit) for s in t_.eval_splits}
      task_name = t_.name
    max_len = args.max_len or meta.get("max_len") or tasks.MAX_LEN.get(task_name, 128)
    predict = tasks.predict_fn(model, cfg)
    res.update(task=task_name, eval_splits={s: d.source for s, d in evals.items()}, metrics={})
    for split, d in evals.items():
      enc = data.tokenize(model.tokenizer, d.texts, max_len)
      model.check_ids(enc["input_ids"], f"softlm eval {args.checkpoint}: {task_name} {split}")
      logits = tasks.predict_all(predict, params, enc, args.batch_size)
      res["main_metric"], res["metrics"][split] = tasks.score(task_name, logits, d)
      print(f"[eval] {task_name} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in res["metrics"][split].items()))
  res["eval_s"] = time.time() - t
  stem = os.path.splitext(os.path.basename(args.checkpoint))[0] + ("_heldout" if args.heldout else "")
  files.write_json(res, os.path.join(out, f"eval_{stem}_{res['task']}.json"))
  rows = [{"split": s, **{k: round(v, 4) for k, v in m.items()}} for s, m in res["metrics"].items()]
  with open(os.path.join(out, f"eval_{stem}_{res['task']}.md"), "w") as f:
    f.write(report.markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r))))
  common.banner("softlm eval", [f"{args.checkpoint}: {res['method']} of {res['model']}, removed "
                                f"{res['achieved_ratio']:.3f}",
                                *[f"{res['task']} {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                                  for s, m in res["metrics"].items()],
                                f"load {load_s:.2f}s, eval {res['eval_s']:.1f}s; "
                                f"results: {out}/eval_{stem}_{res['task']}.json"])
  return res
