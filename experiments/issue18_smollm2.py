"""Issue 18 measurements on SmolLM2-135M at CR 0.5 (static SVD of the real weights): a compact file, its
load time with and without the sha256 check, then `softlm bench` on it (prefill / decode tokens/s).

  python experiments/issue18_smollm2.py --out runs/issue18/smollm2 [--bench-args "--seq 128 --reps 3"]
"""
import argparse
import json
import os
import shlex
import time

import softlm_jax as sl
from softlm_jax import checkpoint, models, run
from softlm_jax.bench.machine import loadavg


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/issue18/smollm2")
  ap.add_argument("--loads", type=int, default=3)
  ap.add_argument("--path", default=None, help="an existing SmolLM2 compact file (default: make a static CR 0.5 one)")
  ap.add_argument("--bench-args", default=None, help="run `softlm bench` on the file with these options")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  path = args.path or os.path.join(args.out, "static", "compact.safetensors")
  res = {"load_start": loadavg()}
  if not os.path.exists(path):
    t = time.time()
    model = models.load("smollm2", "causal_lm", max_len=640)
    cfg = sl.CompressionConfig(target_ratio=0.5)
    params = sl.static_svd(model.params, cfg)
    meta = run.compact_metadata(model, {"task": "wikitext"}, "static-noft", 0, True)
    checkpoint.save_compact(path, params, cfg=cfg, model_config=model.manifest()[1], metadata=meta)
    res["make_s"] = time.time() - t
  res["file"] = checkpoint.file_report(path)
  for verify in (True, False, True, False)[:2 * args.loads]:
    t = time.perf_counter()
    sl.load_compact(path, verify=verify)
    res.setdefault(f"load_s_verify_{verify}", []).append(time.perf_counter() - t)
  t = time.perf_counter()
  checkpoint.file_digests(path)
  res["digests_only_s"] = time.perf_counter() - t
  res["load_end"] = loadavg()
  with open(os.path.join(args.out, "load.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1), flush=True)
  if args.bench_args is not None:
    from softlm_jax import cli
    cli.run(["bench", path, *shlex.split(args.bench_args)])


if __name__ == "__main__":
  main()
