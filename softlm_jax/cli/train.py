"""``softlm train``: every method of --methods at every --cr, into one run folder (resumable)."""
from __future__ import annotations

import json
import os
import time

from softlm_jax import run as pipeline
from softlm_jax.cli import common, options

COMMAND, ORDER = "train", 1


def add_parser(sub):
  p = sub.add_parser(COMMAND, help="fine-tune dense / static SVD / SoftLM / LLRC on a GLUE task, your data or "
                     "WikiText-2 (resumable); saves compact checkpoints",
                     description="Trains each method into <out>/<method> (<method>_cr<CR> with several CRs; rerun the "
                     "same command to resume), evaluates the exported model, saves compact.safetensors, writes "
                     "summary.md/json and comparison.png; deletes the training checkpoints unless --keep-ckpt. "
                     "Defaults: the preset (--preset; lm for --task wikitext, glue otherwise).")
  options.add_run_args(p, methods=True)
  p.set_defaults(configs_needed=True)
  return p


def check_run_folder(out: str, method_folder: str, model: str, task: str, cr: float) -> None:
  """A method folder made earlier (e.g. by ``softlm compress``) must be continued with the same model,
  task and CR."""
  path = os.path.join(out, method_folder, "run.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  was = {"model": old.get("model"), "task": (old.get("task") or {}).get("task"),
         "cr": (old.get("compression") or {}).get("target_ratio")}
  now = {"model": model, "task": task, "cr": cr}
  for key in now:
    if was[key] is not None and was[key] != now[key] and not (key == "cr" and method_folder.startswith("dense")):
      raise SystemExit(f"softlm: {path} was made with {key}={was[key]!r}, this command has {now[key]!r}; "
                       "use another --out or the same options")


def run(args) -> dict:
  o = args.options
  t0 = time.time()
  cr_folders = len(o.crs) > 1
  task_name = o.data.task if not o.data.train_file else os.path.splitext(os.path.basename(o.data.train_file))[0]
  for m in o.methods:
    for cr in o.crs:
      folder = pipeline.method_folder(m, cr, cr_folders)
      check_run_folder(o.out, folder, o.model, task_name, cr)
  model, task = pipeline.load(o.model, o.data, seed=o.train.seed)
  results = pipeline.run_comparison(model, task, o.compression, o.train, list(o.methods), list(o.crs), o.out,
                                    cr_folders=cr_folders, run_info={"data": o.data.to_dict(), "preset": o.preset},
                                    recipes=o.recipes)
  with open(os.path.join(o.out, "summary.md")) as f:
    table = f.read().split("\n\n", 2)[-1]
  lines = table.rstrip("\n").split("\n")
  lines += ["", f"wall time {time.time() - t0:.0f}s; results: {o.out}/summary.md, {o.out}/comparison.png"]
  lines += [f"compact checkpoint: {r['compact_checkpoint']['path']}" for r in results.values()
            if "compact_checkpoint" in r]
  common.banner("softlm train", lines)
  return results
