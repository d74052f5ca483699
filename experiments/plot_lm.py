"""Perplexity against fraction removed, one line per method, from experiments/lm.py's results: the figure
``docs/smollm2_wikitext2_ppl.png``.

  python experiments/plot_lm.py runs/lm/smollm2 runs/lm/smollm2_llrc2 --out docs/smollm2_wikitext2_ppl.png

Reads every ``<dir>/<method>_cr<CR>/results.json`` (and ``<dir>/dense/results.json`` for the dense
line). The x axis is the fraction of block-linear parameters actually removed (the counted budget, not
the requested CR), the y axis the WikiText-2 perplexity on a log scale.
"""
import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax import report  # noqa: E402

LABELS = {"softlm": "SoftLM (+ fine-tune)", "static": "static SVD + same fine-tune",
          "static-noft": "static SVD, frozen", "softlm-noft": "SoftLM thresholds, frozen weights",
          "llrc": "LLRC, frozen weights", "llrc-ft": "LLRC + 10 fine-tune steps"}


def load(dirs) -> tuple[dict, float | None]:
  """``({method: [(removed, ppl), ...] sorted}, dense ppl or None)`` from the results under ``dirs``."""
  series, dense = {}, None
  for d in dirs:
    for path in sorted(glob.glob(os.path.join(d, "*", "results.json"))):
      with open(path) as f:
        res = json.load(f)
      if res["method"] == "dense":
        dense = res["ppl"]
      elif "budget" in res:
        series.setdefault(res["method"], []).append((res["budget"]["achieved_ratio"], res["ppl"]))
  return {m: sorted(pts) for m, pts in series.items()}, dense


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("dirs", nargs="+")
  ap.add_argument("--out", default="docs/lm_ppl.png")
  ap.add_argument("--title", default="SmolLM2-135M, WikiText-2 raw test")
  args = ap.parse_args(argv)
  series, dense = load(args.dirs)
  if not series:
    raise SystemExit(f"no compressed runs (results.json with a budget) under {args.dirs}")
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for method, pts in sorted(series.items()):
    xs, ys = zip(*pts)
    ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=LABELS.get(method, method))
  report.save_ppl_plot(fig, ax, args.out, xlabel="fraction of block-linear parameters removed", title=args.title,
                       dense=dense)

if __name__ == "__main__":
  main()
