"""XAttention as the attention_fn of flax.nnx.MultiHeadAttention and flax.linen.MultiHeadDotProductAttention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import xattn_jax as xa
from tests.conftest import run_checked


def _mha(attention_fn, seed=0):
  return nnx.MultiHeadAttention(
    num_heads=4, in_features=32, qkv_features=64, decode=False, attention_fn=attention_fn, rngs=nnx.Rngs(seed)
  )


def test_dense_threshold_matches_flax_causal_attention():
  x = jax.random.normal(jax.random.key(1), (2, 96, 32))
  config = xa.XAttentionConfig(threshold=1.0, block_size=32, stride=8)
  follows, forced = _mha(xa.attention_fn(config)), _mha(xa.attention_fn(config, is_causal=True))
  dense = _mha(nnx.dot_product_attention)
  want = dense(x, mask=nnx.make_causal_mask(jnp.ones((2, 96))))
  for got in (run_checked(lambda x: follows(x, is_causal=True), x), run_checked(lambda x: forced(x), x)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(follows(x)), np.asarray(dense(x)), atol=2e-5, rtol=1e-5)


def test_sparse_threshold_changes_the_output_but_stays_close():
  x = jax.random.normal(jax.random.key(2), (1, 256, 32))
  dense = _mha(xa.attention_fn(xa.XAttentionConfig(threshold=1.0, block_size=32, stride=8)))
  sparse = _mha(xa.attention_fn(xa.XAttentionConfig(threshold=0.5, block_size=32, stride=8)))
  a, b = np.asarray(dense(x, is_causal=True)), np.asarray(sparse(x, is_causal=True))
  assert not np.allclose(a, b) and np.isfinite(b).all()
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.5


def test_a_dense_mask_is_refused():
  sparse = _mha(xa.attention_fn())
  x = jnp.ones((1, 16, 32))
  with pytest.raises(NotImplementedError, match="dense mask"):
    sparse(x, mask=nnx.make_causal_mask(jnp.ones((1, 16))))
  with pytest.raises(ValueError, match="config must be an XAttentionConfig"):
    xa.attention_fn({"threshold": 0.9})
  with pytest.raises(ValueError, match="is_causal=1"):
    xa.attention_fn(is_causal=1)


def test_linen_multi_head_attention():
  x = jax.random.normal(jax.random.key(3), (2, 80, 32))
  config = xa.XAttentionConfig(threshold=1.0, block_size=16, stride=4)
  sparse = nn.MultiHeadDotProductAttention(
    num_heads=4, qkv_features=64, attention_fn=xa.attention_fn(config, is_causal=True)
  )
  dense = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
  params = dense.init(jax.random.key(0), x)
  want = dense.apply(params, x, mask=nn.make_causal_mask(jnp.ones((2, 80))))
  got = run_checked(lambda p, x: sparse.apply(p, x), params, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  sparse_dropout = nn.MultiHeadDotProductAttention(
    num_heads=4, qkv_features=64, dropout_rate=0.1, attention_fn=xa.attention_fn(config, is_causal=True)
  )
  with pytest.raises(NotImplementedError, match="dropout"):
    sparse_dropout.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
