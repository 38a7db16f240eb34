"""Shared test suites, one per op. Each backend subclasses them (see test_backend_xla.py) and sets
`implementation` and `interpret`; tolerances are class attributes so a backend can state its own.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from tests import oracle
from tests.conftest import OUT_TOL, lengths_pair, random_qkv, run_checked

# (B, T, S, N, K, H, stride, block_size, causal, with_lengths): T, S off the multiples of s and blk, T < S, GQA,
# batches with different lengths, causal and not.
CASES = [
  (1, 64, 64, 2, 2, 16, 4, 16, True, False),
  (1, 50, 77, 4, 2, 16, 4, 16, True, False),
  (2, 45, 130, 4, 1, 8, 8, 32, True, True),
  (2, 96, 96, 3, 3, 16, 4, 32, False, True),
  (1, 33, 90, 2, 1, 16, 8, 16, False, False),
  (2, 128, 200, 4, 2, 32, 16, 64, True, True),
]
ESTIMATORS = ["antidiagonal", "alternating"]
CASE_IDS = [
  f"B{c[0]}T{c[1]}S{c[2]}N{c[3]}K{c[4]}s{c[6]}b{c[7]}{'c' if c[8] else 'nc'}{'L' if c[9] else ''}" for c in CASES
]


def _case_inputs(case, seed, dtype=jnp.float32):
  B, T, S, N, K, H, stride, blk, causal, with_lengths = case
  q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = lengths_pair(seed + 1, B=B, T=T, S=S) if with_lengths else (None, None)
  return q, k, v, lens


def _lengths_kwargs(lens):
  q_lens, kv_lens = lens
  out = {}
  if q_lens is not None:
    out["query_seq_lengths"] = q_lens
    out["key_value_seq_lengths"] = kv_lens
  return out


def assert_padding_values_do_not_matter(*, seed, T, N, K, H, lengths, estimator, min_density, **xattention_kwargs):
  """SPEC §1.1: padding tokens count as zeros whatever their stored values. xattention zeroes only those that share
  a stride group with real ones and tells the scoring kernel (`padding_zeroed`); the kernels drop whole padding
  groups themselves. Ragged `lengths` (off multiples of the stride), traced as a model's are, padding filled with
  NaN: the same layout and output as with zero padding. Plain jit: checkify's NaN checks would flag the garbage."""
  q, k, v = random_qkv(seed, B=len(lengths), T=T, S=T, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lengths = jnp.asarray(lengths, jnp.int32)
  pad = (jnp.arange(T)[None, :] >= lengths[:, None])[:, :, None, None]
  run = jax.jit(
    lambda q, k, n: xa.xattention(
      q,
      k,
      v,
      is_causal=True,
      threshold=0.5,
      estimator=estimator,
      query_seq_lengths=n,
      key_value_seq_lengths=n,
      return_block_layout=True,
      **xattention_kwargs,
    )
  )
  clean_out, clean = run(jnp.where(pad, 0, q), jnp.where(pad, 0, k), lengths)
  out, layout = run(jnp.where(pad, jnp.nan, q).astype(q.dtype), jnp.where(pad, jnp.nan, k).astype(k.dtype), lengths)
  assert min_density < float(clean.density()) < 0.9, float(clean.density())  # a selection that can go wrong
  np.testing.assert_array_equal(np.asarray(layout.indices), np.asarray(clean.indices))
  np.testing.assert_array_equal(np.asarray(layout.counts), np.asarray(clean.counts))
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(clean_out, np.float32))


