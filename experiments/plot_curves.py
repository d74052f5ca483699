"""Perplexity against training step, one line per run, from experiments/lm.py's ``--eval-every`` curves:
the figure ``docs/smollm2_cr05_curves.png`` (BENCHMARKS.md#language-model-after-fine-tuning).

  python experiments/plot_curves.py runs/lm/w_kd_ramp/softlm_cr0.5 runs/lm/w_kd_ramp/static_cr0.5 \
      --labels "SoftLM whitened + KD + ramp" "static whitened + KD" --out docs/smollm2_cr05_curves.png

Each run's ``results.json`` holds ``history`` rows; those with ``curve_ppl`` (the perplexity on the first
``--curve-windows`` raw-test windows, logged every ``--eval-every`` steps) are plotted. A vertical
dotted line marks the step at which a SoftLM run met its budget.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax import report  # noqa: E402


def curve(res: dict) -> tuple[list, list]:
  """``(steps, ppl)`` of the rows of ``res["history"]`` that carry ``curve_ppl``."""
  rows = [r for r in res.get("history", []) if "curve_ppl" in r]
  return [r["step"] for r in rows], [r["curve_ppl"] for r in rows]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="run folders holding results.json")
  ap.add_argument("--labels", nargs="*", default=None)
  ap.add_argument("--dense", type=float, default=None, help="dense perplexity on the same windows (a line)")
  ap.add_argument("--out", default="docs/lm_curves.png")
  ap.add_argument("--title", default="SmolLM2-135M: perplexity during training (WikiText-2 raw test windows)")
  args = ap.parse_args(argv)
  if args.labels and len(args.labels) != len(args.runs):
    raise SystemExit(f"{len(args.labels)} labels for {len(args.runs)} runs")
  fig, ax = plt.subplots(figsize=(7, 4.2))
  plotted = 0
  for i, run in enumerate(args.runs):
    with open(os.path.join(run, "results.json")) as f:
      res = json.load(f)
    xs, ys = curve(res)
    if not xs:
      print(f"{run}: no curve_ppl rows (run lm.py with --eval-every)")
      continue
    label = args.labels[i] if args.labels else os.path.basename(run.rstrip("/"))
    (line,) = ax.plot(xs, ys, "o-", ms=3, label=label)
    if res.get("freeze_step", -1) >= 0:
      ax.axvline(res["freeze_step"] + 1, color=line.get_color(), ls=":", lw=1)
    plotted += 1
  if not plotted:
    raise SystemExit("nothing to plot")
  report.save_ppl_plot(fig, ax, args.out, xlabel="training step", title=args.title, dense=args.dense)

if __name__ == "__main__":
  main()
