"""Block selection (SPEC §2) and layout building (§3): literal cases, the oracle, and SPEC's properties."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from tests import oracle
from tests.conftest import run_checked


def select(scores, **kw):
  return run_checked(xa.select_blocks, jnp.asarray(scores, jnp.float32), **kw)


def rows(*values):
  """Scores [1, 1, nQb, nKb] from literal rows."""
  return np.asarray(values, np.float32)[None, None]


# --- tiny literal cases: expected counts and indices spelled out --------------------------------------------------


def test_docstring_example():
  # One query block whose diagonal is key block 4: q_len = 16 (block 0), kv_len = 80 so p(last) = 79 -> block 4.
  layout = select(rows([5, 1, 3, 0, 1]), q_len=16, kv_len=80, block_size=16, threshold=0.8)
  np.testing.assert_array_equal(layout.counts, [[[3]]])
  np.testing.assert_array_equal(layout.indices, [[[[0, 2, 4, 4, 4]]]])


def test_causal_rows_force_sink_and_diagonal():
  scores = rows([4, 0, 0, 0], [1, 3, 0, 0], [1, 1, 6, 0], [2, 5, 1, 0.5])
  layout = select(scores, q_len=64, kv_len=64, block_size=16, threshold=0.7)
  np.testing.assert_array_equal(layout.counts, [[[1, 2, 2, 3]]])
  np.testing.assert_array_equal(layout.indices, [[[[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 3, 3]]]])
  # Row 3: F = {0, 3} holds 2.5 of 8.5, need 5.95; visit 1 (5 -> kept, 7.5), then 2 (7.5 >= 5.95: dropped).


def test_ties_prefer_the_lower_block_index():
  layout = select(rows([1, 2, 2, 2, 1]), q_len=16, kv_len=80, block_size=16, threshold=0.5)
  # F = {0, 4}: mass 2 of 8, need 4; visit 1 (kept, 4), then 2 and 3 are dropped.
  np.testing.assert_array_equal(layout.indices, [[[[0, 1, 4, 4, 4]]]])


def test_non_causal_without_forced_blocks():
  scores = rows([1, 5, 2, 2])
  kw = dict(q_len=16, kv_len=64, block_size=16, causal=False, keep_sink=False, keep_diagonal=False)
  np.testing.assert_array_equal(select(scores, threshold=0.5, **kw).indices, [[[[1, 1, 1, 1]]]])
  np.testing.assert_array_equal(select(scores, threshold=0.6, **kw).indices, [[[[1, 2, 2, 2]]]])
  # tau = 0 with nothing forced still keeps the top block: a real query block never attends to nothing.
  np.testing.assert_array_equal(select(scores, threshold=0.0, **kw).counts, [[[1]]])
  np.testing.assert_array_equal(select(scores, threshold=1.0, **kw).counts, [[[4]]])


def test_key_padding_and_query_padding_blocks():
  # B = 2: the second sequence has 16 real queries and 40 real keys: its query block 1 is padding (selects
  # nothing) and its key blocks >= 3 are padding (never selected).
  scores = np.ones((2, 1, 2, 5), np.float32)
  layout = select(
    scores,
    q_len=32,
    kv_len=80,
    block_size=16,
    threshold=1.0,
    query_seq_lengths=jnp.array([32, 16]),
    key_value_seq_lengths=jnp.array([80, 40]),
  )
  np.testing.assert_array_equal(layout.counts, [[[4, 5]], [[3, 0]]])
  np.testing.assert_array_equal(layout.indices[1, 0], [[0, 1, 2, 2, 2], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(layout.num_allowed, [[[4, 5]], [[3, 0]]])
  assert float(layout.density()) == 1.0


def test_first_chunk_keeps_sink_once():
  """FIX of SPEC §2.2: the first query block's diagonal is the sink; no extra block is kept."""
  layout = select(rows([1, 0, 0], [1, 1, 0], [9, 0.5, 0.5]), q_len=48, kv_len=48, block_size=16, threshold=0.5)
  np.testing.assert_array_equal(layout.counts, [[[1, 2, 2]]])


