"""A work counter in GMEM for the persistent Mosaic GPU kernels: one atomic fetch-and-add per claimed tile.

Pallas Mosaic GPU on Hopper has no atomic that returns the old value (only `plgpu.atomic_store`, which returns
nothing, and cluster launch control on Blackwell), so the claim is Mosaic GPU code inlined with `plgpu.inline_mgpu`:
one thread of the calling warpgroup adds 1 to the counter and stores the old value to SMEM, then the warpgroup
synchronizes, so that every thread reads the claimed tile from SMEM. The CPU interpreter cannot run inlined Mosaic
GPU code (no discharge rule), so kernels that claim tiles this way take a static order there.

The counter must be 0 when the kernel starts: the launcher passes a fresh `jax.new_ref(jnp.zeros((1,), jnp.int32))`,
which XLA aliases to an extra output (one 4-byte memset per call).
"""

from __future__ import annotations

from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
def fetch_add_to_smem(_, counter, slot):
  """slot[0] (an int32 SMEM ref) = counter[0]; counter[0] += 1, atomically across CTAs. Every thread of the calling
  warpgroup may read slot[0] afterwards."""
  i32 = ir.IntegerType.get_signless(32)
  with mgpu.utils.single_thread(scope=mgpu.utils.ThreadSubset.WARPGROUP):
    old = llvm.atomicrmw(
      llvm.AtomicBinOp.add, mgpu.utils.memref_ptr(counter), arith.constant(i32, 1), llvm.AtomicOrdering.monotonic
    )
    memref.store(old, slot, [arith.constant(ir.IndexType.get(), 0)])
  mgpu.utils.warpgroup_barrier()  # the store is visible to the warpgroup's other threads
