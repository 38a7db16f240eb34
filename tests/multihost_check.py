"""Two processes, two CPU devices each: sequence-parallel XAttention over a 4-device mesh spanning both processes,
on JAX's distributed runtime (`jax.distributed.initialize`, Gloo collectives on CPUs). Run by
tests/test_context_parallel.py as

    python tests/multihost_check.py PROCESS_ID PORT      (for PROCESS_ID 0 and 1 at once)

Each process checks the output it holds against the unsharded op computed on its own first device.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
  process_id, port = int(sys.argv[1]), sys.argv[2]
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
  )
  import numpy as np

  import xattn_jax as xa

  assert jax.device_count() == 4 and jax.local_device_count() == 2
  rng = np.random.default_rng(0)  # the same inputs in both processes
  q = rng.standard_normal((1, 600, 4, 16)).astype(np.float32)
  k, v = (rng.standard_normal((1, 600, 2, 16)).astype(np.float32) for _ in range(2))
  mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  tokens = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq", None, None))
  place = lambda x: jax.make_array_from_callback(x.shape, tokens, lambda index: x[index])
  kw = dict(is_causal=True, threshold=0.8, block_size=32, stride=8)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = jax.jit(
    lambda q, k, v: xa.sharded_xattention(q, k, v, mesh=mesh, batch_axis=None, head_axis=None, seq_axis="seq", **kw),
    out_shardings=replicated,
  )(place(q), place(k), place(v))
  want = jax.jit(lambda q, k, v: xa.xattention(q, k, v, **kw))(q, k, v)
  diff = float(np.max(np.abs(np.asarray(out.addressable_data(0)) - np.asarray(want))))
  assert diff < 1e-5, diff
  print(f"process {process_id}: sharded == unsharded (max diff {diff:.1e})", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