def test_top_neighbors_keep_a_diagonal_that_crosses_a_block_boundary():
  # A copy head's query block 9 (diagonal 9) puts its mass on key block 1 (63 of 64 rows) and one row's worth on key
  # block 2: 2's share (1/64) is under 1 - tau, so the mass rule drops it (SPEC §2.7); the neighbours of block 1
  # (0, forced anyway, and 2) come back with keep_top_neighbors.
  row = np.full(10, 0.001, np.float32)
  row[1], row[2] = 63, 1
  kw = dict(q_len=160, kv_len=160, block_size=16, threshold=0.9)
  scores = np.tile(row, (10, 1))[None, None]
  plain = select(scores, **kw)
  halo = select(scores, keep_top_neighbors=True, **kw)
  np.testing.assert_array_equal(plain.indices[0, 0, 9, :3], [0, 1, 9])
  np.testing.assert_array_equal(halo.indices[0, 0, 9, :4], [0, 1, 2, 9])
  np.testing.assert_array_equal(halo.counts[0, 0, 9], 4)
  # Row 2 (diagonal 2): blocks 0-2 are all forced or top; nothing is added twice.
  np.testing.assert_array_equal(halo.counts[0, 0, :3], plain.counts[0, 0, :3])
  # tau = 0 keeps exactly the forced set.
  np.testing.assert_array_equal(select(scores, keep_top_neighbors=True, **dict(kw, threshold=0.0)).counts[0, 0, 9], 2)
  # The top block may be forced: a source in the sink block (0) brings block 1.
  sink = np.tile(np.r_[np.float32(60), np.full(9, 0.001, np.float32)], (10, 1))[None, None]
  np.testing.assert_array_equal(select(sink, keep_top_neighbors=True, **kw).indices[0, 0, 9, :3], [0, 1, 9])
  np.testing.assert_array_equal(select(sink, **kw).counts[0, 0, 9], 2)


# --- against the float64 oracle, and SPEC's properties -------------------------------------------------------------


def _random_scores(seed, B, N, nqb, nkb):
  rng = np.random.default_rng(seed)
  return (rng.random((B, N, nqb, nkb)) ** 3).astype(np.float32)  # skewed, like attention mass


