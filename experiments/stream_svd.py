"""Peak memory of the decomposition on a TinyLlama-1.1B-shaped Llama: streaming vs one-shot. Regenerates
the streaming rows of BENCHMARKS.md#compression-cost.

The model has TinyLlama-1.1B's shapes (22 layers, hidden 2048, FFN 5632, 32 heads, 4 KV heads, vocab
32000, untied head; ``--layers`` to shorten it) and random weights, built without ever holding two
float32 copies: ``jax.eval_shape`` gives the tree of shapes, then each leaf is drawn on its own
(numpy normal, std 0.02, scaled in place; norms 1). Then the decomposition runs once, in this process:

  stream   ``softlm_jax.stream_layers(fn, params, cfg, donate=True, group_bytes=...)``
  oneshot  ``fn(params, cfg)`` (every kernel of a shape in one batched SVD; the dense tree is kept)

with ``fn`` = ``compress_params`` (``--fn compress``, ``--init-rank``) or ``static_svd`` (``--fn static``).
Peak RSS of the decomposition (Linux ``VmHWM``, reset after the build so the build's temporaries do
not count) is reported as a ratio of the dense float32 parameter bytes, with the process's RSS before
the build (python + jax) both in and out. Results are merged into ``--out``
(JSON, one entry per ``--name``) as soon as the run ends. Slow on 2 CPU cores (about 30 s per
2048 x 5632 SVD): run it in the background.

  nohup python experiments/stream_svd.py --mode stream --name stream_22 --out runs/stream_svd.json &
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import threading
import time


def rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def peak_rss_bytes() -> int:
  """Peak RSS since the start or the last :func:`reset_peak` (Linux ``VmHWM``)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
  """Resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` 5), so the decomposition's peak is
  measured apart from the build's temporaries. False where that is not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mode", choices=["stream", "oneshot"], default="stream")
  ap.add_argument("--fn", choices=["compress", "static"], default="compress")
  ap.add_argument("--init-rank", default="break_even", help="compress: full, break_even or an int")
  ap.add_argument("--cr", type=float, default=0.5)
  ap.add_argument("--layers", type=int, default=22)
  ap.add_argument("--group-mb", type=float, default=256.0)
  ap.add_argument("--name", default=None)
  ap.add_argument("--out", default="runs/stream_svd.json")
  return ap.parse_args(argv)


def build_tinyllama(layers: int, seed: int = 0):
  """Random-weight TinyLlama-1.1B-shaped params (plain dicts of numpy float32 arrays), one leaf at a time."""
  import jax
  import numpy as np
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)
  model = FlaxLlamaForCausalLM(config, _do_init=False)
  shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(seed), (1, 8)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  filled = []
  for i, (kp, s) in enumerate(leaves):
    name = str(getattr(kp[-1], "key", kp[-1]))
    if name in ("kernel", "embedding"):
      x = np.random.default_rng([seed, i]).standard_normal(s.shape, dtype=np.float32)
      x *= 0.02  # in place: no second copy of the leaf
    else:
      x = np.ones(s.shape, s.dtype)
    filled.append(x)
  params = jax.tree_util.tree_unflatten(treedef, filled)
  del filled

  def plain(t):
    return {k: plain(v) for k, v in t.items()} if hasattr(t, "items") else t
  return model, plain(params)


def main(argv=None):
  args = parse(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import numpy as np

  import softlm_jax as sl
  rss0 = rss_bytes()
  t0 = time.time()
  _, params = build_tinyllama(args.layers)
  build_s = time.time() - t0
  dense_bytes = int(sum(x.nbytes for x in jax.tree.leaves(params)))
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build temporaries back before measuring
  rss_built, peak_built = rss_bytes(), peak_rss_bytes()
  peak_reset = reset_peak()
  init_rank = int(args.init_rank) if args.init_rank.isdigit() else args.init_rank
  cfg = sl.CompressionConfig(target_ratio=args.cr, init_rank=init_rank)
  fn = sl.compress_params if args.fn == "compress" else sl.static_svd
  selected_bytes = int(sum(k.nbytes for _, k in sl.tree.selected_kernels(params, cfg)))
  print(f"built {args.layers} layers in {build_s:.0f}s: dense {dense_bytes / 2**30:.2f} GiB "
        f"(selected kernels {selected_bytes / 2**30:.2f} GiB), rss {rss_built / 2**30:.2f} GiB", flush=True)

  samples = []
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      samples.append(rss_bytes())
      time.sleep(0.5)
  threading.Thread(target=sample, daemon=True).start()

  def progress(done, total):
    print(f"group {done}/{total}: {time.time() - t1:.0f}s rss {rss_bytes() / 2**30:.2f} GiB "
          f"peak {peak_rss_bytes() / 2**30:.2f} GiB", flush=True)

  t1 = time.time()
  if args.mode == "stream":
    out = sl.stream_layers(fn, params, cfg, donate=True, group_bytes=int(args.group_mb * 2**20), on_group=progress)
  else:
    out = fn(params, cfg)
  jax.block_until_ready(out)
  wall = time.time() - t1
  stop.set()
  peak = peak_rss_bytes()
  out_bytes = int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(out)))
  res = {
      "mode": args.mode, "fn": args.fn, "init_rank": args.init_rank, "cr": args.cr, "layers": args.layers,
      "group_mb": args.group_mb if args.mode == "stream" else None,
      "dense_bytes": dense_bytes, "selected_kernel_bytes": selected_bytes, "out_bytes": out_bytes,
      "rss_before_build": rss0, "rss_after_build": rss_built, "peak_rss_after_build": peak_built,
      "peak_reset_after_build": peak_reset, "peak_rss": peak, "peak_over_dense": peak / dense_bytes,
      "peak_minus_baseline_over_dense": (peak - rss0) / dense_bytes,
      "max_sampled_rss_during": max(samples) if samples else None,
      "wall_s": wall, "build_s": build_s, "counted_params": int(sl.count_params(out, cfg)),
      "dense_params": sl.dense_params(out, cfg), "cpu_count": os.cpu_count(),
  }
  print(json.dumps(res), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  allres = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      allres = json.load(f)
  allres[args.name or f"{args.mode}_{args.fn}_{args.layers}"] = res
  with open(args.out, "w") as f:
    json.dump(allres, f, indent=1)


if __name__ == "__main__":
  main()
