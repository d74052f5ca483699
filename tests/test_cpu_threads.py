"""Several CPU devices on a machine with fewer cores: the thread pool the library gives XLA's CPU client
(``$NPROC``, :func:`softlm_jax.bench.machine.default_cpu_threads`) keeps collectives from starving.

The program below keeps a dozen sharded programs with collectives in flight at once (jax dispatches
them asynchronously), as a training step's setup does. Under XLA's own pool (``max(cores, devices)``
threads) on a 2-core machine with 8 devices it aborts: two all-reduces each hold part of the pool and
wait for the rest ("Expected 4 threads to join the rendezvous, but only 3 of them arrived"). On a
machine with more cores than devices it passes either way.
"""
import os
import subprocess
import sys
import textwrap

from softlm_jax.bench import machine

PROGRAM = textwrap.dedent("""
  import numpy as np
  from softlm_jax.bench.machine import apply_default_cpu_threads
  threads = apply_default_cpu_threads()
  import jax, jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  sh = NamedSharding(mesh, P(None, "fsdp"))
  f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x, out_shardings=sh)
  x = jax.device_put(np.ones((256, 256), np.float32), sh)
  for it in range(15):
    leaves = [f(x * (i + 1)) for i in range(12)]
    total = sum(jnp.sum(leaf > 0) for leaf in leaves)
    assert int(total) == 12 * 256 * 256, int(total)
  print("threads", threads)
""")


def test_local_cpu_devices_reads_the_environment_before_jax_starts():
  assert machine.local_cpu_devices({}) == 1
  assert machine.local_cpu_devices({"JAX_NUM_CPU_DEVICES": "4"}) == 4
  assert machine.local_cpu_devices({"XLA_FLAGS": "--foo=1 --xla_force_host_platform_device_count=8"}) == 8
  # jax's own variable wins over the XLA flag, as jax gives it precedence
  assert machine.local_cpu_devices({"JAX_NUM_CPU_DEVICES": "2",
                                    "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) == 2


def test_default_cpu_threads_only_for_several_devices_and_never_over_the_user():
  assert machine.default_cpu_threads({}, cores=2) is None
  assert machine.default_cpu_threads({"JAX_NUM_CPU_DEVICES": "4"}, cores=2) == 4 * machine.CPU_THREADS_PER_DEVICE
  assert machine.default_cpu_threads({"JAX_NUM_CPU_DEVICES": "4"}, cores=64) == 64
  assert machine.default_cpu_threads({"JAX_NUM_CPU_DEVICES": "4", "NPROC": "3"}, cores=2) is None


def test_collectives_in_flight_on_eight_devices_finish():
  env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "XLA_FLAGS")}
  env.update({"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"})
  res = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"threads {max(os.cpu_count(), 8 * machine.CPU_THREADS_PER_DEVICE)}" in res.stdout
