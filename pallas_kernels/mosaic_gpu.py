"""The "pallas_mosaic_gpu" backend: Hopper kernels behind the backend interface of `xattn_jax.backends`.

The backward of block_sparse_attention (the dQ and dK/dV kernels of `block_sparse_attention_bwd_mosaic_gpu`) serves
`jax.grad` through the ops' custom_vjp; where it refuses a call (NotImplementedError), the XLA backward takes over.
In the CPU interpreter both directions stage their register matmul operands through SMEM (the interpreter's wgmma
takes SMEM operands only).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax

from xattn_jax import backends
from xattn_jax.backends import Backend, Tuned


# Host threads the CPU interpreter runs each kernel as (its warpgroups and copy engines, each a jitted computation on
# its own thread, waiting on the others at barriers). Measured on a 2-core host: with fewer XLA runtime threads than
# this the kernel deadlocks at 0% CPU (scores and forward need 3, the backward 4).
INTERPRETER_THREADS = {"scores": 3, "attention": 3, "attention_bwd": 4}


def _xla_cpu_threads() -> int:
  """Computations XLA's CPU runtime runs at once: one per core, or per host device if there are more."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(cores, len(jax.devices("cpu")))


def _check_platform(interpret: bool, op: str) -> None:
  if not interpret and backends.target_platform() != "gpu":
    raise NotImplementedError(
      f"pallas_mosaic_gpu needs a CUDA GPU (this code targets {backends.target_platform()!r}); "
      "pass interpret=True to run the kernels in the CPU interpreter"
    )
  needed, available = INTERPRETER_THREADS[op], _xla_cpu_threads()
  if interpret and available < needed:
    raise RuntimeError(
      f"the Mosaic GPU interpreter runs this {op} kernel as {needed} host threads that wait on each other, and "
      f"XLA's CPU runtime here runs {available} at a time (the larger of the CPU cores and the host devices): it "
      "would hang. Start Python with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before JAX is "
      "imported), or run on a machine with more cores."
    )


def _persistent_grid(interpret: bool) -> dict:
  """ForwardConfig's num_ctas for this GPU: one CTA per multiprocessor (132 on an H100 SXM or H200, 114 on an H100
  PCIe). A persistent grid larger than the GPU would run its last CTAs in a second wave. The interpreter keeps the
  config's default."""
  device = None if interpret else jax.devices()[0]  # a CPU device when a CPU host exports for CUDA: the default
  sm_count = getattr(device, "core_count", None) if getattr(device, "platform", None) == "gpu" else None
  return {"num_ctas": sm_count} if isinstance(sm_count, int) and sm_count > 0 else {}


@dataclasses.dataclass(frozen=True)
class MosaicGpu(Tuned):
  """The "pallas_mosaic_gpu" backend with its kernels' tuning (`xattn_jax.backends.Tuned`): scores an
  antidiagonal_mosaic_gpu.ScoresConfig, forward a block_sparse_attention_mosaic_gpu.ForwardConfig, backward a
  block_sparse_attention_bwd_mosaic_gpu.BackwardConfig. The interpreter (`interpret=True`) stages matmul operands
  through SMEM whatever the config says, and a forward config's persistent grid of 132 CTAs becomes the GPU's
  multiprocessor count unless num_ctas is set otherwise.

      xa.xattention(q, k, v, implementation=MosaicGpu(forward=ForwardConfig(num_stages=3)))
  """

  name: ClassVar[str] = "pallas_mosaic_gpu"


def backend(tuning: MosaicGpu | None = None) -> Backend:
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel
  from xattn_jax.pallas_kernels import block_sparse_attention_bwd_mosaic_gpu as backward_kernels
  from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as attention_kernel

  tuning = tuning or MosaicGpu()

  def scores(q, k, geometry, *, stride, block_size, causal, scale, estimator, interpret, padding_zeroed=False):
    _check_platform(interpret, "scores")
    config = tuning.scores
    if config is not None and interpret:
      config = dataclasses.replace(config, p_operand="smem")
    return scores_kernel.antidiagonal_scores(
      q,
      k,
      geometry,
      stride=stride,
      block_size=block_size,
      causal=causal,
      scale=scale,
      config=config,
      interpret=interpret,
      estimator=estimator,
      padding_zeroed=padding_zeroed,
    )

  def attention(q, k, v, layout, geometry, *, causal, scale, interpret):
    _check_platform(interpret, "attention")
    config = tuning.forward or attention_kernel.ForwardConfig()
    if config.num_ctas == attention_kernel.ForwardConfig.num_ctas:
      config = dataclasses.replace(config, **_persistent_grid(interpret))
    if interpret:
      config = dataclasses.replace(config, pv_operand="smem")
    return attention_kernel.block_sparse_attention(
      q, k, v, layout, geometry, causal=causal, scale=scale, config=config, interpret=interpret
    )

  def attention_bwd(q, k, v, out, lse, d_out, d_lse, layout, geometry, *, causal, scale, interpret):
    _check_platform(interpret, "attention_bwd")
    config = tuning.backward or backward_kernels.BackwardConfig()
    if interpret:
      config = dataclasses.replace(config, operand="smem")
    return backward_kernels.block_sparse_attention_bwd(
      q, k, v, out, lse, d_out, d_lse, layout, geometry, causal=causal, scale=scale, config=config, interpret=interpret
    )

  return Backend("pallas_mosaic_gpu", scores, attention, attention_bwd)
