"""The XLA reference at 32K tokens x 32 heads on a CPU, within the memory of the CI machine (slow: -m slow)."""

from __future__ import annotations

import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from xattn_jax.synthetic import llm_like_qkv


@pytest.mark.slow
def test_xattention_32k_tokens_32_heads_on_cpu():
  T, N, K, H = 32768, 32, 8, 128
  q, k, v = llm_like_qkv(jax.random.key(0), seq_len=T, num_heads=N, num_kv_heads=K, head_dim=H)
  out, layout = jax.jit(lambda q, k, v: xa.xattention(
      q, k, v, is_causal=True, threshold=0.9, implementation="xla", return_block_layout=True))(q, k, v)
  out = np.asarray(out.astype(jnp.float32))
  assert out.shape == (1, T, N, H) and np.isfinite(out).all()
  density = float(layout.density())
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"density {density:.3f}, peak RSS {peak_gib:.1f} GiB")
  assert 0 < density < 1 and peak_gib < 20
