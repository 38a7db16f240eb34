"""Gradients of block_sparse_attention and xattention (custom_vjp, XLA backward recomputing from the lse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xattn_jax as xa
from tests.conftest import random_qkv, run_checked
from tests.suites import random_layout


def dense_masked(q, k, v, token_mask, *, scale):
  """Plain softmax attention with a token mask [B, N, T, S]; zero output and lse 0 where a row sees nothing."""
  G = q.shape[2] // k.shape[2]
  kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, kk, precision="highest") * scale
  s = jnp.where(token_mask, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(token_mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(e, -1, keepdims=True)
  out = jnp.einsum("bnts,bsnh->btnh", e / jnp.where(l > 0, l, 1.0), vv, precision="highest")
  lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0], 0.0)
  return out, lse


def token_mask(block_mask, *, T, S, blk, causal, q_lens, kv_lens):
  t, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
  qb, kb = q_lens[:, None, None], kv_lens[:, None, None]
  ok = (j < kb) & (t < qb)
  if causal:
    ok &= j <= kb - qb + t
  blocks = jnp.asarray(block_mask).repeat(blk, axis=2).repeat(blk, axis=3)[:, :, :T, :S]
  return ok[:, None] & blocks


def _loss(out, lse):  # weights every output element differently, and uses the lse
  weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  return jnp.sum(out.astype(jnp.float32) * weights) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,S,N,K", [(2, 70, 100, 4, 2), (1, 64, 64, 3, 3), (2, 33, 130, 4, 1)])
def test_gradients_match_dense_attention_on_the_same_mask(B, T, S, N, K, causal):
  H, blk = 16, 16
  q, k, v = random_qkv(B * T + S, B=B, T=T, S=S, N=N, K=K, H=H)
  lens = (jnp.array([T, T - 20][:B], jnp.int32), jnp.array([S, S - 10][:B], jnp.int32))
  layout, mask = random_layout(S, B=B, N=N, T=T, S=S, blk=blk, causal=causal, lens=lens, density=0.5)
  tm = token_mask(mask, T=T, S=S, blk=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1])

  def sparse(q, k, v):
    return _loss(
      *xa.block_sparse_attention(
        q, k, v, layout, causal=causal, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1], return_lse=True
      )
    )

  got = run_checked(jax.grad(sparse, argnums=(0, 1, 2)), q, k, v)
  want = jax.grad(lambda q, k, v: _loss(*dense_masked(q, k, v, tm, scale=H**-0.5)), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    assert not np.isnan(np.asarray(a)).any()
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_threshold_one_gradients_equal_dense():
  B, T, N, K, H = 2, 96, 4, 2, 16
  q, k, v = random_qkv(3, B=B, T=T, S=T, N=N, K=K, H=H)

  def sparse(q, k, v):
    return _loss(xa.xattention(q, k, v, is_causal=True, threshold=1.0, block_size=16, stride=4), jnp.zeros(()))

  def dense(q, k, v):
    return _loss(jax.nn.dot_product_attention(q, k, v, is_causal=True), jnp.zeros(()))

  got = run_checked(jax.grad(sparse, argnums=(0, 1, 2)), q, k, v)
  want = jax.grad(dense, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_xattention_gradient_treats_the_selection_as_constant():
  B, T, N, K, H = 1, 128, 2, 1, 16
  q, k, v = random_qkv(4, B=B, T=T, S=T, N=N, K=K, H=H)
  kw = dict(is_causal=True, threshold=0.6, block_size=16, stride=4)
  _, layout = xa.xattention(q, k, v, return_block_layout=True, **kw)
  via_xattention = run_checked(
    jax.grad(lambda q, k, v: _loss(xa.xattention(q, k, v, **kw), jnp.zeros(())), argnums=(0, 1, 2)), q, k, v
  )
  via_layout = jax.grad(
    lambda q, k, v: _loss(xa.block_sparse_attention(q, k, v, layout), jnp.zeros(())), argnums=(0, 1, 2)
  )(q, k, v)
  for a, b in zip(via_xattention, via_layout):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


def test_finite_differences():
  B, T, S, N, K, H, blk = 1, 40, 56, 2, 1, 8, 16
  q, k, v = random_qkv(5, B=B, T=T, S=S, N=N, K=K, H=H)
  layout, _ = random_layout(6, B=B, N=N, T=T, S=S, blk=blk, causal=True, lens=(None, None), density=0.6)
  f = lambda q, k, v: xa.block_sparse_attention(q, k, v, layout)
  check_grads(f, (q, k, v), order=1, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


def test_padding_and_empty_sequences_have_finite_zero_gradients():
  B, T, S, N, H, blk = 3, 40, 64, 2, 8, 16
  q, k, v = random_qkv(7, B=B, T=T, S=S, N=N, K=1, H=H)
  lens = (jnp.array([0, 17, 40], jnp.int32), jnp.array([0, 30, 64], jnp.int32))
  layout, _ = random_layout(8, B=B, N=N, T=T, S=S, blk=blk, causal=True, lens=lens)
  loss = lambda q, k, v: _loss(
    *xa.block_sparse_attention(
      q, k, v, layout, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1], return_lse=True
    )
  )
  dq, dk, dv = (np.asarray(g) for g in run_checked(jax.grad(loss, argnums=(0, 1, 2)), q, k, v))
  assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
  assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dq[1, 17:] == 0) and np.all(dk[1, 30:] == 0)
  assert np.abs(dq[1, :17]).sum() > 0 and np.abs(dv[2]).sum() > 0


def test_low_precision_gradients_keep_the_input_dtype():
  q, k, v = random_qkv(9, B=1, T=64, S=64, N=2, K=1, H=16, dtype=jnp.bfloat16)
  grads = run_checked(
    jax.grad(
      lambda q, k, v: jnp.sum(
        xa.xattention(q, k, v, is_causal=True, threshold=0.9, block_size=16, stride=4).astype(jnp.float32)
      ),
      argnums=(0, 1, 2),
    ),
    q,
    k,
    v,
  )
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_gradient_through_a_kernel_forward():
  """Mosaic GPU forward and backward kernels (in the CPU interpreter) == the XLA forward + backward."""
  q, k, v = random_qkv(10, B=1, T=256, S=256, N=2, K=1, H=64, dtype=jnp.bfloat16)
  loss = lambda impl: (
    lambda q, k, v: jnp.sum(
      xa.xattention(q, k, v, is_causal=True, threshold=0.8, implementation=impl, interpret=True).astype(jnp.float32)
      ** 2
    )
  )
  kernel = run_checked(jax.grad(loss(("pallas_mosaic_gpu", "xla")), argnums=(0, 1, 2)), q, k, v)
  xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(kernel, xla):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2, rtol=5e-2)


def test_gradients_do_not_depend_on_query_chunking():
  q, k, v = random_qkv(11, B=1, T=100, S=100, N=2, K=1, H=16)
  kw = dict(is_causal=True, threshold=0.7, block_size=16, stride=4)
  loss = lambda chunk: lambda q, k, v: _loss(xa.xattention(q, k, v, query_chunk_size=chunk, **kw), jnp.zeros(()))
  whole = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
  chunked = run_checked(jax.grad(loss(32), argnums=(0, 1, 2)), q, k, v)
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