def random_layout(seed, *, B, N, T, S, blk, causal, lens, density=0.4):
  """A random layout inside the allowed set, always holding the sink and the diagonal; plus its dense mask."""
  rng = np.random.default_rng(seed)
  nqb, nkb = -(-T // blk), -(-S // blk)
  allowed = np.asarray(xa.allowed_blocks(q_len=T, kv_len=S, block_size=blk, causal=causal, **_lengths_kwargs(lens)))
  mask = rng.random((B, N, nqb, nkb)) < density
  last = allowed.sum(-1) - 1  # [B|1, 1, nQb]
  diag = np.zeros_like(mask)
  np.put_along_axis(diag, np.broadcast_to(np.maximum(last, 0)[..., None], (B, N, nqb, 1)), True, axis=-1)
  diag[..., 0] = True
  mask = (mask | diag) & allowed
  return xa.BlockLayout.from_dense(jnp.asarray(mask), block_size=blk, allowed=jnp.asarray(allowed)), mask


class ScoresSuite:
  implementation = "xla"
  interpret = False
  atol = 2e-5  # scores are float32 probabilities summed per block

  def scores(self, q, k, **kw):
    return run_checked(xa.antidiagonal_scores, q, k, implementation=self.implementation, interpret=self.interpret, **kw)

  @pytest.mark.parametrize("estimator", ESTIMATORS)
  @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
  def test_matches_oracle(self, case, estimator):
    q, k, _, lens = _case_inputs(case, seed=11)
    _, T, S, _, _, _, stride, blk, causal, _ = case
    got = self.scores(q, k, stride=stride, block_size=blk, causal=causal, estimator=estimator, **_lengths_kwargs(lens))
    want = oracle.scores(
      q, k, stride=stride, block_size=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1], estimator=estimator
    )
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=self.atol, rtol=1e-5)

  @pytest.mark.parametrize("estimator", ESTIMATORS)
  def test_which_token_distances_are_sampled(self, estimator):
    """SPEC §1.7: attention only at token distance d (one-hot keys, q_t = k_{t-d}). With s = 8 the paper's
    antidiagonal puts every row's mass on the key blocks holding t - d for odd d and sees nothing (uniform rows) for
    even d; the alternating estimator's odd rows see even d and its even rows odd d, so > half the mass lands there
    for every d."""
    T, s, blk = 256, 8, 32
    keys = np.eye(T, dtype=np.float32)
    for d in [0, 1, 2, 3, 8, 9, 16, 64, 65]:
      q = jnp.asarray(np.roll(keys, d, axis=0)[None, :, None])  # q_t = k_{(t-d) mod T}
      a = np.asarray(
        self.scores(
          q,
          jnp.asarray(keys[None, :, None]),
          stride=s,
          block_size=blk,
          causal=False,
          scale=20.0 * s,
          estimator=estimator,
        )
      )[0, 0]
      for r in range(T // blk):
        target = {((r * blk - d) % T) // blk, ((r * blk + blk - 1 - d) % T) // blk}
        share = sum(a[r, c] for c in target) / a[r].sum()
        if estimator == "alternating":
          assert share > 0.5, (d, r, share)
        elif d % 2:
          assert share > 0.99, (d, r, share)
        else:
          np.testing.assert_allclose(share, len(target) * blk / T, rtol=1e-4, err_msg=f"{d=} {r=}")

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_low_precision_inputs(self, dtype):
    case = CASES[2]
    q, k, _, lens = _case_inputs(case, seed=12, dtype=dtype)
    _, T, S, _, _, _, stride, blk, causal, _ = case
    got = self.scores(q, k, stride=stride, block_size=blk, causal=causal, **_lengths_kwargs(lens))
    want = oracle.scores(q, k, stride=stride, block_size=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    np.testing.assert_allclose(np.asarray(got), want, atol=5 * self.atol, rtol=1e-4)

  def test_row_sums_and_causality(self):
    T = S = 160
    blk, stride = 32, 8
    q, k, _ = random_qkv(13, B=1, T=T, S=S, N=2, K=1, H=16)
    got = np.asarray(self.scores(q, k, stride=stride, block_size=blk, causal=True))
    sums = got.sum(-1)
    np.testing.assert_allclose(sums, np.full_like(sums, blk // stride), rtol=1e-5)  # every block is full here
    upper = np.triu(np.ones(got.shape[2:], bool), 1)
    assert np.all(got[..., upper] == 0), "causal scores leak above the diagonal"
    assert np.all(got[..., ~upper] > 0)

  def test_padding_rows_and_empty_sequences_are_zero(self):
    B, T, S, blk = 3, 64, 96, 16
    q, k, _ = random_qkv(14, B=B, T=T, S=S, N=2, K=2, H=8)
    q_lens = jnp.array([0, 20, 64], jnp.int32)
    kv_lens = jnp.array([0, 50, 96], jnp.int32)
    got = np.asarray(
      self.scores(q, k, stride=4, block_size=blk, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens)
    )
    assert np.all(np.isfinite(got))
    assert np.all(got[0] == 0)
    assert np.all(got[1, :, 2:] == 0)  # query blocks past 20 tokens are padding
    assert np.all(got[1, :, :, 4:] == 0)  # key blocks past 50 tokens are padding
    np.testing.assert_allclose(got[1, :, 0].sum(-1), 4, rtol=1e-5)
    np.testing.assert_allclose(got[1, :, 1].sum(-1), 1, rtol=1e-5)  # 4 real tokens = 1 strided row

  def test_non_causal_ignores_key_padding(self):
    """FIX of SPEC §1.3: zero-padded keys take no mass in non-causal mode."""
    q, k, _ = random_qkv(15, B=1, T=40, S=40, N=1, K=1, H=8)
    got = np.asarray(self.scores(q, k, stride=8, block_size=16, causal=False))
    assert got.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(got.sum(-1)[0, 0], [2, 2, 1], rtol=1e-5)

  @hypothesis.given(
    B=st.integers(1, 2),
    T=st.integers(1, 70),
    extra=st.integers(0, 40),
    K=st.integers(1, 2),
    G=st.integers(1, 2),
    stride=st.sampled_from([4, 8]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
  )
  def test_property_matches_oracle(self, B, T, extra, K, G, stride, causal, seed):
    S = T + extra
    q, k, _ = random_qkv(seed, B=B, T=T, S=S, N=K * G, K=K, H=8)
    lens = lengths_pair(seed, B=B, T=T, S=S)
    got = self.scores(
      q, k, stride=stride, block_size=16, causal=causal, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1]
    )
    want = oracle.scores(q, k, stride=stride, block_size=16, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    np.testing.assert_allclose(np.asarray(got), want, atol=self.atol, rtol=1e-5)


class AttentionSuite:
  implementation = "xla"
  interpret = False
  out_tol = OUT_TOL
  lse_atol = 2e-5

  def attend(self, q, k, v, layout, **kw):
    return run_checked(
      xa.block_sparse_attention, q, k, v, layout, implementation=self.implementation, interpret=self.interpret, **kw
    )

  @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
  def test_matches_oracle(self, case):
    q, k, v, lens = _case_inputs(case, seed=21)
    B, T, S, N, _, _, _, blk, causal, _ = case
    layout, mask = random_layout(22, B=B, N=N, T=T, S=S, blk=blk, causal=causal, lens=lens)
    out, lse = self.attend(q, k, v, layout, causal=causal, return_lse=True, **_lengths_kwargs(lens))
    want, want_lse = oracle.attention(q, k, v, mask, block_size=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, N, T) and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, atol=self.out_tol[jnp.float32], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=self.lse_atol, rtol=1e-5)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_low_precision(self, dtype):
    case = CASES[1]
    q, k, v, lens = _case_inputs(case, seed=23, dtype=dtype)
    B, T, S, N, _, _, _, blk, causal, _ = case
    layout, mask = random_layout(24, B=B, N=N, T=T, S=S, blk=blk, causal=causal, lens=lens)
    out = self.attend(q, k, v, layout, causal=causal)
    want, _ = oracle.attention(q, k, v, mask, block_size=blk, causal=causal)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=self.out_tol[dtype], rtol=self.out_tol[dtype])

  @pytest.mark.parametrize("causal", [True, False])
  def test_all_blocks_equal_dense(self, causal):
    B, T, S, N, K, H, blk = 2, 100, 150, 4, 2, 16, 32
    q, k, v = random_qkv(25, B=B, T=T, S=S, N=N, K=K, H=H)
    allowed = xa.allowed_blocks(q_len=T, kv_len=S, block_size=blk, causal=causal)
    layout = xa.BlockLayout.from_dense(jnp.broadcast_to(allowed, (B, N) + allowed.shape[2:]), block_size=blk)
    out = self.attend(q, k, v, layout, causal=causal)
    mask = jnp.tril(jnp.ones((T, S), bool), S - T) if causal else None
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)

  def test_skipped_blocks_are_never_read(self):
    """Skipping must not change the answer: poisoning unselected K/V blocks leaves the output unchanged."""
    B, T, S, N, H, blk = 1, 32, 250, 2, 16, 16
    q, k, v = random_qkv(26, B=B, T=T, S=S, N=N, K=N, H=H)
    _, mask = random_layout(27, B=B, N=N, T=T, S=S, blk=blk, causal=True, lens=(None, None), density=0.5)
    mask[:, 0, :, 2:6] = False  # head 0 never selects key blocks 2-5, head 1 never 7-9
    mask[:, 1, :, 7:10] = False
    layout = xa.BlockLayout.from_dense(jnp.asarray(mask), block_size=blk)
    out = self.attend(q, k, v, layout)
    unused = ~mask.any(axis=2)  # [B, N, nKb]; K = N, so kv head n serves query head n alone
    poison = jnp.asarray(np.repeat(unused, blk, axis=-1)[..., :S].transpose(0, 2, 1)[..., None])
    assert int(poison.sum()) >= 7 * blk
    k2, v2 = jnp.where(poison, 1e4, k), jnp.where(poison, -1e4, v)
    np.testing.assert_allclose(np.asarray(self.attend(q, k2, v2, layout)), np.asarray(out), atol=1e-6, rtol=0)

  def test_padding_and_empty_sequences(self):
    B, T, S, N, H, blk = 3, 40, 64, 2, 8, 16
    q, k, v = random_qkv(28, B=B, T=T, S=S, N=N, K=1, H=H)
    lens = (jnp.array([0, 17, 40], jnp.int32), jnp.array([0, 30, 64], jnp.int32))
    layout, mask = random_layout(29, B=B, N=N, T=T, S=S, blk=blk, causal=True, lens=lens)
    out, lse = self.attend(q, k, v, layout, return_lse=True, **_lengths_kwargs(lens))
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(out[1, 17:] == 0) and np.all(np.isneginf(lse[1, :, 17:]))
    assert np.all(np.isfinite(lse[1, :, :17])) and np.all(np.isfinite(lse[2]))
    want, want_lse = oracle.attention(q, k, v, mask, block_size=blk, causal=True, q_lens=lens[0], kv_lens=lens[1])
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)

  @hypothesis.given(
    B=st.integers(1, 2),
    T=st.integers(1, 60),
    extra=st.integers(0, 50),
    K=st.integers(1, 2),
    G=st.integers(1, 3),
    causal=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
  )
  def test_property_matches_oracle(self, B, T, extra, K, G, causal, density, seed):
    S, N, blk = T + extra, K * G, 16
    q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=8)
    lens = lengths_pair(seed, B=B, T=T, S=S)
    layout, mask = random_layout(seed, B=B, N=N, T=T, S=S, blk=blk, causal=causal, lens=lens, density=density)
    out, lse = self.attend(q, k, v, layout, causal=causal, return_lse=True, **_lengths_kwargs(lens))
    want, want_lse = oracle.attention(q, k, v, mask, block_size=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5, rtol=1e-5)


class XAttentionSuite:
  implementation = "xla"
  interpret = False

  def run(self, q, k, v, **kw):
    return run_checked(xa.xattention, q, k, v, implementation=self.implementation, interpret=self.interpret, **kw)

  @pytest.mark.parametrize(
    "case,estimator,top_neighbors",
    [(c, "antidiagonal", False) for c in CASES] + [(CASES[2], "alternating", False), (CASES[2], "antidiagonal", True)],
    ids=CASE_IDS + [CASE_IDS[2] + "-alternating", CASE_IDS[2] + "-top-neighbors"],
  )
  def test_pipeline_matches_oracle(self, case, estimator, top_neighbors):
    """estimate -> select -> attend, each stage against the float64 oracle (SPEC §2.7's rule in one case)."""
    q, k, v, lens = _case_inputs(case, seed=31)
    B, T, S, N, _, _, stride, blk, causal, _ = case
    tau = 0.6
    out, layout = self.run(
      q,
      k,
      v,
      is_causal=causal,
      threshold=tau,
      stride=stride,
      block_size=blk,
      return_block_layout=True,
      estimator=estimator,
      keep_top_neighbors=top_neighbors,
      **_lengths_kwargs(lens),
    )
    want_scores = oracle.scores(
      q, k, stride=stride, block_size=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1], estimator=estimator
    )
    select = dict(q_len=T, kv_len=S, block_size=blk, threshold=tau, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    want_mask = oracle.select(want_scores, keep_top_neighbors=top_neighbors, **select)
    if top_neighbors:  # the case is one where the rule adds blocks
      assert want_mask.sum() > oracle.select(want_scores, **select).sum()
    np.testing.assert_array_equal(np.asarray(layout.to_dense()), want_mask)
    want, _ = oracle.attention(q, k, v, want_mask, block_size=blk, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)

  @pytest.mark.parametrize("causal", [True, False])
  def test_threshold_one_is_dense(self, causal):
    B, T, S, N, K, H = 2, 200, 260, 4, 2, 16
    q, k, v = random_qkv(32, B=B, T=T, S=S, N=N, K=K, H=H)
    out, layout = self.run(q, k, v, is_causal=causal, threshold=1.0, stride=4, block_size=32, return_block_layout=True)
    mask = jnp.tril(jnp.ones((T, S), bool), S - T) if causal else None
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert float(layout.density()) == 1.0

  @pytest.mark.parametrize("estimator", ESTIMATORS)
  def test_chunk_size_independence(self, estimator):
    """FIX of SPEC §1.6: neither the layout nor the output depends on how queries are chunked."""
    B, T, S, N, K, H, blk = 2, 150, 230, 4, 2, 16, 32
    q, k, v = random_qkv(33, B=B, T=T, S=S, N=N, K=K, H=H)
    lens = lengths_pair(34, B=B, T=T, S=S)
    kw = dict(
      is_causal=True,
      threshold=0.7,
      stride=8,
      block_size=blk,
      return_block_layout=True,
      estimator=estimator,
      **_lengths_kwargs(lens),
    )
    out_a, lay_a = self.run(q, k, v, **kw)
    out_b, lay_b = self.run(q, k, v, query_chunk_size=blk, **kw)
    out_c, lay_c = self.run(q, k, v, query_chunk_size=2 * blk, **kw)
    for lay in (lay_b, lay_c):
      np.testing.assert_array_equal(np.asarray(lay.counts), np.asarray(lay_a.counts))
      np.testing.assert_array_equal(np.asarray(lay.indices), np.asarray(lay_a.indices))
    # The counts alone (no index table), in chunks and in one: the layout's, and its density.
    for chunk in (blk, None):
      out_d, counts = self.run(q, k, v, query_chunk_size=chunk, **dict(kw, return_block_layout="counts"))
      assert isinstance(counts, xa.BlockCounts), type(counts)
      np.testing.assert_array_equal(np.asarray(counts.counts), np.asarray(lay_a.counts))
      np.testing.assert_array_equal(np.asarray(counts.num_allowed), np.asarray(lay_a.num_allowed))
      np.testing.assert_allclose(float(counts.density()), float(lay_a.density()), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(out_d), np.asarray(out_a), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_a), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out_c), np.asarray(out_a), atol=1e-6, rtol=1e-6)

  def test_batch_independence(self):
    """FIX of SPEC §2.5: each batch element selects on its own."""
    B, T, S, N, H, blk = 3, 96, 96, 2, 16, 16
    q, k, v = random_qkv(35, B=B, T=T, S=S, N=N, K=N, H=H)
    lens = (jnp.array([96, 50, 70], jnp.int32), jnp.array([96, 80, 70], jnp.int32))
    kw = dict(is_causal=True, threshold=0.5, stride=4, block_size=blk, return_block_layout=True)
    out, layout = self.run(q, k, v, **kw, **_lengths_kwargs(lens))
    for b in range(B):
      one = slice(b, b + 1)
      out_b, lay_b = self.run(
        q[one], k[one], v[one], **kw, query_seq_lengths=lens[0][one], key_value_seq_lengths=lens[1][one]
      )
      np.testing.assert_array_equal(np.asarray(lay_b.to_dense()[0]), np.asarray(layout.to_dense()[b]))
      np.testing.assert_allclose(np.asarray(out_b[0]), np.asarray(out[b]), atol=1e-6, rtol=1e-6)

  def test_per_head_threshold(self):
    B, T, N, H, blk = 1, 128, 4, 16, 16
    q, k, v = random_qkv(36, B=B, T=T, S=T, N=N, K=2, H=H)
    tau = jnp.array([0.0, 0.5, 0.9, 1.0], jnp.float32)
    _, layout = self.run(q, k, v, is_causal=True, threshold=tau, stride=4, block_size=blk, return_block_layout=True)
    counts = np.asarray(layout.counts[0])
    np.testing.assert_array_equal(counts[0], np.minimum(np.arange(8) + 1, 2))  # tau = 0: sink + diagonal only
    np.testing.assert_array_equal(counts[3], np.arange(8) + 1)  # tau = 1: everything causal
    assert np.all(counts[0] <= counts[1]) and np.all(counts[1] <= counts[2]) and np.all(counts[2] <= counts[3])

  def test_decode_step_is_dense(self):
    B, S, N, K, H = 2, 77, 4, 2, 16
    q, k, v = random_qkv(37, B=B, T=1, S=S, N=N, K=K, H=H)
    kv_lens = jnp.array([77, 40], jnp.int32)
    out = self.run(
      q,
      k,
      v,
      is_causal=True,
      threshold=0.1,
      block_size=16,
      stride=4,
      query_seq_lengths=jnp.array([1, 1], jnp.int32),
      key_value_seq_lengths=kv_lens,
    )
    want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=1e-5)

  def test_unbatched_input_and_flax_kwargs(self):
    T, N, H = 64, 2, 16
    q, k, v = random_qkv(38, B=1, T=T, S=T, N=N, K=N, H=H)
    out = self.run(
      q[0],
      k[0],
      v[0],
      is_causal=True,
      threshold=1.0,
      block_size=16,
      stride=4,
      dropout_rate=0.0,
      deterministic=True,
      dtype=jnp.float32,
      precision=None,
      module=None,
    )
    want = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    assert out.shape == (T, N, H)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=1e-5)

  def test_padded_queries_are_zero(self):
    B, T, N, H = 2, 64, 2, 16
    q, k, v = random_qkv(39, B=B, T=T, S=T, N=N, K=N, H=H)
    lens = jnp.array([64, 30], jnp.int32)
    out = np.asarray(
      self.run(
        q,
        k,
        v,
        is_causal=True,
        threshold=0.8,
        block_size=16,
        stride=4,
        query_seq_lengths=lens,
        key_value_seq_lengths=lens,
      )
    )
    assert not np.isnan(out).any() and np.all(out[1, 30:] == 0) and np.all(np.abs(out[1, :30]).sum(-1) > 0)

  def test_no_recompilation_when_threshold_or_lengths_change(self):
    B, T, N, H = 1, 64, 2, 16
    q, k, v = random_qkv(40, B=B, T=T, S=T, N=N, K=N, H=H)
    f = jax.jit(
      lambda q, k, v, tau, lens: xa.xattention(
        q,
        k,
        v,
        is_causal=True,
        threshold=tau,
        block_size=16,
        stride=4,
        query_seq_lengths=lens,
        key_value_seq_lengths=lens,
        implementation=self.implementation,
        interpret=self.interpret,
      )
    )
    a = f(q, k, v, jnp.full((N,), 0.3), jnp.array([64], jnp.int32))
    b = f(q, k, v, jnp.full((N,), 0.95), jnp.array([50], jnp.int32))
    assert f._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))


