"""benchmarks/peers_torch.py on the CPU: the BlockMask it builds from a block mask, and compiled FlexAttention on it
against the SPEC §4 oracle that our kernels are tested against (so flex and ours compute the same thing).

Runs only where torch imports (not in the project's venv; torch is no dependency). This module imports neither JAX
nor the conftest's helpers, so that it also runs in a torch-only Python:

    python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install <torch cpu wheel> numpy pytest ml_dtypes
    /tmp/torchvenv/bin/python -m pytest --noconftest -p no:cacheprovider tests/test_peers_torch.py
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import oracle

torch = pytest.importorskip("torch")
peers = pytest.importorskip("benchmarks.peers_torch")

BLOCK = 128
TOL = 2e-5  # float32 inputs; flex (inductor's CPU template) and the float64 oracle differ by rounding only


def _inputs(*, seed=0, B=1, T=512, N=4, K=2, H=64, p=0.5):
  """q [B, T, N, H], k/v [B, T, K, H] float32 and a random block mask [B, N, nb, nb] with the diagonal and some
  blocks above it (which causal attention must drop)."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, T, n, H)).astype(np.float32) for n in (N, K, K))
  nb = T // BLOCK
  mask = (rng.random((B, N, nb, nb)) < p) | np.eye(nb, dtype=bool)
  return q, k, v, mask


def _flex(q, k, v, mask, **kw):
  tq, tk, tv = peers.qkv_to_torch(q, k, v, device="cpu")
  return peers.flex_attention(tq, tk, tv, peers.flex_block_mask(mask, device="cpu", **kw))


def test_block_lists_of_a_literal_mask():
  """Row r: the selected blocks below the diagonal are full, the diagonal partial, those above it dropped."""
  mask = np.array(
    [
      [1, 0, 0, 1],  # row 0: diagonal 0 partial; 3 above the diagonal, dropped
      [1, 1, 0, 0],  # row 1: 0 full, 1 partial
      [0, 1, 0, 0],  # row 2: 1 full, no diagonal: nothing partial
      [1, 0, 1, 1],  # row 3: 0 and 2 full, 3 partial
    ],
    bool,
  )[None, None]
  bm = peers.flex_block_mask(mask, device="cpu")
  assert bm.BLOCK_SIZE == (BLOCK, BLOCK) and bm.seq_lengths == (4 * BLOCK, 4 * BLOCK)
  assert bm.kv_num_blocks.tolist() == [[[1, 1, 0, 1]]]
  assert bm.full_kv_num_blocks.tolist() == [[[0, 1, 1, 2]]]
  partial = [bm.kv_indices[0, 0, r, :n].tolist() for r, n in enumerate(bm.kv_num_blocks[0, 0].tolist())]
  full = [bm.full_kv_indices[0, 0, r, :n].tolist() for r, n in enumerate(bm.full_kv_num_blocks[0, 0].tolist())]
  assert partial == [[0], [1], [], [3]] and full == [[], [0], [1], [0, 2]]
  assert bm.kv_indices.dtype == bm.full_kv_indices.dtype == torch.int32
  want = mask & np.tril(np.ones((4, 4), bool))
  np.testing.assert_array_equal(bm.to_dense().numpy().astype(bool), want)
  non_causal = peers.flex_block_mask(mask, device="cpu", causal=False)
  assert non_causal.kv_num_blocks.sum() == 0 and non_causal.full_kv_num_blocks.tolist() == [[[2, 2, 1, 3]]]


