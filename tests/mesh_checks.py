"""Run by tests/test_shard.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before
jax is imported, so this cannot run inside the pytest process). Prints one JSON object of observations;
the tests assert on it.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_checks.py CKPT_DIR
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import refit, train  # noqa: E402
from tests.test_propagate import apply_fn, correlated_batches  # noqa: E402
from transformers import FlaxLlamaForCausalLM, LlamaConfig  # noqa: E402


def spec_of(x):
  return [a for a in x.sharding.spec]


def state_for(mesh):
  rng = np.random.RandomState(0)
  params = {"layer": {"left": rng.normal(size=(16, 6)).astype(np.float32),
                      "s": np.linspace(1, 0.1, 6).astype(np.float32),
                      "right": rng.normal(size=(6, 24)).astype(np.float32), "alpha": np.float32(0.01)},
            "emb": rng.normal(size=(97, 8)).astype(np.float32), "odd": rng.normal(size=(3, 5)).astype(np.float32)}
  tx = optax.adam(1e-2)
  state = train.init_state(params, tx, seed=3, mesh=mesh)
  grads = jax.tree.map(jnp.ones_like, state.params)  # one update so the moments are not all zeros
  updates, opt = tx.update(grads, state.opt_state, state.params)
  return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt), tx


def leaves_np(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def checkpoint_round_trips(root):
  out = {}
  for save_shape, restore_shape in (((2, 4), (1, 2)), ((1, 2), (2, 4)), ((1, 8), (2, 1))):
    save_mesh, restore_mesh = sl.make_mesh(*save_shape), sl.make_mesh(*restore_shape)
    state, tx = state_for(save_mesh)
    d = os.path.join(root, f"{save_shape}_{restore_shape}")
    train.save_checkpoint(d, state)
    like, _ = state_for(restore_mesh)
    like = like._replace(params=jax.tree.map(jnp.zeros_like, like.params))
    restored = train.restore_checkpoint(d, like, mesh=restore_mesh)
    same = all(np.array_equal(a, b) for a, b in zip(leaves_np(state), leaves_np(restored)))
    devices = {len(x.sharding.device_set) for x in jax.tree.leaves(restored)}
    out[f"{save_shape}->{restore_shape}"] = {
        "identical": same, "n_leaves": len(jax.tree.leaves(restored)), "device_counts": sorted(devices),
        "left_spec": spec_of(restored.params["layer"]["left"]),
        "right_spec": spec_of(restored.params["layer"]["right"]),
        "alpha_spec": spec_of(restored.params["layer"]["alpha"]),
        "left_spec_saved": spec_of(state.params["layer"]["left"]),
        "left_local_shape": list(restored.params["layer"]["left"].addressable_shards[0].data.shape),
    }
  return out


def errors():
  out = {}
  try:
    sl.make_mesh(data=3, fsdp=1)
  except ValueError as e:
    out["mesh"] = str(e)
  mesh = sl.make_mesh(data=4, fsdp=2)
  tx = optax.sgd(0.1)
  state = train.init_state({"w": jnp.ones((4, 4))}, tx, mesh=mesh)
  step = train.make_train_step(lambda p, b, r: jnp.sum((b["x"] @ p["w"]) ** 2), tx, None, mesh=mesh)
  try:
    step(state, {"x": jnp.ones((6, 4))})
  except ValueError as e:
    out["batch"] = str(e)
  state, metrics = step(state, {"x": jnp.ones((8, 4))})
  out["ok_batch_loss"] = float(metrics["loss"])
  out["w_spec_after_step"] = spec_of(state.params["w"])
  return out


def streaming_onto_mesh():
  """stream_layers(mesh=): the factors land on the mesh by the rule, with the one-shot values."""
  rng = np.random.RandomState(1)
  dense = {"layer": {str(i): {"query": {"kernel": rng.normal(size=(16, 24)).astype(np.float32),
                                        "bias": np.zeros(24, np.float32)}} for i in range(3)},
           "embed": {"embedding": rng.normal(size=(40, 16)).astype(np.float32)}}
  cfg = sl.CompressionConfig(target_ratio=0.5)
  mesh = sl.make_mesh(data=1, fsdp=8)
  out = sl.stream_layers(sl.compress_params, dense, cfg, group_bytes=1, mesh=mesh)
  ref = sl.compress_params(dense, cfg)
  layer = out["layer"]["1"]["query"]
  return {"identical": all(np.array_equal(a, b) for a, b in zip(leaves_np(out), leaves_np(ref))),
          "left_spec": spec_of(layer["left"]), "right_spec": spec_of(layer["right"]),
          "s_spec": spec_of(layer["s"]), "alpha_spec": spec_of(layer["alpha"]),
          "embedding_spec": spec_of(out["embed"]["embedding"]),
          "n_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(out)})}


def refit_on_mesh():
  """refit.refit_blocks with a calibration on a data=4, fsdp=2 mesh against the same refit on one device:
  the largest factor difference relative to the factor's scale, the guard's decisions, where the leaves land."""
  model = FlaxLlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64),
                               seed=2)
  fn, batches = apply_fn(model), correlated_batches(6, b=8, seed=0, vocab=40)
  cfg = sl.CompressionConfig(target_ratio=0.5, decomposition="whitened")
  static = sl.static_svd(model.params, cfg, grams=sl.collect_grams(fn, model.params, batches, cfg, progress=False))
  rcfg = refit.RefitConfig(steps=8, lr=3e-3, holdout=2)
  runs = {}
  for name, mesh in (("one", None), ("mesh", sl.make_mesh(data=4, fsdp=2))):
    infos = []
    calib = type("Calib", (), {"apply_fn": staticmethod(fn), "batches": batches, "mask_fn": None, "mesh": mesh})()
    out = refit.refit_blocks(model.params, static, calib, rcfg, progress=False,
                             on_block=lambda i, blk, info: infos.append(info))
    runs[name] = (out, infos)
  (one, info1), (mesh_out, info8) = runs["one"], runs["mesh"]
  flat1 = {sl.tree.join(p): n for p, n in sl.tree.iter_modules(one)}
  flat8 = {sl.tree.join(p): n for p, n in sl.tree.iter_modules(mesh_out)}
  rel = max(float(np.max(np.abs(np.asarray(flat8[p][k]) - np.asarray(flat1[p][k])))
                  / np.max(np.abs(np.asarray(flat1[p][k]))))
            for p in flat1 if "left" in flat1[p] for k in ("left", "right"))
  flat0 = {sl.tree.join(p): n for p, n in sl.tree.iter_modules(static)}
  moved = max(float(np.max(np.abs(np.asarray(flat1[p]["right"]) - np.asarray(flat0[p]["right"]))))
              for p in flat1 if "left" in flat1[p])
  left = flat8["model/layers/1/mlp/up_proj"]["left"]
  return {"max_rel_diff": rel, "moved": moved, "kept_one": [i.get("kept") for i in info1],
          "kept_mesh": [i.get("kept") for i in info8],
          "heldout_after": [[i["heldout_after"] for i in info1], [i["heldout_after"] for i in info8]],
          "left_devices": len(left.sharding.device_set) if isinstance(left, jax.Array) else 0}


if __name__ == "__main__":
  print(json.dumps({"n_devices": len(jax.devices()), "checkpoints": checkpoint_round_trips(sys.argv[1]),
                    "errors": errors(), "streaming": streaming_onto_mesh(), "refit": refit_on_mesh()}))