# Kernel backends: block 128, head dims 64/128, 16-bit inputs (what the Pallas kernels take); few cases, because
# the CPU interpreters are slow.
KERNEL_CASES = [  # B, T, S, N, K, H, dtype, causal, with_lengths
  (2, 200, 300, 4, 2, 64, jnp.bfloat16, True, True),
  (1, 256, 384, 2, 1, 128, jnp.float16, True, False),
  (2, 130, 260, 2, 2, 64, jnp.float16, False, True),
]


def case_ids(cases) -> list[str]:
  """Test ids of (B, T, S, N, K, H, dtype, causal, ...) cases."""
  return [f"B{c[0]}T{c[1]}S{c[2]}N{c[3]}K{c[4]}H{c[5]}{jnp.dtype(c[6]).name}{'c' if c[7] else 'nc'}" for c in cases]


KERNEL_IDS = case_ids(KERNEL_CASES)


class KernelAttentionSuite:
  """block_sparse_attention of a Pallas backend (run in its CPU interpreter) against the float64 oracle."""

  implementation = None
  interpret = True

  def attend(self, q, k, v, layout, **kw):
    return run_checked(
      xa.block_sparse_attention, q, k, v, layout, implementation=self.implementation, interpret=self.interpret, **kw
    )

  def after_run(self):
    """Backend hook: e.g. assert the interpreter recorded no race."""

  @pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
  def test_matches_oracle(self, case):
    B, T, S, N, K, H, dtype, causal, with_lengths = case
    q, k, v = random_qkv(51, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
    lens = lengths_pair(52, B=B, T=T, S=S) if with_lengths else (None, None)
    layout, mask = random_layout(53, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.5)
    out, lse = self.attend(q, k, v, layout, causal=causal, return_lse=True, **_lengths_kwargs(lens))
    self.after_run()
    want, want_lse = oracle.attention(q, k, v, mask, block_size=128, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    assert out.dtype == dtype and out.shape == q.shape
    tol = 3 * OUT_TOL[dtype]  # P is rounded to the input dtype before P @ V
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
    live = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[live], want_lse[live], atol=1e-3, rtol=1e-4)

  def test_skipped_blocks_are_never_read(self):
    B, T, S, N, H = 1, 128, 640, 2, 64
    q, k, v = random_qkv(54, B=B, T=T, S=S, N=N, K=N, H=H, dtype=jnp.bfloat16)
    mask = np.zeros((B, N, 1, 5), bool)
    mask[:, 0, 0, [0, 4]] = True  # head 0 skips blocks 1-3, head 1 skips 0-2
    mask[:, 1, 0, [3, 4]] = True
    layout = xa.BlockLayout.from_dense(jnp.asarray(mask))
    out = self.attend(q, k, v, layout)
    poison = np.zeros((B, S, N, 1), bool)
    poison[:, 128:512, 0] = True
    poison[:, :384, 1] = True
    k2, v2 = jnp.where(poison, 300.0, k), jnp.where(poison, -300.0, v)
    np.testing.assert_array_equal(np.asarray(self.attend(q, k2, v2, layout), np.float32), np.asarray(out, np.float32))


def gradient_loss(out, lse):
  """A scalar of the attention output and lse for jax.grad: weights every output element differently and uses the
  finite lse."""
  weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
  return jnp.sum(out.astype(jnp.float32) * weights) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))


