"""Compact checkpoint of a causal LM (default SmolLM2-135M, static SVD at CR 0.5): file size against the
dense float32 safetensors file and against the counted parameters x 4 bytes, save time, load time with
and without the sha256 check (``load_compact(verify=...)``) and of the digests alone, and logits after
reload. Regenerates BENCHMARKS.md#checkpoint-size.

  python experiments/compact_ckpt.py --model smollm2 --cr 0.5 --out runs/compact/smollm2

Prefill / decode tokens per second of the written file: ``softlm bench <out>/static.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import checkpoint, models, run  # noqa: E402
from softlm_jax.cli import options  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2", help="smollm2 (embedded GGUF) or a HF Flax causal-LM folder")
  ap.add_argument("--cr", type=options.fraction, default=0.5)
  ap.add_argument("--reps", type=options.positive_int, default=3, help="load-time repetitions (median)")
  ap.add_argument("--out", default="runs/compact/smollm2")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  cfg = sl.CompressionConfig(target_ratio=args.cr)
  loaded_model = models.load(args.model, "causal_lm", max_len=512)
  model, dense, tok = loaded_model.module, loaded_model.params, loaded_model.tokenizer
  t = time.perf_counter()
  compact = sl.static_svd(dense, cfg)
  svd_s = time.perf_counter() - t
  path = os.path.join(args.out, "static.safetensors")
  t = time.perf_counter()
  sl.save_compact(path, compact, cfg=cfg, model_config=loaded_model.manifest()[1],
                  metadata=run.compact_metadata(loaded_model, {"task": "wikitext"}, "static-noft", 0, None))
  save_s = time.perf_counter() - t
  dense_path = os.path.join(args.out, "dense_float32.safetensors")
  from safetensors.flax import save_file
  save_file({k: jnp.asarray(v, jnp.float32) for k, v in sl.tree.flatten(dense).items()}, dense_path)
  loads, loads_noverify = [], []
  for _ in range(args.reps):
    for verify, times in ((True, loads), (False, loads_noverify)):
      t = time.perf_counter()
      loaded, info = sl.load_compact(path, verify=verify)
      jax.block_until_ready(loaded)
      times.append(time.perf_counter() - t)
  t = time.perf_counter()
  checkpoint.file_digests(path)
  digests_s = time.perf_counter() - t
  ids = jnp.asarray(tok(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()[:4000])["input_ids"]
                    [:256], jnp.int32)[None]
  fwd = jax.jit(lambda p, x: model(x, params=p).logits)
  with sl.intercept(cfg):
    before = np.asarray(fwd(compact, ids))
    after = np.asarray(fwd(loaded, ids))
  rep = checkpoint.file_report(path)
  dense_bytes = os.path.getsize(dense_path)
  res = {"model": args.model, "cr": args.cr, "achieved_ratio": info["achieved_ratio"], "svd_s": svd_s,
         "save_s": save_s, "load_s_median": float(np.median(loads)), "load_s": loads,
         "load_s_noverify_median": float(np.median(loads_noverify)), "load_s_noverify": loads_noverify,
         "digests_s": digests_s, **rep,
         "dense_float32_file_bytes": dense_bytes, "dense_params": int(sum(x.size for x in jax.tree.leaves(dense))),
         "file_vs_dense": rep["file_bytes"] / dense_bytes,
         "file_vs_params_x4": rep["file_bytes"] / rep["params_x4_bytes"] - 1.0,
         "logits_bit_equal_after_reload": bool(np.array_equal(before, after)),
         "logits_max_abs_diff_after_reload": float(np.max(np.abs(before - after))), "logit_tokens": int(ids.shape[1])}
  os.remove(dense_path)  # only its size was needed
  with open(os.path.join(args.out, "compact_ckpt.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
