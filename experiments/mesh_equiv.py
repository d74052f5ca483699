"""Same training on several mesh shapes: the params, the freeze step and the ranks must not depend on the mesh.
Regenerates BENCHMARKS.md#sharding-equivalence.

Tiny random Llama + SoftLM at CR 0.5, ``--steps`` steps of ``softlm_jax.train.fit`` crossing the budget
freeze, once per mesh shape (``--meshes``, ``DxF`` = ``data=D, fsdp=F``). On a CPU the devices are
simulated with ``--host-devices`` (``XLA_FLAGS=--xla_force_host_platform_device_count``, set here
before jax is imported). Writes ``--out`` (JSON): per mesh, the freeze step, the final ranks, the
counted params, the largest |param - param on the first mesh|, whether the budget state is the same on
every device, and the bytes of params and optimizer state each device holds.

  python experiments/mesh_equiv.py --host-devices 8 --steps 30 --out runs/mesh_equiv.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


#: Simulated devices are threads: on a loaded machine one can reach an all-reduce more than XLA's
#: default 40 s after the others, and XLA then aborts the process. Wait longer instead.
SLOW_HOST_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                   "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 --xla_cpu_collective_timeout_seconds=900")


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--meshes", default="1x1,8x1,2x4,1x8")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--cr", type=float, default=0.5)
  ap.add_argument("--alpha-lr", type=float, default=0.05)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=16)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--host-devices", type=int, default=None, help="simulated CPU devices (XLA_FLAGS)")
  ap.add_argument("--out", default=None)
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  if args.host_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices} {SLOW_HOST_FLAGS}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  import optax
  from transformers import FlaxLlamaForCausalLM, LlamaConfig

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import softlm_jax as sl
  from softlm_jax import shard, train

  vocab, h = 128, args.hidden
  model = FlaxLlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=2 * h,
                                           max_position_embeddings=64), seed=0)
  cfg = sl.CompressionConfig(target_ratio=args.cr, alpha_lr=args.alpha_lr, gamma=1.0, sharpness=200.0)
  dense = jax.tree.map(np.asarray, model.params)
  data = np.random.RandomState(0).randint(0, vocab, (64, args.seq_len)).astype(np.int32)

  def task_loss(p, batch, rng):
    logits = model(batch["ids"], params=p).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()

  def batch_fn(step):
    return {"ids": data[sl.data.batch_indices(len(data), args.batch_size, step, seed=0)]}

  results, ref = {"devices": len(jax.devices()), "platform": jax.devices()[0].platform, "steps": args.steps,
                  "cr": args.cr, "meshes": {}}, None
  for spec in args.meshes.split(","):
    d, f = (int(v) for v in spec.split("x"))
    mesh = sl.make_mesh(data=d, fsdp=f)
    params = sl.compress_params(dense, cfg)
    tx = sl.make_optimizer(cfg, optax.adam(args.lr))
    t0 = time.time()
    state = train.init_state(params, tx, mesh=mesh)
    step_fn = train.make_train_step(task_loss, tx, cfg, mesh=mesh)
    state, _ = train.fit(state, step_fn, batch_fn, finetune_steps=10**6, stop_after=args.steps, progress=False,
                         mesh=mesh)
    wall = time.time() - t0
    bs = sl.budget_state(state.opt_state)
    same_everywhere = all(len({np.asarray(s.data).tobytes() for s in leaf.addressable_shards}) == 1
                          for leaf in (bs.frozen, bs.freeze_step, bs.count))
    flat = {shard.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_leaves_with_path(state.params)}
    if ref is None:
      ref = flat
    diff = max(float(np.max(np.abs(flat[k].astype(np.float64) - ref[k]))) for k in ref)
    pbytes = shard.per_device_bytes(state.params)
    obytes = shard.per_device_bytes(state.opt_state)
    results["meshes"][spec] = {
        "data": d, "fsdp": f, "freeze_step": int(bs.freeze_step), "frozen": bool(bs.frozen),
        "count": int(sl.count_params(state.params)), "target": sl.target_params(state.params, cfg),
        "ranks": {k: int(v) for k, v in sl.layer_ranks(state.params).items()},
        "max_abs_param_diff_vs_first": diff, "budget_state_same_on_every_device": same_everywhere,
        "param_bytes_per_device": max(pbytes.values()), "opt_bytes_per_device": max(obytes.values()),
        "param_bytes_total": int(sum(x.nbytes for x in flat.values())), "wall_s": wall,
    }
    print(json.dumps({k: v for k, v in results["meshes"][spec].items() if k != "ranks"}), flush=True)
    del state
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(results, fh, indent=1)
  return results


if __name__ == "__main__":
  main()