def sparse_gradient_loss(q, k, v, layout, *, causal, lens, scale, implementation):
  """`gradient_loss` of the public block_sparse_attention (interpreted kernels) with these lengths."""
  out, lse = xa.block_sparse_attention(
    q,
    k,
    v,
    layout,
    causal=causal,
    scale=scale,
    query_seq_lengths=lens[0],
    key_value_seq_lengths=lens[1],
    return_lse=True,
    implementation=implementation,
    interpret=True,
  )
  return gradient_loss(out, lse)


def backward_case_inputs(case, seed):
  """q, k, v, (q_lens, kv_lens), layout and its dense mask of a backward case (B, T, S, N, K, H, dtype, causal,
  q_lens, kv_lens, empty, options): a random layout at density 0.6 with the rows (b, n, r) in `empty` selecting
  nothing."""
  B, T, S, N, K, H, dtype, causal, q_lens, kv_lens, empty, _ = case
  q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = (jnp.asarray(q_lens, jnp.int32), jnp.asarray(kv_lens, jnp.int32))
  layout, mask = random_layout(seed + 1, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.6)
  if empty:
    for b, n, r in empty:
      mask[b, n, r] = False
    allowed = xa.allowed_blocks(
      q_len=T, kv_len=S, block_size=128, causal=causal, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1]
    )
    layout = xa.BlockLayout.from_dense(jnp.asarray(mask), allowed=allowed)
  return q, k, v, lens, layout, mask


