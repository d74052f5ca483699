"""Costs of the whitened decomposition on SmolLM2-135M: Gram collection vs one forward pass over the same
calibration data, and the whitened decomposition vs plain SVD. Ratios measured in one process.
Regenerates the whitened decomposition's rows of BENCHMARKS.md#compression-cost.

  python experiments/calib_cost.py --windows 32 --out runs/calib_cost.json

Gram collection and the forward pass are each timed over ``--windows`` sequences of 128 tokens of
WikiText-2 valid in batches of 4; the first batch of each (compilation) is timed apart, the ratio is
of the steady-state time of the remaining batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import data, files  # noqa: E402
from softlm_jax.svd import decompose  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--windows", type=int, default=32)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--out", default="runs/calib_cost.json")
  args = ap.parse_args(argv)
  from softlm_jax.models import gguf_llama
  model, params, tok = gguf_llama.load_gguf_llama(gguf_llama.smollm2_gguf_path(), max_position_embeddings=512)
  params = jax.tree.map(jnp.asarray, params)
  logits_fn = lambda p, b: model(b["ids"], params=p).logits
  ids = tok(data.load_wikitext("valid", args.data_dir))["input_ids"]
  windows = data.lm_windows(ids, args.seq_len)[:args.windows]
  batches = [{"ids": jnp.asarray(windows[i:i + args.batch_size])} for i in range(0, len(windows), args.batch_size)]
  cfg = sl.CompressionConfig(target_ratio=0.5, decomposition="whitened")

  fwd = jax.jit(logits_fn)
  t0 = time.perf_counter()
  jax.block_until_ready(fwd(params, batches[0]))
  t1 = time.perf_counter()
  for b in batches[1:]:
    jax.block_until_ready(fwd(params, b))
  t2 = time.perf_counter()
  first = sl.collect_grams(logits_fn, params, batches[:1], cfg, progress=False)
  t3 = time.perf_counter()
  grams = sl.collect_grams(logits_fn, params, batches, cfg, progress=False)
  t4 = time.perf_counter()
  del first
  forward_s, forward_first_s = t2 - t1, t1 - t0
  grams_first_s = t3 - t2
  grams_s = (t4 - t3) - grams_first_s  # the same first batch + compile, taken out
  t5 = time.perf_counter()
  decompose(params, cfg.replace(decomposition="svd"))
  t6 = time.perf_counter()
  decompose(params, cfg, grams)
  t7 = time.perf_counter()
  res = {"model": "smollm2-135m", "calibration": f"{len(windows)} x {args.seq_len} tokens of wikitext-2 valid, "
         f"batch {args.batch_size}", "forward_s_steady": forward_s, "forward_first_batch_s": forward_first_s,
         "grams_s_steady": grams_s, "grams_first_batch_s": grams_first_s,
         "grams_over_forward": grams_s / forward_s, "svd_decompose_s": t6 - t5, "whitened_decompose_s": t7 - t6,
         "whitened_over_svd": (t7 - t6) / (t6 - t5), "layers": len(grams), "devices": str(jax.devices())}
  files.write_json(res, args.out)
  print(res)


if __name__ == "__main__":
  main()