@hypothesis.given(
  B=st.integers(1, 2),
  N=st.integers(1, 3),
  T=st.integers(1, 100),
  extra=st.integers(0, 100),
  causal=st.booleans(),
  keep_sink=st.booleans(),
  keep_diagonal=st.booleans(),
  keep_top_neighbors=st.booleans(),
  seed=st.integers(0, 2**16),
  tau=st.one_of(st.sampled_from([0.0, 1.0, 1.5]), st.floats(0.0, 1.0)),
)
def test_property_matches_oracle(B, N, T, extra, causal, keep_sink, keep_diagonal, keep_top_neighbors, seed, tau):
  S, blk = T + extra, 16
  rng = np.random.default_rng(seed)
  kv = rng.integers(1, S + 1, size=B)
  q = np.minimum(rng.integers(1, T + 1, size=B), kv)
  scores = _random_scores(seed, B, N, -(-T // blk), -(-S // blk))
  kw = dict(
    q_len=T,
    kv_len=S,
    block_size=blk,
    threshold=tau,
    causal=causal,
    keep_sink=keep_sink,
    keep_diagonal=keep_diagonal,
    keep_top_neighbors=keep_top_neighbors,
  )
  layout = select(scores, query_seq_lengths=jnp.asarray(q), key_value_seq_lengths=jnp.asarray(kv), **kw)
  want = oracle.select(scores, q_lens=q, kv_lens=kv, **kw)
  np.testing.assert_array_equal(np.asarray(layout.to_dense()), want)
  counts = np.asarray(layout.counts)
  np.testing.assert_array_equal(counts, want.sum(-1))
  idx = np.asarray(layout.indices)
  for b, n, r in np.ndindex(counts.shape):  # ascending, padded with the last valid index
    c = counts[b, n, r]
    np.testing.assert_array_equal(idx[b, n, r, :c], np.flatnonzero(want[b, n, r]))
    assert np.all(idx[b, n, r, c:] == (idx[b, n, r, c - 1] if c else 0))


def _mass_properties(scores, layout, allowed, tau):
  mask = np.asarray(layout.to_dense())
  total = (scores * allowed).sum(-1)
  kept = (scores * mask).sum(-1)
  assert not (mask & ~allowed).any(), "a block outside the allowed set was selected"
  assert np.all(kept >= tau * total * (1 - 1e-6) - 1e-7), "selection covers less than tau of the mass"
  return mask, kept, total


@pytest.mark.parametrize("seed,keep_top_neighbors", [(0, False), (1, False), (2, False), (0, True), (3, True)])
def test_coverage_minimality_and_monotonicity(seed, keep_top_neighbors):
  B, N, T, S, blk = 2, 3, 160, 256, 16
  scores = _random_scores(seed, B, N, T // blk, S // blk)
  allowed = np.asarray(xa.allowed_blocks(q_len=T, kv_len=S, block_size=blk))
  # SPEC 2.7: with the rule, each row's selection plus the allowed neighbours of its top allowed block (tau > 0).
  top = np.argmax(np.where(allowed, scores, -np.inf), -1)
  cols = np.arange(S // blk)
  neighbours = allowed & ((cols == top[..., None] - 1) | (cols == top[..., None] + 1))
  previous = None
  for tau in (0.0, 0.3, 0.6, 0.9, 0.99, 1.0):
    layout = select(scores, q_len=T, kv_len=S, block_size=blk, threshold=tau)
    mask, kept, total = _mass_properties(scores, layout, allowed, tau)
    if keep_top_neighbors:
      rule = select(scores, q_len=T, kv_len=S, block_size=blk, threshold=tau, keep_top_neighbors=True)
      np.testing.assert_array_equal(np.asarray(rule.to_dense()), mask | (neighbours if tau > 0 else False))
      assert np.any(neighbours & ~mask) or tau == 1.0  # the rule adds blocks here (else this case tests nothing)
      mask, _, _ = _mass_properties(scores, rule, allowed, tau)
    else:
      # Forced blocks: the sink and the diagonal (the last allowed block of each row).
      assert mask[..., 0].all()
      last = allowed.sum(-1) - 1
      assert np.take_along_axis(mask, np.broadcast_to(last[..., None], mask.shape[:3] + (1,)), -1).all()
      # Minimality: without its smallest non-forced block, a row covers less than tau.
      forced = np.zeros_like(mask)
      forced[..., 0] = True
      np.put_along_axis(forced, np.broadcast_to(last[..., None], mask.shape[:3] + (1,)), True, -1)
      optional = mask & ~forced
      smallest = np.where(optional, scores, np.inf).min(-1)
      has_optional = optional.any(-1)
      assert np.all(~has_optional | (kept - smallest < tau * total * (1 + 1e-6)))
    if previous is not None:
      assert not (previous & ~mask).any(), "the mask is not monotone in tau"
    previous = mask
  np.testing.assert_array_equal(previous, np.broadcast_to(allowed, previous.shape))  # tau = 1: every allowed block


def test_batch_elements_and_heads_are_independent():
  B, N, T, blk = 3, 2, 128, 16
  scores = _random_scores(7, B, N, T // blk, T // blk)
  tau = jnp.array([0.5, 0.9])
  full = np.asarray(select(scores, q_len=T, kv_len=T, block_size=blk, threshold=tau).to_dense())
  for b in range(B):
    for n in range(N):
      alone = select(scores[b : b + 1, n : n + 1], q_len=T, kv_len=T, block_size=blk, threshold=float(tau[n]))
      np.testing.assert_array_equal(np.asarray(alone.to_dense())[0, 0], full[b, n])
