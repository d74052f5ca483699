"""``softlm bench``: latency of the dense model against a compact checkpoint, same shapes."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

from softlm_jax import bench, models
from softlm_jax.bench import lm_speed
from softlm_jax.cli import common, options

COMMAND, ORDER = "bench", 4


def add_parser(sub):
  p = sub.add_parser(COMMAND, help="latency of the dense model vs a compact checkpoint (same shapes)")
  p.add_argument("checkpoint")
  p.add_argument("--batch", type=options.positive_int, nargs="+", default=[8])
  p.add_argument("--seq", type=options.positive_int, nargs="+", default=[128])
  p.add_argument("--reps", type=options.positive_int, default=7)
  p.add_argument("--warmup", type=options.positive_int, default=2)
  p.add_argument("--decode", choices=["auto", "on", "off"], default="auto", help="per-token decode (decoders)")
  p.add_argument("--out", default=None, help="results folder (default: <checkpoint folder>/bench)")
  return p


def tree_asarray(tree) -> dict:
  """The tree as nested dicts of ``jax.Array``."""
  return jax.tree.map(jnp.asarray, dict(tree))


def run(args) -> dict:
  params, info, model, cfg, _ = common.load_compact_model(args.checkpoint, tokenizer=False)
  fam = models.family.family_of_manifest(info)
  dense_module = fam.from_manifest(info, init=True)
  family = info["model_config"]["model_type"]
  bm = bench.BenchModel(info["source_model"] or family, family, dense_module, tree_asarray(dense_module.params),
                        dict(info["model_config"]), info["dtype"])
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "bench")
  res = bench.run_benchmark(bm.name, batches=args.batch, seqs=args.seq, crs=[], reps=args.reps, warmup=args.warmup,
                            decode={"auto": None, "on": True, "off": False}[args.decode], bm=bm,
                            extra_variants={"compact": {"params": tree_asarray(params), "kind": "compact",
                                                        "cr": info["target_ratio"], "rank_multiple": 1,
                                                        "run": os.path.abspath(args.checkpoint)}}, cfg=cfg)
  res["command"] = "softlm bench " + " ".join(sys.argv[2:])
  stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
  if bm.decoder and family != "mamba":  # prefill and decode tokens/s, dense vs compact, with the bounds
    res["lm_speed"] = lm_speed.lm_speed(bm, {"dense": bm.params, "compact": tree_asarray(params)}, cfg=cfg,
                                        batches=sorted({1, *args.batch}), prompts=args.seq, reps=args.reps,
                                        warmup=args.warmup)
    lm_speed.write(res["lm_speed"], os.path.join(out, f"{stem}_lm_speed.md"))
  bench.write_json(res, os.path.join(out, f"{stem}.json"))
  table = bench.markdown_table(res)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(table)
  rows = [r for r in res["cases"] if r["case"] == "compact"]
  common.banner("softlm bench", [f"{args.checkpoint} vs dense {bm.name} ({res['device']['platform']}, "
                                 f"{res['device']['cpu_cores']} cores)",
                                 *[f"{r['mode']} {r['batch']}x{r['seq']}: compact {1e3 * r['median_s']:.2f} ms, "
                                   f"speed-up x{r['speedup']:.2f} (FLOP ideal x{r['ideal_linear_speedup']:.2f}, "
                                   f"Amdahl bound x{r['amdahl_bound']:.2f}), weights {r['weight_saving']:.0%} smaller"
                                   for r in rows],
                                 f"results: {out}/{stem}.json, {out}/{stem}.md"])
  return res
