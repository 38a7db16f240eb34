"""Where queries and keys sit, per batch element: the positions behind every mask in SPEC.

Query token t of a call sits at position p_b(t) = q_positions[b] + t; key token j sits at position j. For a public
call q_positions = k_b - q_b ("bottom-right" alignment). When an op processes the queries in chunks, a chunk that
starts at query index `start` is itself a call with q_lengths = clip(q_b - start, 0, size) and
q_positions = k_b - q_b + start, so every backend sees one self-contained geometry per call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Geometry(NamedTuple):
  q_lengths: jax.Array  # int32 [B]: real queries in this call's q (the rest is padding)
  kv_lengths: jax.Array  # int32 [B]: real keys (the rest is padding)
  q_positions: jax.Array  # int32 [B]: position of query token 0

  @classmethod
  def from_lengths(cls, q_lengths: jax.Array, kv_lengths: jax.Array) -> Geometry:
    return cls(q_lengths, kv_lengths, kv_lengths - q_lengths)

  def chunk(self, start, size: int) -> Geometry:
    """The geometry of queries [start, start + size) as a call of its own."""
    return Geometry(
      jnp.clip(self.q_lengths - start, 0, size).astype(jnp.int32),
      self.kv_lengths,
      (self.q_positions + start).astype(jnp.int32),
    )


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def chunk_blocks(num_blocks: int, max_blocks: int) -> int:
  """Query blocks per chunk for a loop over `num_blocks` blocks with at most `max_blocks` per chunk: a divisor of
  num_blocks when one gives at most twice the fewest chunks (no ragged tail: each kernel appears once in the
  program, not once in the loop and again for the tail, which halves its compile time), else equal chunks as far as
  they go (a small tail)."""
  fewest = cdiv(num_blocks, max(1, max_blocks))
  for n in range(fewest, min(2 * fewest, num_blocks) + 1):
    if num_blocks % n == 0:
      return num_blocks // n
  return cdiv(num_blocks, fewest)


def zero_straddling_tokens(x: jax.Array, lengths: jax.Array, stride: int) -> jax.Array:
  """x [B, L, h, H] with the padding tokens (position >= length) of the stride-aligned group that holds position
  `length` (the last group when length = L) set to zero: at most `stride` tokens per sequence, among them every
  padding token that shares a group with real ones, the only padding the estimator's strided products can mix with
  real tokens (SPEC §1.1; whole padding groups are dropped by its epilogue and masks). One dynamic_update_slice of
  a `stride`-token window per sequence (a loop over the batch): in place where x has no other use, instead of a pass
  over all of x."""
  L = x.shape[1]
  if L < stride:
    real = jnp.arange(L, dtype=jnp.int32)[None, :] < lengths[:, None]
    return jnp.where(real[:, :, None, None], x, jnp.zeros((), x.dtype))
  lengths = lengths.astype(jnp.int32)

  def one(b, x):  # sequence b's window, written over x
    start = jnp.clip(lengths[b] // stride * stride, 0, L - stride)
    window = lax.dynamic_slice(x, (b, start, 0, 0), (1, stride) + x.shape[2:])
    real = start + jnp.arange(stride, dtype=jnp.int32) < lengths[b]
    return lax.dynamic_update_slice(
      x, jnp.where(real[None, :, None, None], window, jnp.zeros((), x.dtype)), (b, start, 0, 0)
    )

  return lax.fori_loop(0, x.shape[0], one, x)


def block_bounds(geometry: Geometry, *, num_q_blocks: int, block_size: int, causal: bool):
  """Per (b, query block): the last allowed key block and the diagonal key block (SPEC §2.1-2.2).

  The allowed key blocks of a query block always form a prefix [0, last_allowed]: causal attention allows the blocks
  up to the one holding p(last real query of the block); non-causal allows every block with a real key. A query block
  with no real query (padding) allows nothing: last_allowed = -1.

  Returns:
    last_allowed: int32 [B, num_q_blocks], -1 where nothing is allowed.
    diagonal: int32 [B, num_q_blocks], the key block holding p(last real query of the block) (meaningless where
      last_allowed = -1).
  """
  q_len = geometry.q_lengths[:, None]
  kv_len = geometry.kv_lengths[:, None]
  first = jnp.arange(num_q_blocks, dtype=jnp.int32)[None, :] * block_size
  last_real = jnp.minimum(first + block_size, q_len) - 1
  has_query = first < q_len
  p_last = jnp.maximum(geometry.q_positions[:, None] + last_real, 0)
  diagonal = p_last // block_size
  if causal:
    last_allowed = jnp.where(has_query, diagonal, -1)
  else:
    last_allowed = jnp.where(has_query & (kv_len > 0), (kv_len - 1) // block_size, -1)
  return last_allowed.astype(jnp.int32), jnp.minimum(diagonal, jnp.maximum(last_allowed, 0)).astype(jnp.int32)