def test_same_blocks_as_create_block_mask_with_a_layout_lookup():
  """What a FlexAttention user writes by hand (create_block_mask over a mask_mod reading the block table AND causal)
  gives the same full and partial blocks."""
  from torch.nn.attention.flex_attention import create_block_mask

  _, _, _, mask = _inputs(seed=3, N=3, T=1024)
  table = torch.from_numpy(mask)
  B, N, nb, _ = mask.shape
  by_hand = create_block_mask(
    lambda b, h, q, kv: table[b, h, q // BLOCK, kv // BLOCK] & (q >= kv), B, N, nb * BLOCK, nb * BLOCK, device="cpu"
  )
  ours = peers.flex_block_mask(mask, device="cpu")
  for name in ("kv_num_blocks", "full_kv_num_blocks"):
    torch.testing.assert_close(getattr(ours, name), getattr(by_hand, name), msg=name)
  for name, count in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
    valid = torch.arange(nb) < getattr(ours, count)[..., None]
    assert torch.equal(getattr(ours, name)[valid], getattr(by_hand, name)[valid]), name


@pytest.mark.parametrize("mask_mod", ["causal", "layout"])
def test_compiled_flex_matches_the_oracle(mask_mod):
  """GQA (4 query heads on 2 kv heads), random blocks: compiled FlexAttention == SPEC §4 from the same block mask."""
  q, k, v, mask = _inputs(seed=1)
  want, _ = oracle.attention(q, k, v, mask, block_size=BLOCK, causal=True)
  got = _flex(q, k, v, mask, mask_mod=mask_mod)
  assert got.shape == (1, 4, 512, 64)  # torch's [B, N, T, H]
  assert peers.rel_err(got, want) < TOL


def test_flex_matches_the_oracle_without_causal_and_in_bfloat16():
  """Every selected block full; inputs handed over as ml_dtypes bfloat16 NumPy arrays (what np.asarray of a bf16 JAX
  array gives), read bit for bit."""
  ml_dtypes = pytest.importorskip("ml_dtypes")
  q, k, v, mask = _inputs(seed=2, p=0.4)
  q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
  tq = peers.to_torch(q, "cpu")
  assert tq.dtype == torch.bfloat16 and np.array_equal(tq.float().numpy(), q.astype(np.float32))
  want, _ = oracle.attention(q, k, v, mask, block_size=BLOCK, causal=False)
  tq, tk, tv = peers.qkv_to_torch(q, k, v, device="cpu")
  got = peers.flex_attention(tq, tk, tv, peers.flex_block_mask(mask, device="cpu", causal=False))
  assert got.dtype == torch.bfloat16 and peers.rel_err(got, want) < 1e-2


def test_the_causal_mask_mod_needs_the_compiled_kernel():
  """Why every call is compiled: flex_attention's eager path applies mask_mod to every score and ignores the block
  lists, so with the cheap mask_mod="causal" it computes dense causal attention; with mask_mod="layout" it is exact.
  (The compiled kernel reads the block lists: both are exact there, test above.)"""
  from torch.nn.attention import flex_attention as fa

  q, k, v, mask = _inputs(seed=4)
  tq, tk, tv = peers.qkv_to_torch(q, k, v, device="cpu")
  want, _ = oracle.attention(q, k, v, mask, block_size=BLOCK, causal=True)
  dense_causal, _ = oracle.attention(q, k, v, np.ones_like(mask), block_size=BLOCK, causal=True)
  with pytest.warns(UserWarning, match="without torch.compile"):
    eager = lambda mod: fa.flex_attention(
      tq, tk, tv, block_mask=peers.flex_block_mask(mask, device="cpu", mask_mod=mod), enable_gqa=True
    )
    exact, causal_only = eager("layout"), eager("causal")
  assert peers.rel_err(exact, want) < TOL
  assert peers.rel_err(causal_only, dense_causal) < TOL and peers.rel_err(causal_only, want) > 0.1


def test_sdpa_causal_matches_the_oracle():
  q, k, v, mask = _inputs(seed=5, T=256)
  want, _ = oracle.attention(q, k, v, np.ones_like(mask), block_size=BLOCK, causal=True)
  sdpa, gqa = peers.sdpa_causal(*peers.qkv_to_torch(q, k, v, device="cpu"), backend="math")
  assert gqa in ("enable_gqa", "repeated kv heads") and peers.rel_err(sdpa(), want) < TOL
  with pytest.raises(ValueError, match="backend='cuDNN'"):
    peers.sdpa_causal(*peers.qkv_to_torch(q, k, v, device="cpu"), backend="cuDNN")


def test_timed_reports_like_the_jax_timer():
  calls = []
  t = peers.timed(lambda: calls.append(1), device="cpu", repeats=4, warmup=2, pipeline=3)
  assert len(calls) == 2 + 4 * 3
  assert set(t) == {"ms", "min_ms", "spread_ms", "first_call_s"} and t["min_ms"] <= t["ms"]


@pytest.mark.parametrize(
  "mask, kw, error, match",
  [
    (np.ones((1, 1, 2, 2), np.int32), {}, ValueError, "must be bool"),
    (np.ones((2, 2), bool), {}, ValueError, "must be bool"),
    (np.ones((1, 1, 2, 2), bool), dict(mask_mod="full"), ValueError, "mask_mod='full'"),
    (np.ones((1, 1, 2, 3), bool), {}, NotImplementedError, "nQb == nKb"),
  ],
)
def test_flex_block_mask_rejects(mask, kw, error, match):
  with pytest.raises(error, match=match):
    peers.flex_block_mask(mask, device="cpu", **kw)
