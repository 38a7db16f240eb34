"""The shared suites on the "xla" backend (the reference), plus its own memory-chunking checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import suites
from tests.conftest import lengths_pair, random_qkv, run_checked
from xattn_jax import attention_xla, scoring_xla
from xattn_jax.geometry import Geometry
from xattn_jax.selection import dense_layout


class TestScoresXla(suites.ScoresSuite):
  implementation = "xla"


class TestAttentionXla(suites.AttentionSuite):
  implementation = "xla"


class TestXAttentionXla(suites.XAttentionSuite):
  implementation = "xla"


def test_scoring_row_chunks_do_not_change_scores():
  B, T, S, N, K, H = 2, 200, 300, 4, 2, 16
  q, k, _ = random_qkv(41, B=B, T=T, S=S, N=N, K=K, H=H)
  geometry = Geometry.from_lengths(*lengths_pair(42, B=B, T=T, S=S))
  kw = dict(stride=8, block_size=32, causal=True, scale=0.25)
  whole = run_checked(scoring_xla.antidiagonal_scores, q, k, geometry, **kw)
  for chunk in (32, 64, 96):
    part = run_checked(scoring_xla.antidiagonal_scores, q, k, geometry, query_chunk_size=chunk, **kw)
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole), atol=1e-6, rtol=1e-6)


def test_attention_query_chunks_do_not_change_output():
  B, T, S, N, K, H, blk = 2, 100, 130, 4, 1, 16, 16
  q, k, v = random_qkv(43, B=B, T=T, S=S, N=N, K=K, H=H)
  geometry = Geometry.from_lengths(*lengths_pair(44, B=B, T=T, S=S))
  layout = dense_layout(geometry, num_heads=N, q_len=T, kv_len=S, block_size=blk, causal=True)
  whole = run_checked(attention_xla.block_sparse_attention, q, k, v, layout, geometry, causal=True, scale=0.25)
  part = run_checked(
    attention_xla.block_sparse_attention, q, k, v, layout, geometry, causal=True, scale=0.25, query_chunk_size=32
  )
  for a, b in zip(whole, part):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunk_budgets_bound_memory_at_long_lengths():
  """At 128K tokens and 32 heads a query chunk's logits stay within the budget (no O(T*S) buffer)."""
  tokens = scoring_xla.row_chunk_tokens(batch=1, heads=32, kv_len=131072, stride=8, block_size=128, q_len=131072)
  assert tokens % 128 == 0 and 128 <= tokens < 131072
  assert tokens // 8 * (131072 // 8) * 32 * 4 <= 64 * 2**20
  blocks = attention_xla.query_chunk_blocks(batch=1, heads=32, head_dim=128, block_size=128, num_q_blocks=1024)
  assert 1 <= blocks < 1024


@pytest.mark.parametrize("stride", [1, 4, 8, 64])
def test_zero_straddling_tokens(stride):
  """The padding tokens of the stride group holding each length are zeroed (a whole group when the length is a
  multiple: harmless padding), nothing else changes; an array shorter than the stride is masked whole."""
  from xattn_jax.geometry import zero_straddling_tokens

  L = 37
  x = jax.random.normal(jax.random.key(stride), (5, L, 2, 3))
  lengths = jnp.array([L, 0, 13, 32, 36], jnp.int32)
  got = np.asarray(run_checked(zero_straddling_tokens, x, lengths, stride=stride))
  want = np.asarray(x).copy()
  for b, n in enumerate(np.asarray(lengths)):
    start = min(n // stride * stride, L - stride) if L >= stride else 0
    want[b, n : start + stride] = 0
  np.testing.assert_array_equal(got, want)
