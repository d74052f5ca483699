"""The prepared GPU run: one command, one results folder, everything a short GPU loan should measure (the
GPU rows of BENCHMARKS.md#inference-speed-and-memory). Run through ``experiments/gpu_suite.sh`` (installs
the carried wheels first).

  python experiments/gpu_suite.py --out runs/gpu_suite            # on the GPU (about 5-8 minutes, H100/H200)
  python experiments/gpu_suite.py --dry-run --out /tmp/gpu_dry    # tiny shapes on CPU (the test runs this)

Steps (each writes its JSON as soon as it is done; a failing step is recorded in errors.json and the
others still run; ``summary.md`` lists what was measured):

1. ``env.json``: device, versions, XLA flags.
2. ``latency_<model>_<dtype>.json``: BERT-base and SmolLM2-135M (shapes; random weights: timings depend
   on shapes only) dense against static SVD at CR 0.5, jit, float32 and bfloat16, rank multiples 1, 8
   and 64, with board power and energy per token through pynvml (:mod:`softlm_jax.bench.power`).
3. ``lm_speed_<dtype>.json``: SmolLM2 prefill (batch 1 and 8, 128 and 512 tokens) and decode (KV cache)
   tokens/s, dense against CR 0.5, with the FLOPs and bytes bounds (:mod:`softlm_jax.bench.lm_speed`).
4. ``train_<model>.json``: SoftLM training steps/s on SmolLM2 (the trainer's own jitted step) against
   dense fine-tuning.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = {"models": ["bert-base", "smollm2-135m"], "lm": "smollm2-135m", "batch": [8], "seq": [128],
        "dtypes": ["float32", "bfloat16"], "rank_multiples": [1, 8, 64], "reps": 10, "warmup": 3,
        "lm_batches": [1, 8], "lm_prompts": [128, 512], "new_tokens": 32, "train_batch": 8, "train_seq": 128,
        "train_reps": 10}
DRY = {"models": ["tiny-bert", "tiny-llama"], "lm": "tiny-llama", "batch": [2], "seq": [8],
       "dtypes": ["float32", "bfloat16"], "rank_multiples": [1, 8, 64], "reps": 2, "warmup": 1,
       "lm_batches": [1, 2], "lm_prompts": [8], "new_tokens": 4, "train_batch": 2, "train_seq": 8, "train_reps": 2}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/gpu_suite")
  ap.add_argument("--dry-run", action="store_true", help="tiny models and shapes, on whatever jax runs on (CPU)")
  ap.add_argument("--skip", nargs="*", default=[], choices=["latency", "lm_speed", "train"])
  args = ap.parse_args(argv)
  plan = DRY if args.dry_run else FULL
  os.makedirs(args.out, exist_ok=True)
  from softlm_jax import bench
  from softlm_jax.bench import lm_speed
  t0 = time.time()
  errors, done = {}, []

  def write(name, obj):
    bench.write_json(obj, os.path.join(args.out, name))
    done.append(name)
    print(f"[gpu suite] {name} ({time.time() - t0:.0f}s)", flush=True)

  def step(name, fn):
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - one failing measurement must not cost the others
      errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
      print(f"[gpu suite] {name} FAILED: {type(e).__name__}: {e}", flush=True)

  write("env.json", {"dry_run": args.dry_run, "plan": plan, "device": bench.device_info(), "versions": bench.versions(),
                     "power": {k: v for k, v in bench.power_probe().items() if k != "handle"}})
  if "latency" not in args.skip:
    for model in plan["models"]:
      for dtype in plan["dtypes"]:
        def latency(model=model, dtype=dtype):
          res = bench.run_benchmark(model, batches=plan["batch"], seqs=plan["seq"], crs=[0.5], reps=plan["reps"],
                                    warmup=plan["warmup"], dtype=dtype, rank_multiples=plan["rank_multiples"],
                                    factors="random" if not args.dry_run else "svd")
          write(f"latency_{model}_{dtype}.json", res)
          with open(os.path.join(args.out, f"latency_{model}_{dtype}.md"), "w") as f:
            f.write(bench.markdown_table(res))
        step(f"latency {model} {dtype}", latency)
  if "lm_speed" not in args.skip:
    for dtype in plan["dtypes"]:
      def speed(dtype=dtype):
        import softlm_jax as sl
        bm = bench.build_model(plan["lm"], dtype)
        cfg = sl.CompressionConfig(target_ratio=0.5)
        variants, _ = bench.make_variants(bm, [0.5], factors="random" if not args.dry_run else "svd", cfg=cfg)
        res = lm_speed.lm_speed(bm, {n: v["params"] for n, v in variants.items()}, batches=plan["lm_batches"],
                                prompts=plan["lm_prompts"], new_tokens=plan["new_tokens"], reps=plan["reps"],
                                warmup=plan["warmup"], cfg=cfg)
        write(f"lm_speed_{dtype}.json", res)
        lm_speed.write(res, os.path.join(args.out, f"lm_speed_{dtype}.md"))
      step(f"lm_speed {dtype}", speed)
  if "train" not in args.skip:
    def train():
      res = bench.train_cost(plan["lm"], batch=plan["train_batch"], seq=plan["train_seq"], reps=plan["train_reps"],
                             init_ranks=["full"], apply_modes=["auto"])
      write(f"train_{plan['lm']}.json", res)
    step("train", train)
  lines = [f"# GPU suite ({'dry run' if args.dry_run else 'full'}), {bench.device_info()['device_kind']}",
           "", f"total {time.time() - t0:.0f} s", "", "written:", *[f"- {n}" for n in done]]
  if errors:
    lines += ["", "FAILED:", *[f"- {k}: {v.splitlines()[0]}" for k, v in errors.items()]]
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  bench.write_json(errors, os.path.join(args.out, "errors.json"))
  print("\n".join(lines), flush=True)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
