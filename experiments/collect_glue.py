"""Collects runs/glue/<task>/<method>/results.json into one Markdown table (for BENCHMARKS.md).

  python experiments/collect_glue.py runs/glue > runs/glue/all.md
"""
import glob
import json
import os
import sys

ORDER = {"dense": 0, "static": 1, "softlm": 2}


def main(root):
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "*", "*", "results.json"))):
    r = json.load(open(path))
    rows.append(r)
  dense = {r["task"]: r for r in rows if r["method"] == "dense"}
  print("| task (dev) | method | selected-linear params | removed | main metric | value | vs dense | "
        "other | steps | budget met at | wall (s) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in sorted(rows, key=lambda r: (r["task"], ORDER.get(r["method"], 9))):
    b = r.get("budget")
    main = r["main_metric"]
    val = r["metrics"][main]
    rel = f"{val - dense[r['task']]['metrics'][main]:+.4f}" if r["task"] in dense else ""
    other = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if k != main)
    print(f"| {r['task']} | {r['method']} | {b['counted_params'] if b else b_dense(r)} | "
          f"{b['achieved_ratio']:.3f} | {main} | {val:.4f} | {rel} | {other} | {r['train_steps']} | "
          f"{r.get('freeze_step', '')} | {r['wall_s']:.0f} |" if b else
          f"| {r['task']} | {r['method']} | {b_dense(r)} | 0 | {main} | {val:.4f} | | {other} | "
          f"{r['train_steps']} | | {r['wall_s']:.0f} |")


def b_dense(r):
  return "dense"


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/glue")
