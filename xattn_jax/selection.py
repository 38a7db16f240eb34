"""Block selection from antidiagonal block scores (SPEC §2), shared by every backend.

Per (b, n, query block r) with allowed prefix [0, last_allowed] and forced set F (diagonal, sink):

    need = tau * sum(a[allowed])
    visit order: F first, then the other allowed blocks by descending score (ties: lower index first)
    a non-forced block is kept iff the mass kept before it is < need

Example, a = [5, 1, 3, 0, 1], causal with the diagonal at 4 (so F = {0, 4}), tau = 0.8: total 10, need 8.
    visit 0 (F, kept, mass 5), 4 (F, kept, mass 6), 2 (6 < 8: kept, mass 9), 1 (9 >= 8: dropped), 3 (dropped)
    -> counts 3, indices [0, 2, 4, 4, 4].

The visit order is one stable (key, id) sort; the kept blocks are a prefix of it, so an exclusive cumulative sum
decides them all at once, and a second sort of the kept ids gives the ascending index table. With keep_top_neighbors
(SPEC §2.7) the neighbours of the highest-scoring allowed block join them when tau > 0 (at most 2 per row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from xattn_jax import _checks
from xattn_jax.geometry import Geometry, block_bounds, cdiv
from xattn_jax.layout import BlockLayout, compress_ids


def select_layout(
  scores: jax.Array,  # f32 [B, N, nQb, nKb]
  geometry: Geometry,
  threshold: jax.Array,  # f32 [N]
  *,
  block_size: int,
  causal: bool,
  keep_sink: bool,
  keep_diagonal: bool,
  keep_top_neighbors: bool = False,
) -> BlockLayout:
  """SPEC §2 on validated inputs; jittable, no host round trip."""
  B, N, nqb, nkb = scores.shape
  last_allowed, diagonal = block_bounds(geometry, num_q_blocks=nqb, block_size=block_size, causal=causal)
  last_allowed = last_allowed[:, None, :, None]  # [B, 1, nQb, 1]
  diagonal = diagonal[:, None, :, None]
  block_ids = jnp.arange(nkb, dtype=jnp.int32)
  allowed = block_ids <= last_allowed  # [B, 1, nQb, nKb]
  forced = jnp.zeros_like(allowed)
  if keep_sink:
    forced |= block_ids == 0
  if causal or keep_diagonal:
    forced |= block_ids == diagonal
  forced &= allowed
  allowed = jnp.broadcast_to(allowed, scores.shape)
  forced = jnp.broadcast_to(forced, scores.shape)

  mass = jnp.where(allowed, scores.astype(jnp.float32), 0.0)
  need = threshold[None, :, None] * jnp.sum(mass, axis=-1)  # [B, N, nQb]
  # One float key: forced blocks first (-inf), then the other allowed blocks by descending score, then the rest
  # (+inf). The sort is stable and the ids start ascending, so equal scores keep the lower block id first. A single
  # (key, id) sort is what XLA can hand to a radix sort on GPUs; 0 - x maps both signed zeros to +0.0.
  key = jnp.where(forced, -jnp.inf, jnp.where(allowed, 0.0 - mass, jnp.inf))
  ids = jnp.broadcast_to(block_ids, scores.shape)
  key_sorted, order = lax.sort((key, ids), dimension=-1, is_stable=True, num_keys=1)
  forced_sorted = jnp.take_along_axis(forced, order, axis=-1)
  allowed_sorted = jnp.take_along_axis(allowed, order, axis=-1)
  group_sorted = jnp.where(forced_sorted, 0, jnp.where(allowed_sorted, 1, 2))
  mass_sorted = jnp.take_along_axis(mass, order, axis=-1)
  mass_before = jnp.cumsum(mass_sorted, axis=-1) - mass_sorted
  keep = (group_sorted == 0) | ((group_sorted == 1) & (mass_before < need[..., None]))
  # Without forced blocks a row whose mass is 0 (or tau = 0) would keep nothing and attend to nothing; keep its
  # first visited allowed block instead (SPEC §3 wants counts >= 1 wherever something is allowed).
  no_forced = ~jnp.any(forced, axis=-1, keepdims=True)
  keep = keep.at[..., 0].set(keep[..., 0] | (no_forced[..., 0] & (group_sorted[..., 0] == 1)))
  dense = threshold[None, :, None, None] >= 1.0  # tau >= 1: every allowed block, whatever the rounding
  keep = jnp.where(dense, group_sorted <= 1, keep)
  counts = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  ids = jnp.where(keep, order, nkb)
  if keep_top_neighbors:
    ids, counts = _add_top_neighbors(ids, counts, key, key_sorted, order, mass, allowed, threshold)
  counts, indices = compress_ids(ids, counts)
  num_allowed = jnp.broadcast_to(jnp.maximum(last_allowed[..., 0] + 1, 0), counts.shape).astype(jnp.int32)
  return BlockLayout(counts=counts, indices=indices, num_allowed=num_allowed, block_size=block_size)


def _add_top_neighbors(ids, counts, key, key_sorted, order, mass, allowed, threshold):
  """SPEC §2.7: for tau > 0, the allowed neighbours of the highest-scoring allowed block c* (forced or not) are kept
  too. The kept blocks are a prefix of the visit order, so a block is already kept iff its (key, id) is at most the
  last kept one's; new ones take the padding slots right after the kept prefix."""
  nkb = ids.shape[-1]
  at = lambda x, pos: jnp.take_along_axis(x, pos[..., None], axis=-1)[..., 0]
  top = jnp.argmax(jnp.where(allowed, mass, -jnp.inf), axis=-1).astype(jnp.int32)  # first of equal maxima
  active = jnp.any(allowed, axis=-1) & (threshold[None, :, None] > 0)
  last = jnp.maximum(counts - 1, 0)
  last_key = at(key_sorted, last)
  last_id = at(order, last)
  for offset in (-1, 1):
    h = jnp.clip(top + offset, 0, nkb - 1)
    h_key = at(key, h)
    kept = (h_key < last_key) | ((h_key == last_key) & (h <= last_id))
    new = active & (h == top + offset) & at(allowed, h) & ~kept
    slot = jnp.arange(nkb, dtype=jnp.int32) == counts[..., None]
    ids = jnp.where(slot & new[..., None], h[..., None], ids)
    counts = counts + new.astype(jnp.int32)
  return ids, counts


