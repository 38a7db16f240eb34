"""One small call of each Mosaic GPU kernel variant, for compute-sanitizer (memcheck, racecheck) on the device:

    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 \
      compute-sanitizer --tool memcheck python3 benchmarks/sanitize_attention.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_attention_mosaic_gpu as kernel
from tests.conftest import random_qkv
from tests.suites import random_layout
from xattn_jax import attention_xla
from xattn_jax.geometry import Geometry


def main():
  B, T, S, N, K, H = 2, 300, 400, 4, 2, 128
  q, k, v = random_qkv(3, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = (jnp.array([300, 123], jnp.int32), jnp.array([400, 250], jnp.int32))
  geometry = Geometry.from_lengths(*lens)
  for causal in (True, False):
    layout, _ = random_layout(4, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.6)
    want, _ = attention_xla.block_sparse_attention(q, k, v, layout, geometry, causal=causal, scale=H**-0.5)
    for pv in ("registers", "smem"):
      out, _ = kernel.block_sparse_attention(q, k, v, layout, geometry, causal=causal, scale=H**-0.5,
                                             config=kernel.TuningConfig(pv_operand=pv))
      err = float(np.abs(np.asarray(out, np.float32) - np.asarray(want, np.float32)).max())
      print(f"causal={causal} pv={pv}: max abs err {err:.3e}", flush=True)


if __name__ == "__main__":
  main()
