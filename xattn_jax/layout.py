"""The block layout handed to every attention backend (SPEC §3).

For each (batch b, query head n, query block r) the layout lists the selected key blocks in ascending order:

    dense view (nKb = 6)         counts   indices (padding repeats the last valid index)
    r=0  [x . . . . .]           1        [0 0 0 0 0 0]
    r=1  [x x . . . .]           2        [0 1 1 1 1 1]
    r=2  [x . x . . .]           2        [0 2 2 2 2 2]
    r=3  [x . . x . .]  (r=3 is  2        [0 3 3 3 3 3]
         padding only:  [. . . . . .]  0  [0 0 0 0 0 0])

Repeating the last index means a pipeline that runs past `count` re-addresses the block it already holds instead of
copying a new one. `num_allowed` is the size of each row's allowed set (a prefix of the key blocks, see
`geometry.block_bounds`) so that `density()` is selected / allowed as SPEC defines it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xattn_jax import _checks
from xattn_jax.geometry import Geometry, block_bounds, cdiv


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Selected key blocks per (batch, query head, query block).

  Attributes:
    counts: int32 [B, N, nQb], number of selected key blocks (0 only where nothing is allowed).
    indices: int32 [B, N, nQb, nKb], selected key block indices, ascending; entries at or past `counts` repeat the
      last valid index (0 for an empty row).
    num_allowed: int32 [B, N, nQb], size of the allowed set of each row (denominator of `density`).
    block_size: tokens per block (static metadata, not a leaf).
  """

  counts: jax.Array
  indices: jax.Array
  num_allowed: jax.Array
  block_size: int = dataclasses.field(default=128, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(B, N, nQb, nKb)."""
    return tuple(self.indices.shape)

  @classmethod
  def from_dense(cls, mask, *, block_size: int = 128, allowed=None) -> BlockLayout:
    """Builds a layout from a dense bool mask [B, N, nQb, nKb] (jittable).

    Args:
      mask: bool [B, N, nQb, nKb], True where a key block is selected.
      block_size: tokens per block.
      allowed: optional bool mask broadcastable to `mask` (e.g. `allowed_blocks(...)`); blocks outside it are
        dropped, and its row sums become `num_allowed`. Without it every block counts as allowed.
    """
    _checks.check_rank(mask, 4, "mask", "[B, N, nQb, nKb]")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask.dtype={mask.dtype} must be bool")
    block_size = _checks.check_static_int(block_size, "block_size")
    if allowed is None:
      num_allowed = jnp.full(mask.shape[:3], mask.shape[3], jnp.int32)
    else:
      allowed = jnp.broadcast_to(jnp.asarray(allowed, jnp.bool_), mask.shape)
      mask = mask & allowed
      num_allowed = jnp.sum(allowed, axis=-1, dtype=jnp.int32)
    counts, indices = _compress(mask)
    return cls(counts=counts, indices=indices, num_allowed=num_allowed, block_size=block_size)

  def to_dense(self) -> jax.Array:
    """bool [B, N, nQb, nKb], True at the selected blocks."""
    shape = self.indices.shape
    rows, nkb = int(np.prod(shape[:-1])), shape[-1]
    valid = jnp.arange(nkb, dtype=jnp.int32) < self.counts[..., None]
    # A scatter: memory O(B N nQb nKb) (its index pairs are the largest part, 8 bytes per entry), where a one-hot
    # over the key blocks would be O(nKb^2) per row. Padded entries repeat the last valid index with valid False.
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]
    mask = (
      jnp.zeros((rows, nkb), jnp.int8)
      .at[row, self.indices.reshape(rows, nkb)]
      .max(valid.reshape(rows, nkb).astype(jnp.int8))
    )
    return mask.reshape(shape) > 0

  def density(self, axis=None) -> jax.Array:
    """Selected / allowed blocks (float32), over everything or keeping the axes not in `axis` reduced."""
    return self.block_counts().density(axis)

  def block_counts(self) -> BlockCounts:
    """The per-row counts alone (what `density` needs)."""
    return BlockCounts(counts=self.counts, num_allowed=self.num_allowed, block_size=self.block_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockCounts:
  """A BlockLayout's per-row counts without its indices: selected and allowed key blocks per (batch, query head,
  query block). O(T) per head where the indices are O(T * S / block_size^2) (8 GiB per layer for 32 heads at 1M
  tokens): what `xattention(..., return_block_layout="counts")` returns, enough for the density.

  Attributes:
    counts: int32 [B, N, nQb], number of selected key blocks.
    num_allowed: int32 [B, N, nQb], size of the allowed set of each row.
    block_size: tokens per block (static metadata, not a leaf).
  """

  counts: jax.Array
  num_allowed: jax.Array
  block_size: int = dataclasses.field(default=128, metadata=dict(static=True))

  def density(self, axis=None) -> jax.Array:
    """Selected / allowed blocks (float32), over everything or keeping the axes not in `axis` reduced."""
    selected = jnp.sum(self.counts, axis=axis, dtype=jnp.float32)
    allowed = jnp.sum(self.num_allowed, axis=axis, dtype=jnp.float32)
    return selected / jnp.maximum(allowed, 1.0)


# What xattention returns next to its output for each `return_block_layout`: the tables, in this order, and the type.
RETURNED_TABLES = {
  True: (("counts", "indices", "num_allowed"), BlockLayout),
  "counts": (("counts", "num_allowed"), BlockCounts),
}


def returned_table_names(mode) -> tuple[str, ...]:
  """The tables xattention returns for `return_block_layout=mode`, in RETURNED_TABLES order (none for False)."""
  return RETURNED_TABLES[mode][0] if mode else ()


def returned_layout(mode, tables, block_size: int):
  """The BlockLayout (mode True) or BlockCounts (mode "counts") built from `tables` in RETURNED_TABLES order."""
  names, kind = RETURNED_TABLES[mode]
  return kind(**dict(zip(names, tables)), block_size=block_size)


def _compress(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dense bool [..., nKb] -> (counts [...], ascending indices [..., nKb] padded with the last valid index)."""
  nkb = mask.shape[-1]
  block_ids = jnp.arange(nkb, dtype=jnp.int32)
  return compress_ids(jnp.where(mask, block_ids, nkb), jnp.sum(mask, axis=-1, dtype=jnp.int32))


