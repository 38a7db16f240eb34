"""One small call of every Mosaic GPU kernel, for compute-sanitizer (memcheck, racecheck) on the device:

    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 \
      compute-sanitizer --tool memcheck python3 benchmarks/sanitize_attention.py [forward,estimator,backward[,noref]]

"noref" skips the XLA references (only the kernels run, the backward on the kernel forward's out/lse): less
non-kernel work under the tool.

Covers the forward (both P @ V operands, causal and not, one and several tiles per CTA), the antidiagonal
estimator, and the dQ and dK/dV kernels, on ragged shapes (a batch of two with different lengths, T and S not
multiples of 128, GQA) so that the padding paths run. Each result is compared with the XLA reference, so a kernel
that reads garbage also shows here.
"""

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel
from xattn_jax.pallas_kernels import block_sparse_attention_bwd_mosaic_gpu as bwd_kernel
from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as kernel
from tests.conftest import random_qkv
from tests.suites import random_layout
from xattn_jax import attention_xla, attention_xla_bwd, scoring_xla
from xattn_jax.geometry import Geometry


def _err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main(parts=("forward", "estimator", "backward")):
  B, T, S, N, K, H = 2, 300, 400, 4, 2, 128
  q, k, v = random_qkv(3, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = (jnp.array([300, 123], jnp.int32), jnp.array([400, 250], jnp.int32))
  geometry = Geometry.from_lengths(*lens)
  kw = dict(scale=H**-0.5)
  interpret = jax.default_backend() != "gpu"  # off the GPU: the Mosaic GPU interpreter (a check of this script)
  operands = ("smem",) if interpret else ("registers", "smem")  # the interpreter lacks register operands of wgmma
  for causal in (True, False):
    layout, _ = random_layout(4, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.6)
    reference = "noref" not in parts
    if reference:
      want, lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, causal=causal, **kw)
    else:
      want, lse = kernel.block_sparse_attention(
        q,
        k,
        v,
        layout,
        geometry,
        causal=causal,
        **kw,
        interpret=interpret,
        config=kernel.ForwardConfig(pv_operand=operands[0]),
      )
    # num_ctas 2: each CTA of the persistent grid runs several tiles (the next tile's Q loads during this one's)
    for pv, ctas in itertools.product(operands if "forward" in parts else (), (132, 2)):
      config = kernel.ForwardConfig(pv_operand=pv, num_ctas=ctas)
      out, _ = kernel.block_sparse_attention(
        q, k, v, layout, geometry, causal=causal, **kw, config=config, interpret=interpret
      )
      print(
        f"forward causal={causal} pv={pv} num_ctas={ctas}: max error {_err(out, want):.3e}"
        + ("" if reference else " (vs the kernel's own default run)"),
        flush=True,
      )

    if "estimator" in parts:
      skw = dict(stride=8, block_size=128, causal=causal, **kw)
      got = scores_kernel.antidiagonal_scores(q, k, geometry, **skw, interpret=interpret)
      want_scores = scoring_xla.antidiagonal_scores(q, k, geometry, **skw) if reference else got
      print(f"estimator causal={causal}: max error {_err(got, want_scores):.3e}", flush=True)

    if "backward" not in parts:
      continue
    rng = np.random.default_rng(5)
    d_out = jnp.asarray(rng.standard_normal(want.shape), q.dtype)
    d_lse = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)
    args = (q, k, v, want, lse, d_out, d_lse, layout, geometry)
    print(f"backward causal={causal}: {'the XLA reference, then ' if reference else ''}the kernels", flush=True)
    ref = None
    if reference:
      ref = attention_xla_bwd.block_sparse_attention_bwd(*args, causal=causal, **kw)
    for operand in operands:
      got = bwd_kernel.block_sparse_attention_bwd(
        *args, causal=causal, **kw, config=bwd_kernel.BackwardConfig(operand=operand), interpret=interpret
      )
      errs = ", ".join(f"{name} {_err(a, b):.3e}" for name, a, b in zip(("dq", "dk", "dv"), got, ref or got))
      print(f"backward causal={causal} operand={operand}: max error {errs}", flush=True)


if __name__ == "__main__":
  main(*([tuple(sys.argv[1].split(","))] if len(sys.argv) > 1 else []))
