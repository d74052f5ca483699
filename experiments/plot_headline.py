"""The README's picture: SmolLM2-135M perplexity against the fraction of the block linears removed, the
recommended recipe against uniform whitened truncation (SVD-LLM's), read from the table of
BENCHMARKS.md#training-free-language-model (the figures' one source; each row there has its command).

  python experiments/plot_headline.py --out docs/smollm2_frontier.png
"""
from __future__ import annotations

import argparse
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Training-free language model"
#: (label in the plot, a regex matching the first cell of the BENCHMARKS row)
ROWS = [("uniform whitened SVD (SVD-LLM's truncation)", r"^whitened SVD, the same keep-ratio.*", "128 x 128"),
        ("softlm compress (Fisher allocation + propagated fit)", r"the `lm` preset: `softlm compress`", None),
        ("+ block refit (softlm train --methods allocated-refit)", r"\+ block refit", None)]
DENSE = 36.15


def _number(cell: str) -> float:
  return float(re.sub(r"[*,]", "", cell.strip()).split()[0])


def read_table(path: str) -> tuple[list[float], dict[str, list[float]]]:
  """``(CRs, {label: perplexities})`` of the training-free table of BENCHMARKS.md."""
  text = open(path).read()
  body = text[text.index(SECTION):]
  body = body[:body.index("\n## ", 1)]
  lines = [ln for ln in body.splitlines() if ln.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  crs = [float(h.split()[-1]) for h in header if h.startswith("CR ")]
  first = header.index(next(h for h in header if h.startswith("CR ")))
  out = {}
  for ln in lines[2:]:
    cells = [c.strip() for c in ln.strip("|").split("|")]
    name = cells[0].replace("*", "")
    for label, pattern, calib in ROWS:
      if label not in out and re.search(pattern, name) and (calib is None or cells[1] == calib):
        out[label] = [_number(c) for c in cells[first:first + len(crs)]]
  missing = [label for label, _, _ in ROWS if label not in out]
  if missing:
    raise ValueError(f"{path}: no row for {missing} in the table under {SECTION!r}")
  return crs, out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--benchmarks", default=os.path.join(ROOT, "BENCHMARKS.md"))
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "smollm2_frontier.png"))
  args = ap.parse_args(argv)
  crs, rows = read_table(args.benchmarks)
  import matplotlib  # plotting only: imported on use
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  for (label, ppl), marker, dy in zip(rows.items(), "osD", (4, 4, -11)):
    ax.plot(crs, ppl, marker=marker, label=label)
    for x, y in zip(crs, ppl):
      ax.annotate(f"{y:,.0f}" if y >= 100 else f"{y:.1f}", (x, y), textcoords="offset points", xytext=(5, dy),
                  fontsize=7)
  ax.axhline(DENSE, color="gray", ls="--", lw=1, label=f"dense ({DENSE})")
  ax.set_yscale("log")
  ax.set_xlabel("fraction of the block linears' parameters removed (CR)")
  ax.set_ylabel("WikiText-2 raw-test perplexity (log)")
  ax.set_title("SmolLM2-135M, no fine-tuning (128 x 128 calibration tokens)", fontsize=9)
  ax.set_xticks(crs)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
