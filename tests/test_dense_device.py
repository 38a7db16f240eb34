"""GPU-only checks of `xattn_jax.dense_attention`'s routes against the float32 XLA reference, on fresh random inputs.

Skipped without a CUDA GPU (CI has none; there tests/test_dense.py checks the routes' choice and the CPU routes):
    python -m pytest -q tests/test_dense_device.py
The cuDNN route (self-attention, T == S, one lengths array), the block route on the Mosaic GPU kernel (a chunk after
earlier ones: T < S with lengths), the logits route (a decode step), and a gradient through the block route.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from tests.conftest import random_qkv

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


def _rel(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _reference(q, k, v, q_lengths, kv_lengths):
  return xa.dense_attention(
    *(x.astype(jnp.float32) for x in (q, k, v)),
    is_causal=True,
    query_seq_lengths=q_lengths,
    key_value_seq_lengths=kv_lengths,
    implementation="xla",
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "B,T,S,N,K,H",
  [
    (2, 2048, 2048, 8, 2, 128),
    (2, 777, 777, 8, 2, 64),  # cuDNN's route at an odd length
    (2, 1536, 4096, 8, 2, 128),
    (1, 1, 4096, 32, 8, 128),
    (2, 1000, 3000, 4, 4, 64),
  ],
)
def test_routes_match_the_reference(dtype, B, T, S, N, K, H):
  q, k, v = random_qkv(T * 7 + S, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  kv_lengths = jnp.array([S, S - 300][:B], jnp.int32)
  q_lengths = kv_lengths if T == S else jnp.array([T, T - 100][:B], jnp.int32)
  route = xa.dense_route(
    platform="gpu", dtype=dtype, batch=B, q_len=T, kv_len=S, num_heads=N, head_dim=H, causal=True, aligned=T == S
  )
  fn = jax.jit(
    lambda q, k, v, ql, kl: xa.dense_attention(
      q, k, v, is_causal=True, query_seq_lengths=ql, key_value_seq_lengths=kl if T != S else ql
    )
  )
  got = fn(q, k, v, q_lengths, kv_lengths)
  want = _reference(q, k, v, q_lengths, kv_lengths if T != S else q_lengths)
  assert got.dtype == dtype and bool(jnp.all(jnp.isfinite(got)))
  assert _rel(got, want) < (2e-2 if dtype == jnp.bfloat16 else 4e-3), route
  for b in range(B):  # padding queries are zeros
    assert not np.any(np.asarray(got[b, int(q_lengths[b]) :], np.float32))


def test_self_attention_prefill_runs_cudnn():
  """The cuDNN route is what a GPU host compiles for self-attention with one lengths array (a model's prompt), not
  the block route that a host without cuDNN falls back to: the compiled program calls cuDNN's fused attention."""
  q, k, v = random_qkv(5, B=1, T=2048, S=2048, N=8, K=2, H=128, dtype=jnp.bfloat16)
  lengths = jnp.array([2000], jnp.int32)
  call = lambda q, k, v, n: xa.dense_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n)
  fn = jax.jit(call)
  text = fn.lower(q, k, v, lengths).compile().as_text()
  assert "cudnn" in text.lower() and "mosaic_gpu" not in text, "the aligned dense call did not compile to cuDNN"


def test_block_route_gradient_matches_reference():
  q, k, v = random_qkv(5, B=1, T=1024, S=2048, N=8, K=2, H=128, dtype=jnp.bfloat16)
  loss = lambda impl: jax.jit(
    jax.grad(
      lambda q, k, v: jnp.sum(
        xa.dense_attention(q, k, v, is_causal=True, implementation=impl).astype(jnp.float32) ** 2
      ),
      argnums=(0, 1, 2),
    )
  )
  got = loss(None)(q, k, v)
  want = loss("xla")(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w in zip(got, want):
    assert _rel(g, w) < 3e-2


def test_cudnn_route_gradient_with_lengths_matches_reference():
  """Training a dense model runs cuDNN's backward on padded self-attention (one lengths array): gradients finite and
  equal to the reference's, and none flowing into padding tokens' keys and values."""
  q, k, v = random_qkv(9, B=2, T=1024, S=1024, N=8, K=2, H=128, dtype=jnp.bfloat16)
  n = jnp.array([1024, 700], jnp.int32)
  loss = lambda impl: jax.jit(
    jax.grad(
      lambda q, k, v: jnp.sum(
        xa.dense_attention(
          q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n, implementation=impl
        ).astype(jnp.float32)
        ** 2
      ),
      argnums=(0, 1, 2),
    )
  )
  got = loss(None)(q, k, v)
  want = loss("xla")(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w in zip(got, want):
    assert bool(jnp.all(jnp.isfinite(g))) and _rel(g, w) < 3e-2
    assert not np.any(np.asarray(g[1, 700:], np.float32))
