"""Benchmark reports: Markdown tables, the speed-up plot, and collecting saved results."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np


def markdown_table(result: dict) -> str:
  """One row per (mode, batch x seq, case) of an inference result."""
  head = ("| mode | batch x seq | case | removed | median ms | spread | speed-up [p25, p75] | FLOP ideal | "
          "Amdahl bound | of bound | linears alone | weights MB (saving) | peak MB | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in result["cases"]:
    mb = r.get("weight_bytes")
    peak = r["memory"].get("peak_bytes")
    shape = f"{r['batch']} x {r['seq']}" + (" (1 token)" if r["mode"] == "decode" else "")
    if r["case"] == "outside":
      lines.append(f"| {r['mode']} | {shape} | outside linears | | {1e3 * r['median_s']:.2f} | "
                   f"{r['spread']:.2f} | share {r['outside_share']:.2f} | | | | | | "
                   f"{'' if peak is None else f'{peak / 2**20:.0f}'} | {r['compile_s']:.1f} |")
      continue
    lin = r.get("linear_speedup_measured")
    sp = f"{r['speedup']:.2f} [{r['speedup_p25']:.2f}, {r['speedup_p75']:.2f}]"
    lines.append(
        f"| {r['mode']} | {shape} | {r['case']} | {1 - r['flop_ratio']:.3f} | {1e3 * r['median_s']:.2f} | "
        f"{r['spread']:.2f} | {sp} | {r['ideal_linear_speedup']:.2f} | {r['amdahl_bound']:.2f} | "
        f"{r['of_bound']:.2f} | {'' if lin is None else f'{lin:.2f}'} | "
        f"{mb / 2**20:.1f} ({r['weight_saving']:.2f}) | {'' if peak is None else f'{peak / 2**20:.0f}'} | "
        f"{r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def plot_speedup(results: Sequence[dict], path: str) -> Optional[str]:
  """Speed-up vs CR (fraction of the compressed linears' FLOPs removed), one panel per model:
  measured points (median of paired rounds, bars p25-p75), the linears' ideal ``1 / (1 - CR)``
  (dashed) and each setting's Amdahl bound (dotted, from its measured outside share). Hollow
  markers: SoftLM's learned ranks; crosses: ranks rounded to a multiple."""
  import matplotlib  # heavy, and only plots need it: imported on use
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["config"]["model"] for r in results))
  fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), squeeze=False)
  cr = np.linspace(0.0, 0.8, 81)
  for ax, model in zip(axes[0], models):
    ax.plot(cr, 1 / (1 - cr), "k--", lw=1, label="ideal (linears only)")
    markers = iter("osD^v<>ph*" * 3)
    for res in (r for r in results if r["config"]["model"] == model):
      groups: dict[tuple, list] = {}
      for r in res["cases"]:
        if "speedup" in r:
          groups.setdefault((r["mode"], r["batch"], r["seq"]), []).append(r)
      for (mode, b, s_), rows in groups.items():
        o = min(max(rows[0]["outside_share"], 0.0), 1.0)
        flags = res.get("device", {}).get("xla_flags") or ""
        label = f"{mode} {b}x{s_}" + (" (1 token)" if mode == "decode" else "") + \
            (f"\n  XLA_FLAGS={flags}" if flags else "")
        line = ax.plot(cr, 1 / (o + (1 - o) * (1 - cr)), ":", lw=1)[0]
        m = next(markers)
        for r in rows:
          x = 1 - r["flop_ratio"]
          fmt = "x" if r.get("rank_multiple", 1) != 1 else m
          ax.errorbar([x], [r["speedup"]], yerr=[[max(r["speedup"] - r["speedup_p25"], 0)],
                                                  [max(r["speedup_p75"] - r["speedup"], 0)]],
                      fmt=fmt, color=line.get_color(), mfc="white" if r["kind"] == "softlm" else line.get_color(),
                      label=label if r is rows[0] else None)
    ax.set_title(f"{model}", fontsize=10)
    ax.set_xlabel("FLOPs removed from the compressed linears (CR)")
    ax.set_ylabel("speed-up vs dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  dev = results[0]["device"]
  fig.suptitle(f"measured (points, bars p25-p75), Amdahl bound (dotted), ideal (dashed)\n"
               f"{dev['platform']} {dev['cpu']}, {dev['cpu_cores']} cores", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def summary_table(results: Sequence[dict], cases: Optional[Sequence[str]] = None) -> str:
  """Compact markdown over several inference results (e.g. BENCHMARKS.md): one row per model,
  mode, shape and compressed case (``cases`` filters by case name)."""
  head = ("| model | mode | batch x seq | case | removed | dense ms | case ms | speed-up [p25, p75] | "
          "FLOP ideal | Amdahl bound | of bound | linears alone | weight saving | peak-mem saving | load | XLA_FLAGS |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for res in results:
    rows = res["cases"]
    for r in rows:
      if "speedup" not in r or r["case"] == "dense" or (cases and r["case"] not in cases):
        continue
      d = next(x for x in rows if x["case"] == "dense" and (x["mode"], x["batch"], x["seq"]) ==
               (r["mode"], r["batch"], r["seq"]))
      load = next((x.get("load_before") for x in rows if (x["mode"], x["batch"], x["seq"]) ==
                   (r["mode"], r["batch"], r["seq"]) and x.get("load_before")), None)
      pk, dpk = r["memory"].get("peak_bytes"), d["memory"].get("peak_bytes")
      lin = r.get("linear_speedup_measured")
      lines.append(
          f"| {res['config']['model']} | {r['mode']} | {r['batch']} x {r['seq']} | {r['case']} | "
          f"{1 - r['flop_ratio']:.3f} | {1e3 * d['median_s']:.1f} | {1e3 * r['median_s']:.1f} | "
          f"**{r['speedup']:.2f}** [{r['speedup_p25']:.2f}, {r['speedup_p75']:.2f}] | "
          f"{r['ideal_linear_speedup']:.2f} | {r['amdahl_bound']:.2f} | {r['of_bound']:.2f} | "
          f"{'' if lin is None else f'{lin:.2f}'} | {r['weight_saving']:.2f} | "
          f"{'' if not (pk and dpk) else f'{1 - pk / dpk:.2f}'} | {'' if load is None else load[0]} | "
          f"{res.get('device', {}).get('xla_flags') or 'default'} |")
  return "\n".join(lines) + "\n"


def collect(paths: Sequence[str], out: str, cases: Optional[Sequence[str]] = None) -> dict:
  """Summary table and plot from saved inference JSONs (no re-timing)."""
  results = []
  for p in paths:
    with open(p) as f:
      res = json.load(f)
    if res.get("kind") == "inference":
      results.append(res)
  table = summary_table(results, cases)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(table)
  png = plot_speedup(results, os.path.join(out, "speedup.png")) if results else None
  return {"table": table, "plot": png, "results": len(results)}


def write_json(obj, path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def default(o):
    if isinstance(o, (np.integer,)):
      return int(o)
    if isinstance(o, (np.floating,)):
      return float(o)
    if isinstance(o, np.ndarray):
      return o.tolist()
    return str(o)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=default)
