"""The same run through two entry points: ``softlm train --task wikitext`` and ``experiments/lm.py``.

Both are stopped after ``--stop-after`` steps of SoftLM (``--stop-after``: the checkpoint is saved and the
run would resume there); the script then compares their ``run.json`` configs, the logged losses and the
saved parameters leaf by leaf. Everything else is each entry point's defaults (the ``lm-softlm`` preset,
the SoftLM recipe).

  python experiments/same_run.py --model smollm2 --cr 0.5 --stop-after 10 --out runs/same_run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--cr", default="0.5")
  ap.add_argument("--stop-after", default="10")
  ap.add_argument("--out", default="runs/same_run")
  ap.add_argument("extra", nargs="*", help="more options given to both (after --)")
  args = ap.parse_args(argv)
  common = ["--model", args.model, "--preset", "lm-softlm", "--methods", "softlm", "--stop-after", args.stop_after,
            "--no-progress", "--keep-ckpt", *args.extra]
  runs = {"softlm train": ([sys.executable, "-m", "softlm_jax.cli", "train", "--task", "wikitext", "--cr", args.cr],
                           os.path.join(args.out, "cli")),
          "experiments/lm.py": ([sys.executable, os.path.join(ROOT, "experiments", "lm.py"), "--crs", args.cr],
                                os.path.join(args.out, "lm_py"))}
  for name, (cmd, out) in runs.items():
    print(f"== {name}: {' '.join(cmd + common)} --out {out}", flush=True)
    subprocess.run(cmd + common + ["--out", out], check=True, cwd=ROOT)
  import orbax.checkpoint as ocp
  folders = [os.path.join(args.out, "cli", "softlm"), os.path.join(args.out, "lm_py", f"softlm_cr{args.cr}")]
  confs = [json.load(open(os.path.join(f, "run.json"))) for f in folders]
  same_conf = all(confs[0][k] == confs[1][k] for k in ("compression", "train", "data"))
  hists = [[json.loads(x) for x in open(os.path.join(f, "ckpt", "history.jsonl"))] for f in folders]
  states = []
  for f in folders:
    mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(f, "ckpt")))
    states.append(mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore()))
  import jax
  leaves = [jax.tree.leaves(s["params"]) for s in states]
  max_diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                 for a, b in zip(*leaves))
  res = {"configs_equal": same_conf, "steps": [int(s["step"]) for s in states],
         "losses": [[h.get("loss") for h in hist] for hist in hists],
         "task_losses": [[h.get("task_loss") for h in hist] for hist in hists],
         "params_max_abs_diff": max_diff, "n_leaves": len(leaves[0])}
  with open(os.path.join(args.out, "same_run.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
