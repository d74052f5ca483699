"""Reports: results JSON, Markdown tables and the rank heatmap (paper Figure 6: blocks x layer types)."""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from softlm_jax import distributed
from softlm_jax.budget import budget_report


def block_and_type(path: str) -> tuple[int, str]:
  """``"bert/encoder/layer/3/attention/self/query"`` -> ``(3, "attention/self/query")``."""
  m = re.search(r"/(\d+)/(.*)$", path)
  if not m:
    return -1, path
  return int(m.group(1)), m.group(2)


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[int], list[list[Optional[int]]]]:
  """(layer types, blocks, grid[type][block]) from ``{path: rank}``."""
  cells = {block_and_type(p): int(r) for p, r in ranks.items()}
  types = sorted({t for _, t in cells}, key=lambda t: list(dict.fromkeys(t2 for _, t2 in cells)).index(t))
  blocks = sorted({b for b, _ in cells})
  return types, blocks, [[cells.get((b, t)) for b in blocks] for t in types]


def save_ppl_plot(fig, ax, path: str, *, xlabel: str, title: str, dense: Optional[float] = None) -> None:
  """Finishes a perplexity plot the way the experiments share (log y, grid, legend, dense as a dashed
  line) and writes it to ``path`` (PNG, folder created)."""
  if dense is not None:
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f})")
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("perplexity (log scale)")
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if distributed.is_main():  # several processes: process 0 writes
    fig.savefig(path, dpi=120)
  print(f"wrote {path}")


def budget_summary(params, cfg) -> dict:
  """The counts of a compressed tree (pure; no files): ``{"budget": totals, "ranks": {path: rank},
  "full": {path: min(rows, cols)}}``, all from :func:`softlm_jax.budget_report` (the one count).
  ``budget`` holds ``counted_params``, ``dense_params``, ``target_params``, ``achieved_ratio`` and
  ``budget_met``."""
  rep = budget_report(params, cfg)
  return {"budget": {k: v for k, v in rep.items() if k != "layers"},
          "ranks": {p: v["rank"] for p, v in rep["layers"].items()},
          "full": {p: min(v["shape"]) for p, v in rep["layers"].items()}}


def plot_ranks(summary: Mapping, path: str, title: str = "") -> None:
  """Writes the rank heatmap of a :func:`budget_summary` to ``path`` (PNG; colour = rank / full rank)."""
  rank_heatmap(summary["ranks"], path, title=title, full=summary["full"])


def budget_results(params, cfg, folder: str, title: str) -> dict:
  """``{"budget": totals, "ranks": {path: rank}}`` of a compressed tree for a ``results.json``
  (:func:`budget_summary`), with its rank heatmap written to ``<folder>/ranks.png`` (:func:`plot_ranks`)."""
  summary = budget_summary(params, cfg)
  plot_ranks(summary, os.path.join(folder, "ranks.png"), title)
  return {"budget": summary["budget"], "ranks": summary["ranks"]}


def rank_heatmap(ranks: Mapping[str, int], path: str, title: str = "",
                 full: Optional[Mapping[str, int]] = None) -> None:
  """Writes a PNG heatmap of ranks (annotated; colour = rank / full rank when ``full`` is given)."""
  import matplotlib  # heavy, and only plots need it: imported on use
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  types, blocks, grid = rank_grid(ranks)
  if full is not None:
    _, _, fgrid = rank_grid(full)
    colour = np.array([[np.nan if r is None else r / f for r, f in zip(row, frow)]
                       for row, frow in zip(grid, fgrid)], float)
  else:
    colour = np.array([[np.nan if r is None else r for r in row] for row in grid], float)
  fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(blocks), 0.9 + 0.45 * len(types)))
  im = ax.imshow(colour, cmap="viridis", aspect="auto", vmin=0, vmax=1 if full is not None else None)
  for i, row in enumerate(grid):
    for j, r in enumerate(row):
      if r is not None:
        ax.text(j, i, str(r), ha="center", va="center", color="w" if colour[i, j] < 0.6 * np.nanmax(colour) else "k",
                fontsize=8)
  ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
  ax.set_yticks(range(len(types)), types, fontsize=8)
  ax.set_xlabel("block")
  fig.colorbar(im, ax=ax, label="rank / full rank" if full is not None else "rank")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  if distributed.is_main():  # several processes: process 0 writes
    fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  def fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def summary_row(res: Mapping, head: Mapping, metrics: Mapping) -> dict:
  """One row of an experiment's results table: ``head`` columns (method, task/CR ...), the budget
  columns from ``res["budget"]`` (``"dense"`` / ``"0"`` without one), ``metrics``, steps, wall time
  and, for runs with learned thresholds, the step the budget was met."""
  b = res.get("budget", {})
  row = {**head, "params (selected linears)": b.get("counted_params", "dense"),
         "removed": f"{b['achieved_ratio']:.3f}" if b else "0", **metrics,
         "steps": res["train_steps"], "wall (s)": round(res["wall_s"])}
  if "freeze_step" in res:
    row["budget met at step"] = res["freeze_step"]
  return row


def comparison_plot(results: Mapping[str, Mapping], path: str, title: str = "") -> None:
  """Writes a PNG with two panels: each method's main metric on every evaluation split (bars), and
  its training loss against the step (the step SoftLM met its budget dotted). ``results``: method ->
  the ``results.json`` of a run (``metrics``, ``main_metric``, ``history``, optional ``freeze_step``)."""
  import matplotlib  # heavy, and only plots need it: imported on use
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = list(results)
  splits = list(dict.fromkeys(s for r in results.values() for s in r["metrics"]))
  main = next(iter(results.values()))["main_metric"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
  width = 0.8 / max(len(splits), 1)
  for j, split in enumerate(splits):
    vals = [results[m]["metrics"].get(split, {}).get(main, np.nan) for m in methods]
    bars = ax.bar(np.arange(len(methods)) + j * width, vals, width, label=split)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
  ax.set_xticks(np.arange(len(methods)) + width * (len(splits) - 1) / 2, methods)
  ax.set_ylabel(main)
  ax.set_title(f"{main} (exported models)", fontsize=9)
  if len(splits) > 1:
    ax.legend(fontsize=8)
  for m in methods:
    hist = results[m].get("history") or []
    if hist:
      line = bx.plot([h["step"] for h in hist], [h["task_loss"] for h in hist], label=m)[0]
      if results[m].get("freeze_step"):
        bx.axvline(results[m]["freeze_step"], color=line.get_color(), ls=":", lw=1)
  bx.set_xlabel("step")
  bx.set_ylabel("training task loss")
  bx.set_title("training loss (dotted: SoftLM budget met)", fontsize=9)
  bx.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  if distributed.is_main():  # several processes: process 0 writes
    fig.savefig(path, dpi=110)
  plt.close(fig)