def compress_ids(ids: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Block ids [..., nKb] holding `counts` selected ids (< nKb) and nKb elsewhere, in any order -> layout rows."""
  nkb = ids.shape[-1]
  ids = jnp.sort(ids, axis=-1)
  last = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  ids = jnp.where(jnp.arange(nkb, dtype=jnp.int32) < counts[..., None], ids, last)
  return counts, ids.astype(jnp.int32)


def allowed_blocks(
  *,
  q_len: int,
  kv_len: int,
  block_size: int = 128,
  causal: bool = True,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
) -> jax.Array:
  """bool [B, 1, nQb, nKb] (B = 1 without lengths): the blocks a layout may select (SPEC §2.1).

  AND a hand-made mask with it before `BlockLayout.from_dense` to get a layout that `block_sparse_attention`
  accepts for this geometry.
  """
  q_len = _checks.check_static_int(q_len, "q_len")
  kv_len = _checks.check_static_int(kv_len, "kv_len")
  block_size = _checks.check_static_int(block_size, "block_size")
  batch = next((np.shape(x)[0] for x in (query_seq_lengths, key_value_seq_lengths) if np.ndim(x) == 1), 1)
  dims = _checks.Dims(B=batch, T=q_len, S=kv_len, N=1, K=1, H=1)
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  last_allowed, _ = block_bounds(
    Geometry.from_lengths(q_lengths, kv_lengths),
    num_q_blocks=cdiv(q_len, block_size),
    block_size=block_size,
    causal=causal,
  )
  nkb = cdiv(kv_len, block_size)
  return (jnp.arange(nkb, dtype=jnp.int32) <= last_allowed[..., None])[:, None]


def validate_layout(layout: BlockLayout, last_allowed: jax.Array, *, name: str = "layout") -> None:
  """Checks a layout against the allowed prefix of each row before a kernel reads it.

  Raises ValueError on concrete tables; traced tables get checkify debug checks (active under checkify).

  Args:
    layout: the layout; shape (B, N, nQb, nKb).
    last_allowed: int32 [B, nQb], last allowed key block per row (-1: nothing allowed), from `block_bounds`.
  """
  counts, indices = layout.counts, layout.indices
  B, N, nqb, nkb = indices.shape
  if tuple(counts.shape) != (B, N, nqb):
    raise ValueError(f"{name}.counts.shape={tuple(counts.shape)} must be {(B, N, nqb)} ({name}.indices.shape[:3])")
  if counts.dtype != jnp.int32 or indices.dtype != jnp.int32:
    raise ValueError(f"{name}.counts.dtype={counts.dtype} and {name}.indices.dtype={indices.dtype} must be int32")
  last_allowed = last_allowed[:, None, :]
  _checks.enforce((counts >= 0) & (counts <= nkb), f"{name}.counts must lie in [0, {nkb}]")
  _checks.enforce((indices >= 0) & (indices < nkb), f"{name}.indices must lie in [0, {nkb})")
  k = jnp.arange(nkb, dtype=jnp.int32)
  in_use = k < counts[..., None]
  steps = indices[..., 1:] - indices[..., :-1]
  _checks.enforce(
    jnp.where(in_use[..., 1:], steps > 0, steps == 0),
    f"{name}.indices must be strictly ascending below counts and repeat the last valid index after it",
  )
  last_selected = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)[..., 0]
  _checks.enforce(
    (counts == 0) | (last_selected <= last_allowed),
    f"{name} selects key blocks outside the allowed set (causal future or key padding); AND the mask with "
    "xattn_jax.allowed_blocks(...) before BlockLayout.from_dense",
  )
  # With ascending indices inside the allowed prefix, counts <= allowed follows; what is left is the lower bound.
  _checks.enforce(
    counts >= jnp.minimum(1, last_allowed + 1),
    f"{name}.counts must lie in [1, allowed blocks] (0 only for query blocks that allow nothing, e.g. padding)",
  )
  _checks.enforce((counts > 0) | jnp.all(indices == 0, axis=-1), f"{name}.indices of an empty row must be all 0")


def transposed_layout(layout: BlockLayout) -> tuple[jax.Array, jax.Array]:
  """The layout seen from the key side: for each (b, n, key block c), the query blocks that selected c (jittable).

  The backward's dK/dV kernels walk this table: a key block accumulates its gradient over exactly the query blocks
  whose rows list it. Same conventions as a layout row: ascending, padded with the last valid entry (0 for a key
  block nobody selected). For one (b, n), nQb = 4, nKb = 3:

      layout (rows r)              counts  indices        transposed (rows c)          counts  indices
             c=0 c=1 c=2                                          r=0 r=1 r=2 r=3
      r=0  [  x   .   .  ]         1       [0 0 0]        c=0  [  x   x   x   .  ]     3       [0 1 2 2]
      r=1  [  x   x   .  ]         2       [0 1 1]        c=1  [  .   x   .   .  ]     1       [1 1 1 1]
      r=2  [  x   .   x  ]         2       [0 2 2]        c=2  [  .   .   x   .  ]     1       [2 2 2 2]
      r=3  [  .   .   .  ]         0       [0 0 0]        (r=3 is padding: it selects nothing, so no c lists it)

  Built by a binary search of each key block in each row, giving the dense [B, N, nQb, nKb] mask (never the
  [.., nKb, nKb] one-hot of `to_dense`), then the same sort-compress as `from_dense` along the query axis. Memory: a
  few temporaries and one result of the layout's size (int32 [B, N, nKb, nQb]); kernels DMA single rows of it.

  Returns:
    counts: int32 [B, N, nKb], how many query blocks selected each key block.
    indices: int32 [B, N, nKb, nQb], those query blocks, ascending, padded with the last one.
  """
  indices, counts = layout.indices, layout.counts[..., None]
  nkb = indices.shape[-1]
  blocks = jnp.broadcast_to(jnp.arange(nkb, dtype=jnp.int32), indices.shape)
  # Binary search of every key block c in every (ascending) row: pos = selected entries < c. Gathers only (a
  # batched scatter trips checkify), log2(nKb) steps over tables of the layout's size.
  pos = jnp.zeros(indices.shape, jnp.int32)
  step = 1 << (nkb.bit_length() - 1)
  while step:
    ahead = pos + step
    below = jnp.take_along_axis(indices, jnp.minimum(ahead, nkb) - 1, axis=-1) < blocks
    pos = jnp.where((ahead <= counts) & below, ahead, pos)
    step >>= 1
  selected = (pos < counts) & (jnp.take_along_axis(indices, jnp.minimum(pos, nkb - 1), axis=-1) == blocks)
  return _compress(jnp.swapaxes(selected, -1, -2))  # rows: key blocks; entries: query blocks
