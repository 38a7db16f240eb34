"""BlockLayout (SPEC §3): dense <-> compressed round trips, padding, density, pytree behaviour, allowed set."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import xattn_jax as xa
from tests import oracle
from tests.conftest import run_checked


def test_literal_compression():
  mask = jnp.asarray([[[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]]], bool)
  layout = xa.BlockLayout.from_dense(mask, block_size=32)
  np.testing.assert_array_equal(layout.counts, [[[1, 2, 2, 0]]])
  np.testing.assert_array_equal(layout.indices, [[[[0, 0, 0, 0], [0, 1, 1, 1], [2, 3, 3, 3], [0, 0, 0, 0]]]])
  assert layout.block_size == 32 and layout.shape == (1, 1, 4, 4)
  np.testing.assert_allclose(layout.density(), 5 / 16)


def test_to_dense_memory_is_the_mask_size():
  """At 128K tokens and 32 heads (1024 x 1024 blocks per head) the mask is 32 MiB: its temporaries stay within
  16x that, where a one-hot over the key blocks took 32 GiB (it ran out of memory on an H100)."""
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  layout = xa.BlockLayout(counts=i32(1, 32, 1024), indices=i32(1, 32, 1024, 1024), num_allowed=i32(1, 32, 1024))
  memory = jax.jit(lambda l: l.to_dense()).lower(layout).compile().memory_analysis()
  assert memory.temp_size_in_bytes <= 16 * 32 * 2**20, memory.temp_size_in_bytes


@hypothesis.given(
  shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 9)),
  seed=st.integers(0, 2**16),
)
def test_round_trip(shape, seed):
  mask = np.random.default_rng(seed).random(shape) < 0.4
  layout = run_checked(xa.BlockLayout.from_dense, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(layout.to_dense()), mask)
  counts, idx = np.asarray(layout.counts), np.asarray(layout.indices)
  for pos in np.ndindex(shape[:3]):
    c = counts[pos]
    np.testing.assert_array_equal(idx[pos][:c], np.flatnonzero(mask[pos]))
    assert np.all(idx[pos][c:] == (idx[pos][c - 1] if c else 0))


def test_density_uses_the_allowed_set():
  allowed = xa.allowed_blocks(q_len=64, kv_len=64, block_size=16)  # causal: 1 + 2 + 3 + 4 = 10 blocks
  mask = jnp.broadcast_to(jnp.eye(4, dtype=bool), (1, 2, 4, 4))
  layout = xa.BlockLayout.from_dense(mask, block_size=16, allowed=allowed)
  np.testing.assert_allclose(layout.density(), 4 / 10)
  np.testing.assert_allclose(layout.density(axis=(0, 2)), [0.4, 0.4])
  np.testing.assert_array_equal(layout.num_allowed[0, 0], [1, 2, 3, 4])


def test_layout_is_a_pytree_with_static_block_size():
  layout = xa.BlockLayout.from_dense(jnp.ones((1, 1, 2, 2), bool), block_size=64)
  leaves, treedef = jax.tree_util.tree_flatten(layout)
  assert len(leaves) == 3
  doubled = jax.jit(lambda l: jax.tree_util.tree_map(lambda x: x * 2, l))(layout)
  assert doubled.block_size == 64 and int(doubled.counts[0, 0, 0]) == 4


def test_allowed_blocks_match_the_oracle_geometry():
  q_lens, kv_lens = np.array([40, 0, 17]), np.array([100, 0, 64])
  for causal in (True, False):
    got = np.asarray(
      xa.allowed_blocks(
        q_len=40,
        kv_len=100,
        block_size=16,
        causal=causal,
        query_seq_lengths=jnp.asarray(q_lens),
        key_value_seq_lengths=jnp.asarray(kv_lens),
      )
    )
    assert got.shape == (3, 1, 3, 7)
    for b in range(3):
      for r in range(3):
        last, _ = oracle.block_geometry(r, block_size=16, q_len=q_lens[b], kv_len=kv_lens[b], causal=causal)
        np.testing.assert_array_equal(got[b, 0, r], np.arange(7) <= last)
