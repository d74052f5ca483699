"""``softlm compress``: a model + config -> a training-form checkpoint at step 0 (a learned rule;
continue with ``softlm train``) or an exported static-SVD compact checkpoint."""
from __future__ import annotations

import os
import time

import softlm_jax as sl
from softlm_jax import files, run as pipeline, train
from softlm_jax.cli import common, options
from softlm_jax.cli.train import check_run_folder

COMMAND, ORDER = "compress", 0


def add_parser(sub):
  p = sub.add_parser(COMMAND, help="model + config -> a compressed model, no weight trained (compact checkpoint), "
                     "or a learned rule's training-form state",
                     description="Compresses a model with no weight trained by gradient. allocated (the default "
                     "of the lm and glue presets) and static write the exported model to "
                     "<out>/<method>/compact.safetensors: allocated at the ranks of a global loss-aware allocation "
                     "(one gradient pass over the calibration set), static at the same keep-ratio in every layer, "
                     "both from the preset's decomposition (lm: propagated; glue: whitened). On a classifier the "
                     "glue preset compresses the fine-tuned dense teacher of an earlier `softlm train --methods "
                     "dense` in the same --out. A learned rule (softlm, llrc) writes its training-form state at "
                     "step 0 to <out>/<method>/ckpt (continue with `softlm train`).")
  options.add_run_args(p, methods=False)
  p.set_defaults(configs_needed=True)
  return p


def run(args) -> dict:
  o = args.options
  method = pipeline.parse_method(o.methods[0])
  if not method.compressed:
    raise ValueError("softlm compress takes a compressed method (allocated, static, softlm, llrc, ...), not dense")
  if method.variant == "refit":
    raise ValueError(f"softlm compress trains nothing; {method.name} refits blocks by gradient: run `softlm train "
                     f"--methods {method.name}` (or compress with --method {method.base})")
  cr = o.crs[0]
  task_name = o.data.task if not o.data.train_file else os.path.splitext(os.path.basename(o.data.train_file))[0]
  check_run_folder(o.out, method.name, o.model, task_name, cr)
  model, task = pipeline.load(o.model, o.data, seed=o.train.seed)
  comp = pipeline.Comparison(model, task, o.compression, o.train, o.out, recipes=o.recipes,
                             run_info={"data": o.data.to_dict(), "preset": o.preset})
  if comp.teacher is None and pipeline.compresses_teacher(method, o.train):
    teacher_results = os.path.join(comp.folder(pipeline.parse_method("dense"), cr), "results.json")
    if not os.path.exists(teacher_results):
      raise ValueError(f"{method.name} on a classifier compresses the fine-tuned dense teacher, and {o.out} has "
                       f"none ({teacher_results} is missing): run `softlm train --methods dense --out {o.out}` "
                       "with the same --task/--model first (softlm compress trains nothing), or pass "
                       "--compress-from dense")
    comp.run_method("dense", cr)  # reads the finished run back: its teacher.safetensors
  t = time.time()
  params, cfg = comp.initial(method, cr)
  folder = comp.folder(method, cr)
  os.makedirs(folder, exist_ok=True)
  comp.write_run_json(folder, method, cfg)
  print(f"[compress] {method.name} CR {cfg.target_ratio}: {time.time() - t:.1f}s")
  rep = sl.budget_report(params, cfg)
  summary = {"method": method.name, "model": o.model, "task": task.name, "counted_params": rep["counted_params"],
             "dense_params": rep["dense_params"], "target_params": rep["target_params"]}
  if method.rule is None:
    saved = comp.save_compact(method, folder, params, cfg, 0, rep["budget_met"])
    summary.update(compact_checkpoint=saved.pop("path"), **saved)
  else:
    train.save_checkpoint(os.path.join(folder, "ckpt"),
                          train.init_state(params, comp.optimizer(method, cfg), seed=o.train.seed))
    summary["training_checkpoint"] = os.path.join(folder, "ckpt")
  files.write_json(summary, os.path.join(folder, "compress.json"))
  lines = [f"model {o.model}, task {task.name}, method {method.name}, CR {cfg.target_ratio}",
           f"selected linears: {rep['dense_params']:,} params dense, target {rep['target_params']:,}, "
           f"now {rep['counted_params']:,}"]
  if method.rule is None:
    lines.append(f"compact checkpoint: {summary['compact_checkpoint']} ({summary['file_bytes'] / 2**20:.1f} MiB)")
  else:
    lines.append(f"training-form state (step 0): {summary['training_checkpoint']}")
    lines.append(f"next: softlm train --out {o.out} --methods {method.name} (same --task/--model/--cr)")
  common.banner("softlm compress", lines)
  return summary