class KernelBackwardSuite:
  """A Pallas backend's backward kernels (dQ and dK/dV, in its CPU interpreter) against the XLA backward, given the
  same forward (out, lse) and random cotangents (dO, dlse). The test module provides a `backward_case` fixture:
  (B, T, S, N, K, H, dtype, causal, q_lens, kv_lens, empty rows ((b, n, r), ...), config options); subclasses set
  `grad_tol` (max-normalized error per dtype) and `run_kernels`."""

  grad_tol: dict = {}
  scale = 0.125

  def run_kernels(self, args, *, causal, scale, options):
    raise NotImplementedError

  def after_run(self):
    """Backend hook: e.g. assert the interpreter recorded no race."""

  def test_kernels_match_the_xla_backward(self, backward_case):
    from tests.conftest import assert_max_normalized_close, random_cotangents
    from xattn_jax import attention_xla, attention_xla_bwd
    from xattn_jax.geometry import Geometry

    B, T, S, N, K, H, dtype, causal, q_lens, kv_lens, empty, options = backward_case
    q, k, v, lens, layout, _ = backward_case_inputs(backward_case, seed=T + S + N + H)
    for b, n, r in empty:
      assert int(layout.counts[b, n, r]) == 0
    geometry = Geometry.from_lengths(*lens)
    kw = dict(causal=causal, scale=self.scale)
    out, lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, **kw)
    d_out, d_lse = random_cotangents(T, out, lse)
    args = (q, k, v, out, lse, d_out, d_lse, layout, geometry)
    got = self.run_kernels(args, **kw, options=options)
    self.after_run()
    want = attention_xla_bwd.block_sparse_attention_bwd(*args, **kw)
    for name, a, b, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
      assert a.dtype == x.dtype and a.shape == x.shape
      assert_max_normalized_close(a, b, self.grad_tol[dtype], name)
    dq, dk, dv = (np.asarray(x, np.float32) for x in got)
    for b in range(B):  # padding queries and keys get exactly zero
      assert np.all(dq[b, q_lens[b] :] == 0) and np.all(dk[b, kv_lens[b] :] == 0) and np.all(dv[b, kv_lens[b] :] == 0)
    for b, n, r in empty:  # a row that selected nothing: zero dq
      assert np.all(dq[b, r * 128 : (r + 1) * 128, n] == 0)


