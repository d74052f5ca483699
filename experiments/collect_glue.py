"""Collects runs/glue/<task>/<method>/results.json (experiments/glue.py) into one Markdown table: the
table of BENCHMARKS.md#glue.

Rows are glue.py's own summary rows, plus the main metric's difference to the dense run of the task.

  python experiments/collect_glue.py runs/glue > runs/glue/all.md
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue import summary_row  # noqa: E402
from softlm_jax import report  # noqa: E402

ORDER = {"dense": 0, "static": 1, "softlm": 2}


def main_value(res) -> float:
  """The main metric on the first evaluation split (results hold ``{split: {metric: value}}``)."""
  first = next(iter(res["metrics"].values()))
  return first[res["main_metric"]] if isinstance(first, dict) else res["metrics"][res["main_metric"]]


def main(root):
  runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(root, "*", "*", "results.json")))]
  runs.sort(key=lambda r: (r["task"], ORDER.get(r["method"], 9)))
  dense = {r["task"]: main_value(r) for r in runs if r["method"] == "dense"}
  rows = []
  for r in runs:
    row = summary_row(r)
    if r["method"] != "dense" and r["task"] in dense:
      row["main metric vs dense"] = f"{main_value(r) - dense[r['task']]:+.4f}"
    rows.append(row)
  print(report.markdown_table(rows, list(dict.fromkeys(c for row in rows for c in row))), end="")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/glue")
