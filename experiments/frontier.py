"""The training-free frontier on SmolLM2-135M: an ablation table, one ingredient a row. Regenerates the
tables of BENCHMARKS.md#training-free-language-model and the decomposition rows of BENCHMARKS.md#ablations.

Rows (``--rows``), each at every ``--crs``:
  whitened     whitened SVD (SVD-LLM's truncation), the uniform keep-ratio (``static_svd``);
  propagated   + the propagated, error-aware decomposition (``softlm_jax.propagate``, ``--mix``; several
               values = the mixing-weight sweep), uniform ranks;
  allocated    + the global loss-aware allocation: the pipeline's ``allocated`` method itself
               (``softlm_jax.run.Comparison.static_tree``, what ``softlm compress`` writes: Fisher scores of
               the whitened triplets from one gradient pass over the calibration set, the exact budget
               fill, then the propagated factors fit at the allocated ranks; ``--no-repropagate``: the
               whitened ones; the default mix only);
  refit        + the calibration-only block refit (``softlm_jax.refit``) of the ``--refit-base`` row's
               exported model (``--refit-steps`` Adam steps per block at ``--refit-lr``).
Calibration: the first ``--calib`` windows of ``--seq-len`` tokens of WikiText-2 valid, in batches of
``--batch-size`` (the same tokens for every stage). Perplexity: softlm_jax.tasks' protocol (the first
200,000 characters of the raw test split, ``--eval-windows`` x ``--eval-len`` tokens).

Each row writes ``<out>/<row>_cr<CR>/results.json`` (a finished row is skipped; the refit resumes from
its per-block checkpoints); the exported trees of the propagated rows are kept (``tree.npz``) for the
rows built on them. Every stage's compute is given in CPU-seconds (``time.process_time``: all threads of
this process) and wall seconds, with the load average.

  python experiments/frontier.py --rows whitened,propagated --crs 0.5 --mix 0.5,1,0 --out runs/frontier
  python experiments/frontier.py --rows propagated,refit --crs 0.2,0.3,0.5 --mix 0.5 --out runs/frontier
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import files, propagate, refit, run, tasks  # noqa: E402

ROWS = ("whitened", "propagated", "allocated", "refit")


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2", help="a causal LM (softlm_jax.models; tests: tiny-llama)")
  ap.add_argument("--rows", default="whitened,propagated")
  ap.add_argument("--crs", default="0.2,0.3,0.5")
  ap.add_argument("--mix", default=str(propagate.DEFAULT_MIX), help="propagated: mixing weight(s), comma-separated")
  ap.add_argument("--base-mix", type=float, default=propagate.DEFAULT_MIX,
                  help="the propagated factors that allocated / refit rows build on")
  ap.add_argument("--repropagate", action=argparse.BooleanOptionalAction, default=True,
                  help="allocated: the propagated factors fit at the allocated ranks (else the whitened ones)")
  ap.add_argument("--refit-base", default="propagated", choices=("whitened", "propagated", "allocated", "file"))
  ap.add_argument("--base-file", default=None, help="refit --refit-base file: this compact checkpoint (e.g. what "
                  "`softlm compress` wrote at the same CR)")
  ap.add_argument("--refit-steps", type=int, default=refit.RefitConfig.steps)
  ap.add_argument("--refit-lr", type=float, default=refit.RefitConfig.lr)
  ap.add_argument("--refit-inputs", default=refit.RefitConfig.inputs, choices=refit.INPUTS)
  ap.add_argument("--refit-loss", default=refit.RefitConfig.loss, choices=refit.LOSSES)
  ap.add_argument("--calib", type=int, default=64, help="calibration windows (of --seq-len tokens)")
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--eval-len", type=int, default=512)
  ap.add_argument("--out", default="runs/frontier")
  ap.add_argument("--no-progress", action="store_true")
  return ap.parse_args(argv)


class Stage:
  """Times a stage in CPU-seconds (this process, all threads) and wall seconds."""

  def __init__(self, stages: dict, name: str):
    self.stages, self.name = stages, name

  def __enter__(self):
    self.cpu, self.wall = time.process_time(), time.time()
    return self

  def __exit__(self, *exc):
    self.stages[self.name] = {"cpu_s": round(time.process_time() - self.cpu, 1),
                              "wall_s": round(time.time() - self.wall, 1), "load": list(os.getloadavg())}
    print(f"  {self.name}: {self.stages[self.name]}", flush=True)


def flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else k
    out.update(flat(v, key) if isinstance(v, dict) else {key: v})
  return out


def unflat(d) -> dict:
  out: dict = {}
  for key in d:
    node = out
    *head, last = key.split("/")
    for k in head:
      node = node.setdefault(k, {})
    node[last] = jnp.asarray(d[key])
  return out


def save_tree(path: str, tree: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat(tree).items()})
  os.replace(tmp, path)


def load_tree(path: str) -> dict:
  with np.load(path) as z:
    return unflat({k: z[k] for k in z.files})


def main(argv=None):
  args = parse(argv)
  rows = [r for r in args.rows.split(",") if r]
  bad = [r for r in rows if r not in ROWS]
  if bad:
    raise SystemExit(f"unknown rows {bad}; expected {ROWS}")
  crs = [float(c) for c in args.crs.split(",")]
  mixes = [float(m) for m in args.mix.split(",")]
  os.makedirs(args.out, exist_ok=True)
  dcfg = tasks.DataConfig(task=tasks.LM_TASK, seq_len=args.seq_len, eval_len=args.eval_len,
                          eval_windows=args.eval_windows)
  model, task = run.load(args.model, dcfg)
  dense = model.params
  calib = task.windows["train"][:args.calib]
  test = task.windows["test"]
  batches = task.calib_batches(args.calib, args.batch_size)  # the pipeline's calibration set: the same windows
  tokens = int(calib.size)
  logits = model.logits_fn()
  calibration = (logits, batches, None)
  progress = not args.no_progress
  memo: dict = {}

  def pipeline():
    """The pipeline's run state on the same calibration windows (the allocated row is its method)."""
    if "comparison" not in memo:
      tcfg = run.TrainConfig(calib_grams=args.calib, batch_size=args.batch_size, progress=progress)
      memo["comparison"] = run.Comparison(model, task, sl.CompressionConfig(), tcfg, os.path.join(args.out, "_run"))
    return memo["comparison"]

  def done(name):
    path = os.path.join(args.out, name, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    return None

  def finish(name, row, cr, tree_, cfg, stages, extra):
    with Stage(stages, "eval"):
      ppl = tasks.perplexity(model, tree_, None, test)
    dense_n = sl.dense_params(dense, cfg)
    counted = int(sl.count_params(tree_, cfg))
    res = {"row": row, "cr": cr, "ppl": ppl, "calib_tokens": tokens, "calib": f"first {args.calib} x {args.seq_len} "
           "tokens of wikitext-2 valid", "eval_split": tasks.eval_split_name(test), "counted": counted,
           "dense": dense_n, "removed": 1 - counted / dense_n, "stages": stages, **extra,
           "args": vars(args)}
    os.makedirs(os.path.join(args.out, name), exist_ok=True)
    files.write_json(res, os.path.join(args.out, name, "results.json"))
    print(f"{name}: ppl {ppl:.2f} removed {res['removed']:.4f} "
          f"cpu {sum(s['cpu_s'] for s in stages.values()):.0f}s", flush=True)
    return res

  def whitened_factors(cfg, stages):
    """The pipeline's whitened factors (its Grams and decomposition, computed once for every row and CR)."""
    with Stage(stages, "grams+decompose"):
      return pipeline().factors("dense", dense, cfg)

  def propagated_tree(cr, mix, stages):
    """The exported uniform-rank tree from propagated factors at (cr, mix), cached on disk."""
    name = f"propagated-m{mix:g}_cr{cr:g}"
    path = os.path.join(args.out, name, "tree.npz")
    cfg = sl.CompressionConfig(target_ratio=cr, decomposition="whitened", normalize="uniform_rank")
    if os.path.exists(path):
      return name, load_tree(path), cfg
    with Stage(stages, "propagate"):
      f = propagate.propagated_factors(dense, cfg, calibration, mix=mix, progress=progress)
    memo[("factors", cr, mix)] = f
    tree_ = sl.static_svd(dense, cfg, factors=f)
    os.makedirs(os.path.join(args.out, name), exist_ok=True)
    save_tree(path, {k: v for k, v in tree_.items()})
    return name, tree_, cfg

  for row in rows:
    for cr in crs:
      cfg = sl.CompressionConfig(target_ratio=cr, decomposition="whitened", normalize="uniform_rank")
      if row == "whitened":
        name = f"whitened_cr{cr:g}"
        if done(name):
          continue
        stages: dict = {}
        f = whitened_factors(cfg, stages)
        finish(name, row, cr, sl.static_svd(dense, cfg, factors=f), cfg, stages, {})
      elif row == "propagated":
        for mix in mixes:
          name = f"propagated-m{mix:g}_cr{cr:g}"
          if done(name):
            continue
          stages = {}
          _, tree_, cfg = propagated_tree(cr, mix, stages)
          finish(name, row, cr, tree_, cfg, stages, {"mix": mix})
      elif row == "allocated":
        name = f"allocated-m{args.base_mix:g}_cr{cr:g}"
        if done(name):
          continue
        if args.repropagate and args.base_mix != propagate.DEFAULT_MIX:
          raise SystemExit(f"--rows allocated is the pipeline's allocated method, fit at mix {propagate.DEFAULT_MIX} "
                           f"(--base-mix {args.base_mix} is for the propagated / refit rows)")
        stages = {}
        comp = pipeline()
        # the scores serve every CR (the first CR's stage holds the Grams, the whitened decomposition and
        # the gradient pass); the fill runs per CR
        with Stage(stages, "allocate"):
          ranks = comp.allocation("dense", dense, cfg)
          tree_ = comp.static_tree("dense", dense, cfg, allocated=True)
        extra = {"mix": args.base_mix, "ranks": ranks, "repropagate": args.repropagate, "scored_on": "whitened"}
        with Stage(stages, "eval_whitened_allocated"):
          extra["ppl_whitened_allocated"] = tasks.perplexity(model, tree_, None, test)
        print(f"  whitened factors at the allocated ranks: ppl {extra['ppl_whitened_allocated']:.2f}", flush=True)
        if args.repropagate:
          with Stage(stages, "propagate"):
            tree_ = comp.static_tree("dense", dense, cfg.replace(decomposition="propagated"), allocated=True)
        path = os.path.join(args.out, name, "tree.npz")
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        save_tree(path, tree_)
        finish(name, row, cr, tree_, cfg, stages, extra)
      elif row == "refit":
        rcfg = refit.RefitConfig(steps=args.refit_steps, lr=args.refit_lr, inputs=args.refit_inputs,
                                 loss=args.refit_loss)
        tag = {"whitened": "whitened", "file": "file"}.get(args.refit_base, f"{args.refit_base}-m{args.base_mix:g}")
        name = f"refit-{tag}-s{rcfg.steps}-lr{rcfg.lr:g}-{rcfg.inputs}-{rcfg.loss}_cr{cr:g}"
        if done(name):
          continue
        stages = {}
        if args.refit_base == "propagated":
          _, base, cfg = propagated_tree(cr, args.base_mix, stages)
        elif args.refit_base == "file":
          base, info = sl.load_compact(args.base_file)
          if abs(info["target_ratio"] - cr) > 1e-9:
            raise SystemExit(f"{args.base_file} has CR {info['target_ratio']}, this row {cr}")
        elif args.refit_base == "allocated":
          base = load_tree(os.path.join(args.out, f"allocated-m{args.base_mix:g}_cr{cr:g}", "tree.npz"))
        else:
          base = sl.static_svd(dense, cfg, factors=whitened_factors(cfg, stages))
        with Stage(stages, "refit"):
          tree_ = refit.refit_blocks(dense, base, calibration, rcfg,
                                     ckpt_dir=os.path.join(args.out, name, "ckpt"), progress=progress)
        finish(name, row, cr, tree_, cfg, stages, {"mix": args.base_mix, "refit": vars(args) and
                                                   {"steps": rcfg.steps, "lr": rcfg.lr, "inputs": rcfg.inputs,
                                                    "base": args.refit_base, "base_file": args.base_file}})


if __name__ == "__main__":
  main()
