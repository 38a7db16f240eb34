"""The "pallas_tpu" backend: Mosaic TPU kernels behind the backend interface of `xattn_jax.backends`.

On a TPU the kernels compile through Mosaic. Elsewhere they run only in the Pallas TPU interpreter (`interpret=True`),
which this backend always runs in its strict form: race detection, out-of-bounds reads raise, scratch memory starts
as NaN. Inputs the kernels do not cover raise NotImplementedError, so `implementation=("pallas_tpu", "xla")` falls
through to the reference. The backward of block_sparse_attention (the dQ and dK/dV kernels of
`block_sparse_attention_bwd_tpu`) serves `jax.grad` through the ops' custom_vjp; where it refuses a call, the XLA
backward takes over.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax.experimental.pallas import tpu as pltpu

from xattn_jax import backends
from xattn_jax.backends import Backend, Tuned


def interpret_params() -> pltpu.InterpretParams:
  """The interpreter settings of `interpret=True`."""
  return pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")


def _interpret(interpret: bool) -> pltpu.InterpretParams | bool:
  if interpret:
    return interpret_params()
  if backends.target_platform() != "tpu":
    raise NotImplementedError(
      f"pallas_tpu needs a TPU (this code targets {backends.target_platform()!r}); "
      "pass interpret=True to run the kernels in the Pallas TPU interpreter"
    )
  return False


@dataclasses.dataclass(frozen=True)
class Tpu(Tuned):
  """The "pallas_tpu" backend with its kernels' tuning (`xattn_jax.backends.Tuned`): scores an
  antidiagonal_tpu.ScoresConfig, forward a block_sparse_attention_tpu.ForwardConfig, backward a
  block_sparse_attention_bwd_tpu.BackwardConfig.

      xa.xattention(q, k, v, implementation=Tpu(forward=block_sparse_attention_tpu.ForwardConfig(...)))
  """

  name: ClassVar[str] = "pallas_tpu"


def backend(tuning: Tpu | None = None) -> Backend:
  from xattn_jax.pallas_kernels import antidiagonal_tpu as scoring_kernel
  from xattn_jax.pallas_kernels import block_sparse_attention_bwd_tpu as backward_kernels
  from xattn_jax.pallas_kernels import block_sparse_attention_tpu as attention_kernel

  tuning = tuning or Tpu()
  configured = lambda config: {} if config is None else {"config": config}

  def scores(q, k, geometry, *, stride, block_size, causal, scale, estimator, interpret, padding_zeroed=False):
    del padding_zeroed  # the kernel's zeroing fuses into the strided relayout of q and K it makes anyway
    return scoring_kernel.antidiagonal_scores(
      q,
      k,
      geometry,
      stride=stride,
      block_size=block_size,
      causal=causal,
      scale=scale,
      estimator=estimator,
      interpret=_interpret(interpret),
      **configured(tuning.scores),
    )

  def attention(q, k, v, layout, geometry, *, causal, scale, interpret):
    return attention_kernel.block_sparse_attention(
      q,
      k,
      v,
      layout,
      geometry,
      causal=causal,
      scale=scale,
      interpret=_interpret(interpret),
      **configured(tuning.forward),
    )

  def attention_bwd(q, k, v, out, lse, d_out, d_lse, layout, geometry, *, causal, scale, interpret):
    return backward_kernels.block_sparse_attention_bwd(
      q,
      k,
      v,
      out,
      lse,
      d_out,
      d_lse,
      layout,
      geometry,
      causal=causal,
      scale=scale,
      interpret=_interpret(interpret),
      **configured(tuning.backward),
    )

  return Backend("pallas_tpu", scores, attention, attention_bwd)