def select_blocks(
  scores,
  *,
  q_len: int,
  kv_len: int,
  threshold=0.9,
  causal: bool = True,
  block_size: int = 128,
  keep_sink: bool = True,
  keep_diagonal: bool = True,
  keep_top_neighbors: bool = False,
  key_value_seq_lengths=None,
  query_seq_lengths=None,
) -> BlockLayout:
  """Selects, per query block, the fewest highest-scoring key blocks that hold `threshold` of the mass (SPEC §2).

  Args:
    scores: float [B, N, ceil(q_len/block_size), ceil(kv_len/block_size)], e.g. from `antidiagonal_scores`.
    q_len: T, the query length the scores were computed for.
    kv_len: S, the key length (S >= T).
    threshold: tau, a float or a float array [N] (per query head), in [0, inf). tau >= 1 keeps every allowed block.
    causal: causal attention (also forces the diagonal block).
    block_size: tokens per block.
    keep_sink: always keep key block 0.
    keep_diagonal: always keep the diagonal block (non-causal; causal always keeps it).
    keep_top_neighbors: for tau > 0 also keep the allowed neighbours of the highest-scoring block (SPEC §2.7).
    key_value_seq_lengths: optional int [B], real keys per batch element.
    query_seq_lengths: optional int [B], real queries per batch element (query t sits at k_b - q_b + t).

  Returns:
    BlockLayout with shape (B, N, nQb, nKb).

  Raises:
    ValueError: on a wrong shape, dtype or value (naming the argument).
  """
  _checks.check_rank(scores, 4, "scores", "[B, N, nQb, nKb]")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(f"scores.dtype={scores.dtype} must be a floating dtype")
  q_len = _checks.check_static_int(q_len, "q_len")
  kv_len = _checks.check_static_int(kv_len, "kv_len")
  block_size = _checks.check_static_int(block_size, "block_size")
  B, N, nqb, nkb = scores.shape
  if (nqb, nkb) != (cdiv(q_len, block_size), cdiv(kv_len, block_size)):
    raise ValueError(
      f"scores.shape[2:]={(nqb, nkb)} must be (ceil(q_len/block_size), ceil(kv_len/block_size))="
      f"{(cdiv(q_len, block_size), cdiv(kv_len, block_size))} for {q_len=}, {kv_len=}, {block_size=}"
    )
  dims = _checks.Dims(B=B, T=q_len, S=kv_len, N=N, K=1, H=1)
  if kv_len < q_len:
    raise ValueError(f"{kv_len=} must be >= {q_len=}")
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  tau = _checks.threshold_array(threshold, N)
  _checks.enforce(jnp.all(jnp.isfinite(scores)), "scores must be finite")
  return _select_jit(
    scores,
    Geometry.from_lengths(q_lengths, kv_lengths),
    tau,
    block_size=block_size,
    causal=bool(causal),
    keep_sink=bool(keep_sink),
    keep_diagonal=bool(keep_diagonal),
    keep_top_neighbors=bool(keep_top_neighbors),
  )


_select_jit = jax.jit(
  select_layout, static_argnames=("block_size", "causal", "keep_sink", "keep_diagonal", "keep_top_neighbors")
)


def dense_layout(geometry: Geometry, *, num_heads: int, q_len: int, kv_len: int, block_size: int, causal: bool):
  """Every allowed block of every row: the layout of dense attention (what tau >= 1 selects)."""
  nqb, nkb = cdiv(q_len, block_size), cdiv(kv_len, block_size)
  last_allowed, _ = block_bounds(geometry, num_q_blocks=nqb, block_size=block_size, causal=causal)
  last_allowed = jnp.broadcast_to(last_allowed[:, None], (geometry.q_lengths.shape[0], num_heads, nqb))
  counts = last_allowed + 1
  indices = jnp.minimum(jnp.arange(nkb, dtype=jnp.int32), jnp.maximum(last_allowed, 0)[..., None])
  return BlockLayout(counts=counts, indices=indices, num_allowed=counts, block_size=block_size)
