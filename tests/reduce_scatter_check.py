"""One process of a 2-process x 4-CPU-device ``jax.distributed`` run (gloo collectives): reduce-scatters
at the result size of jax#40830 (4 MiB per device, where gloo's halving-doubling reduce-scatter returned
wrong values at the end of rank 0's chunk), checked against numpy, and an FSDP gradient on a
``data`` x ``fsdp`` mesh, checked for the collectives XLA:CPU compiles it to.

``python tests/reduce_scatter_check.py PROCESS_ID PORT``; prints one JSON line
``{"wrong": [...], "fsdp_grad_collectives": [...], "fsdp_grad_max_err": float}`` and exits 0.
"""
import json
import os
import re
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

CHUNK_BYTES = 4 << 20
ITERATIONS = 3


def global_array(x: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def reduce_scatter_errors(devices: np.ndarray, group: int) -> list[str]:
  """``psum_scatter`` over groups of ``group`` devices (the mesh's ``d`` axis), each device's result
  ``CHUNK_BYTES`` of float32; the wrong results as ``"group G iteration I device D: N wrong"``."""
  n = devices.size
  mesh = Mesh(devices.reshape(n // group, group), ("a", "d"))
  m = CHUNK_BYTES // 4
  x = np.random.default_rng(group).standard_normal((n // group, group, group * m), dtype=np.float32)
  want = x.sum(1)
  f = jax.jit(jax.shard_map(lambda a: jax.lax.psum_scatter(a[:, 0], "d", scatter_dimension=1, tiled=True),
                            mesh=mesh, in_specs=P("a", "d", None), out_specs=P("a", "d")))
  xs = global_array(x, mesh, P("a", "d", None))
  wrong = []
  for it in range(ITERATIONS):
    for s in f(xs).addressable_shards:
      bad = int((~np.isclose(np.asarray(s.data), want[s.index], rtol=1e-5, atol=1e-4)).sum())
      if bad:
        wrong.append(f"group {group} iteration {it} device {s.device.id}: {bad} wrong")
  return wrong


def fsdp_grad(devices: np.ndarray) -> tuple[list[str], float]:
  """The gradient of ``sum((x @ w) ** 2)`` with ``x`` split on ``data`` and ``w`` (1024 x 4096, 16 MiB)
  split on ``fsdp``, as a training step's is: the collectives of its compiled program (sorted names)
  and its largest absolute error against numpy."""
  mesh = Mesh(devices.reshape(2, 4), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 1024), dtype=np.float32) / 32
  w = rng.standard_normal((1024, 4096), dtype=np.float32) / 32
  wspec = NamedSharding(mesh, P("fsdp", None))
  g = jax.jit(jax.grad(lambda w, x: ((x @ w) ** 2).sum()), out_shardings=wspec)
  xs, ws = global_array(x, mesh, P("data", None)), global_array(w, mesh, P("fsdp", None))
  hlo = g.lower(ws, xs).compile().as_text()
  ops = sorted(set(re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
                              hlo)))
  want = 2 * x.T @ (x @ w)
  err = max(float(np.abs(np.asarray(s.data) - want[s.index]).max()) for s in g(ws, xs).addressable_shards)
  return ops, err


def main() -> None:
  process_id, port = int(sys.argv[1]), sys.argv[2]
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=120)
  devices = np.array(jax.devices())
  wrong = [w for group in (2, 4, 8) for w in reduce_scatter_errors(devices, group)]
  ops, err = fsdp_grad(devices)
  print(json.dumps({"wrong": wrong, "fsdp_grad_collectives": ops, "fsdp_grad_max_err": err}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