def backward_case_fixture(cases):
  """The `backward_case` fixture of a test module, over its cases (ids end in "e" where rows are forced empty)."""

  @pytest.fixture(params=cases, ids=[i + ("e" if c[10] else "") for i, c in zip(case_ids(cases), cases)])
  def backward_case(request):
    return request.param

  return backward_case


# Scoring kernels: block 128, strides 4/8/16, head dims 64/128; T off the block multiple, T < S, GQA, batches with
# different lengths, causal and not.
KERNEL_SCORE_CASES = [  # B, T, S, N, K, H, stride, dtype, causal, with_lengths
  (2, 200, 300, 4, 2, 64, 8, jnp.bfloat16, True, True),
  (1, 256, 384, 2, 1, 128, 16, jnp.float32, True, False),
  (2, 130, 260, 2, 2, 64, 4, jnp.float32, False, True),
]
KERNEL_SCORE_IDS = [
  f"B{c[0]}T{c[1]}S{c[2]}N{c[3]}K{c[4]}H{c[5]}s{c[6]}{jnp.dtype(c[7]).name}{'c' if c[8] else 'nc'}"
  for c in KERNEL_SCORE_CASES
]


class KernelScoresSuite:
  """antidiagonal_scores of a Pallas backend (run in its CPU interpreter) against the float64 oracle."""

  implementation = None
  interpret = True
  atol = {jnp.float32: 2e-5, jnp.bfloat16: 1e-4}  # bf16 inputs: exact products, float32 sums in another order
  input_dtypes = (jnp.float32, jnp.bfloat16)  # cases in another dtype run in the first of these

  def dtype(self, dtype):
    return dtype if dtype in self.input_dtypes else self.input_dtypes[0]

  def scores(self, q, k, **kw):
    return run_checked(xa.antidiagonal_scores, q, k, implementation=self.implementation, interpret=self.interpret, **kw)

  def after_run(self):
    """Backend hook: e.g. assert the interpreter recorded no race."""

  @pytest.mark.parametrize("case", KERNEL_SCORE_CASES, ids=KERNEL_SCORE_IDS)
  def test_matches_oracle(self, case):
    B, T, S, N, K, H, stride, dtype, causal, with_lengths = case
    dtype = self.dtype(dtype)
    q, k, _ = random_qkv(71, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
    lens = lengths_pair(72, B=B, T=T, S=S) if with_lengths else (None, None)
    got = self.scores(q, k, stride=stride, block_size=128, causal=causal, **_lengths_kwargs(lens))
    self.after_run()
    want = oracle.scores(q, k, stride=stride, block_size=128, causal=causal, q_lens=lens[0], kv_lens=lens[1])
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=self.atol[dtype], rtol=1e-5)

  def test_alternating_estimator_matches_oracle(self):
    """SPEC §1.7's alternating estimator (the first case: bf16 where taken, stride 8, causal, two lengths)."""
    B, T, S, N, K, H, stride, dtype, causal, _ = KERNEL_SCORE_CASES[0]
    dtype = self.dtype(dtype)
    q, k, _ = random_qkv(75, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
    lens = lengths_pair(76, B=B, T=T, S=S)
    got = self.scores(
      q, k, stride=stride, block_size=128, causal=causal, estimator="alternating", **_lengths_kwargs(lens)
    )
    self.after_run()
    want = oracle.scores(
      q, k, stride=stride, block_size=128, causal=causal, q_lens=lens[0], kv_lens=lens[1], estimator="alternating"
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=self.atol[dtype], rtol=1e-5)

  def test_row_sums_and_causality(self):
    T = S = 512
    q, k, _ = random_qkv(73, B=1, T=T, S=S, N=2, K=1, H=64, dtype=jnp.bfloat16)
    got = np.asarray(self.scores(q, k, stride=8, block_size=128, causal=True))
    self.after_run()
    np.testing.assert_allclose(got.sum(-1), np.full(got.shape[:3], 128 // 8), rtol=1e-5)
    upper = np.triu(np.ones(got.shape[2:], bool), 1)
    assert np.all(got[..., upper] == 0), "causal scores leak above the diagonal"
    assert np.all(got[..., ~upper] > 0)

  def test_padding_rows_and_empty_sequences_are_zero(self):
    B, T, S = 3, 256, 384
    q, k, _ = random_qkv(74, B=B, T=T, S=S, N=2, K=2, H=64, dtype=self.dtype(jnp.float32))
    q_lens = jnp.array([0, 150, 256], jnp.int32)
    kv_lens = jnp.array([0, 200, 384], jnp.int32)
    got = np.asarray(
      self.scores(q, k, stride=4, block_size=128, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens)
    )
    self.after_run()
    assert np.all(np.isfinite(got))
    assert np.all(got[0] == 0)
    assert np.all(got[1, :, :, 2:] == 0)  # key block 2 starts at token 256 > 200: padding
    np.testing.assert_allclose(got[1, :, 0].sum(-1), 32, rtol=1e-5)
    np.testing.assert_allclose(got[1, :, 1].sum(-1), 6, rtol=1e-5)  # 22 real tokens = 6 strided rows of 4
    want = oracle.scores(q, k, stride=4, block_size=128, causal=True, q_lens=q_lens, kv_lens=kv_lens)
    np.testing.assert_allclose(got, want, atol=self.atol[self.dtype(jnp.float32)], rtol=1e-5)


DENSE_CASES = [  # B, T, S, N, K, H, dtype, causal, with_lengths
  (2, 200, 300, 4, 2, 64, jnp.float32, True, True),  # a chunk after earlier ones (T < S)
  (2, 1, 260, 4, 2, 32, jnp.float32, True, True),  # decode steps
  (1, 1, 300, 4, 1, 64, jnp.bfloat16, True, False),  # a decode step, bf16
  (18, 1, 130, 2, 1, 32, jnp.float32, False, True),  # decode steps of a batch too large to unroll
  (2, 130, 130, 2, 1, 64, jnp.bfloat16, True, True),  # self-attention, one lengths array
  (1, 150, 400, 2, 2, 32, jnp.float32, False, True),
]
DENSE_IDS = case_ids(DENSE_CASES)


class DenseAttentionSuite:
  """`dense_attention` against the float64 oracle with every block allowed; subclasses set the implementation."""

  implementation = None
  interpret = False

  def after_run(self):
    pass

  def check(self, case, seed=31):
    B, T, S, N, K, H, dtype, causal, with_lengths = case
    q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
    if with_lengths:
      kv_lens = jnp.asarray(np.r_[S, np.random.default_rng(seed).integers(1, S + 1, B - 1)], jnp.int32)
      q_cap = jnp.asarray(np.resize(np.r_[T, T // 2 + 1, 1], B), jnp.int32)
      q_lens = kv_lens if T == S else jnp.minimum(kv_lens, q_cap)
    else:
      q_lens, kv_lens = jnp.full((B,), T, jnp.int32), jnp.full((B,), S, jnp.int32)
    same = T == S and with_lengths  # one array for both: cuDNN's route where it runs

    def attend(q, k, v, q_lens, kv_lens):
      return xa.dense_attention(
        q,
        k,
        v,
        is_causal=causal,
        query_seq_lengths=q_lens,
        key_value_seq_lengths=q_lens if same else kv_lens,
        implementation=self.implementation,
        interpret=self.interpret,
      )

    out = run_checked(attend, q, k, v, q_lens=q_lens, kv_lens=kv_lens)
    self.after_run()
    mask = np.ones((B, N, -(-T // 128), -(-S // 128)), bool)
    want, _ = oracle.attention(
      q, k, v, mask, block_size=128, causal=causal, q_lens=np.asarray(q_lens), kv_lens=np.asarray(kv_lens)
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    for b in range(B):  # padding queries are zeros
      assert not np.any(np.asarray(out[b, int(q_lens[b]) :], np.float32))

  @pytest.mark.parametrize("case", DENSE_CASES, ids=DENSE_IDS)
  def test_matches_oracle(self, case):
    self.check(case)
