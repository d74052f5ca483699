"""``python -m softlm_jax.bench``: the benchmark's command line."""
from __future__ import annotations

import argparse
import os
import sys

from softlm_jax.bench.latency import run_benchmark
from softlm_jax.bench.machine import apply_default_cpu_threads, apply_default_xla_flags, device_info, versions
from softlm_jax.bench.models import MODELS, build_model, mamba_available
from softlm_jax.bench.report import collect, markdown_table, plot_speedup, write_json
from softlm_jax.bench.step_cost import compress_cost, train_cost


def set_xla_flags(flags: str) -> None:
  """Appends ``flags`` to ``$XLA_FLAGS``; only possible before jax has started its backends."""
  from jax._src import xla_bridge  # jax's private module: imported on use, so a jax without it fails only here
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("XLA flags must be set before jax starts (set XLA_FLAGS in the environment)")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def parse(argv=None):
  ap = argparse.ArgumentParser(prog="python -m softlm_jax.bench", description=sys.modules["softlm_jax.bench"].__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", nargs="+", default=["bert-base"], help=f"any of {sorted(MODELS)}")
  ap.add_argument("--batch", type=int, nargs="+", default=[8])
  ap.add_argument("--seq", type=int, nargs="+", default=[128])
  ap.add_argument("--grid", choices=["default", "full"], default="default",
                  help="full: batch 1 8, seq 128 512, and per-token decode for decoders")
  ap.add_argument("--crs", type=float, nargs="*", default=[0.25, 0.5, 0.75])
  ap.add_argument("--decode", choices=["auto", "on", "off"], default="auto",
                  help="per-token decode with the KV cache (auto: decoders)")
  ap.add_argument("--no-forward", action="store_true", help="decode only")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--rank-multiple", type=int, nargs="+", default=[1],
                  help="round exported ranks down to a multiple; several: one case each (suffix _m<k>)")
  ap.add_argument("--factors", choices=["svd", "random"], default="svd",
                  help="random: factors of the same shapes without the SVD (big models; same timings)")
  ap.add_argument("--softlm-run", default=None, help="a SoftLM run folder of experiments/glue.py "
                  "(model minilm), e.g. runs/glue/sst2/softlm: its exported learned ranks")
  ap.add_argument("--no-donate", action="store_true", help="do not donate the decode cache")
  ap.add_argument("--train", action="store_true", help="also the training-step cost (--train-model)")
  ap.add_argument("--train-model", default=None, help="default: the first --model")
  ap.add_argument("--train-batch", type=int, default=32)
  ap.add_argument("--train-seq", type=int, nargs="+", default=[128])
  ap.add_argument("--train-init-ranks", nargs="+", default=["full", "break_even"])
  ap.add_argument("--train-modes", nargs="+", default=["auto", "factored"],
                  help="apply modes of the factored layers (auto: merged where cheaper; factored: never)")
  ap.add_argument("--train-reps", type=int, default=5)
  ap.add_argument("--compress", action="store_true", help="also compress_params vs numpy SVD")
  ap.add_argument("--xla-flags", default=None,
                  help="appended to $XLA_FLAGS before jax starts, e.g. '--xla_cpu_experimental_ynn_fusion_type=' "
                       "(CPU: XLA's Eigen dots instead of YNNPACK; see BENCHMARKS.md)")
  ap.add_argument("--out", default="runs/bench")
  ap.add_argument("--no-plot", action="store_true")
  ap.add_argument("--collect", nargs="+", default=None, metavar="JSON",
                  help="no timing: summary.md and speedup.png in --out from saved inference JSONs")
  ap.add_argument("--cases", nargs="+", default=None, help="with --collect: only these case names")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  if args.collect:
    res = collect(args.collect, args.out, args.cases)
    print(res["table"])
    print(f"[bench] {res['results']} results -> {args.out}/summary.md, {res['plot']}")
    return res
  if args.xla_flags:
    set_xla_flags(args.xla_flags)
  apply_default_xla_flags()  # after the user's: a flag they set is not overridden
  apply_default_cpu_threads()
  if args.grid == "full":
    args.batch, args.seq = [1, 8], [128, 512]
  os.makedirs(args.out, exist_ok=True)
  decode = {"auto": None, "on": True, "off": False}[args.decode]
  results = []
  for name in args.model:
    if MODELS.get(name, {}).get("family") == "mamba" and not mamba_available():
      print(f"[bench] {name}: skipped (softlm_jax.models.mamba is not available)")
      continue
    res = run_benchmark(name, batches=args.batch, seqs=args.seq, crs=args.crs, decode=decode,
                        forward=not args.no_forward, reps=args.reps, warmup=args.warmup, dtype=args.dtype,
                        rank_multiples=args.rank_multiple, factors=args.factors,
                        softlm_run=args.softlm_run, donate=not args.no_donate)
    res["command"] = "python -m softlm_jax.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(res, os.path.join(args.out, f"{name}.json"))
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
      f.write(markdown_table(res))
    print(markdown_table(res))
    results.append(res)
  summary = {"inference": [os.path.join(args.out, f"{r['config']['model']}.json") for r in results]}
  if args.train:
    tm = args.train_model or args.model[0]
    tbm = build_model(tm)
    summary["train"] = [train_cost(tm, batch=args.train_batch, seq=s, reps=args.train_reps, bm=tbm,
                                   init_ranks=args.train_init_ranks, apply_modes=args.train_modes)
                        for s in args.train_seq]
    for tr in summary["train"]:
      tr.update(device=device_info(), versions=versions())
    write_json(summary["train"], os.path.join(args.out, f"train_{tm}.json"))
  if args.compress:
    cm = compress_cost(args.train_model or args.model[0])
    cm.update(device=device_info(), versions=versions())
    summary["compress"] = cm
    write_json(cm, os.path.join(args.out, f"compress_{cm['model']}.json"))
  if results and not args.no_plot:
    summary["plot"] = plot_speedup(results, os.path.join(args.out, "speedup.png"))
    print(f"[bench] plot: {summary['plot']}")
  return summary
