"""Sequence (context) parallelism: one long prompt's queries split over a mesh axis, K and V all-gathered.

Option A of docs/sequence_parallel.md. Along the axis `seq` of size P the (padded) queries are cut into 2P chunks of
c tokens (c a whole number of blocks) and device i takes chunks i and 2P-1-i ("zig-zag"):

    P = 2, 2P = 4 chunks:   queries  [ 0 | 1 | 2 | 3 ]      causal work per chunk grows with its position:
                            device 0 takes chunks 0 and 3   1 + 4 = 5 units
                            device 1 takes chunks 1 and 2   2 + 3 = 5 units

Contiguous chunks would give the last device (2P-1) / 1 times the first one's causal work; zig-zag gives every
device the same number of query-key pairs to within one chunk's diagonal. (Striped assignment balances as well but
breaks the block structure: XAttention's blocks and strided rows need contiguous runs of queries.)

Each device all-gathers the keys and values of its batch elements and heads (the estimator's softmax runs over a
whole strided row of keys, and attention reads whatever blocks were selected), then runs the single-device op on
its two chunks with their positions (`Geometry.chunk`). Scores, selection and attention of a query chunk do not
depend on how queries are chunked (SPEC §1.6), so the result equals the unsharded op's. Gathering fewer keys does not
pay: the estimator reads every key token (Kr = k.reshape(S/s, s*H)), and the union of the blocks selected by one
device's query blocks and heads covers most key blocks at the densities that matter (sinks, stripes, band).

Communication per device: the all-gather of K and V, 2 * S * K_local * H * itemsize * (P - 1) / P bytes received,
plus moving the queries and the output into and out of the zig-zag order (an all-to-all of T * N_local * H each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import returned_layout, returned_table_names


def table_specs(return_block_layout, rows: P) -> tuple[P, ...]:
  """The partition specs of the tables xattention returns for `return_block_layout` (`returned_table_names`), given
  the spec of a per-row table [B, N, nQb]: the indices have one more (key block) dim, never split."""
  return tuple(P(*rows, None) if name == "indices" else rows for name in returned_table_names(return_block_layout))


def zigzag_order(parts: int) -> np.ndarray:
  """The chunk order that puts chunks i and 2P-1-i next to each other: device i's slice after sharding."""
  return np.array([c for i in range(parts) for c in (i, 2 * parts - 1 - i)])


def _permute(x, order, *, axis: int, parts: int, spec: P | None, sharding=None):
  """x with its axis `axis` cut into `parts` equal chunks, reordered by `order`. `spec`: x's sharding where the mesh
  axes are Explicit (the gather must be told its output sharding, as `sharding(spec)`), else None."""
  shape = x.shape
  x = x.reshape(shape[:axis] + (parts, shape[axis] // parts) + shape[axis + 1 :])
  if spec is None:
    return jnp.take(x, jnp.asarray(order), axis=axis).reshape(shape)
  chunked = P(*spec[: axis + 1], None, *spec[axis + 1 :])
  return x.at[(slice(None),) * axis + (jnp.asarray(order),)].get(out_sharding=sharding(chunked)).reshape(shape)


def chunk_tokens(q_len: int, seq_size: int, block_size: int) -> int:
  """Tokens per zig-zag chunk: T padded to 2P chunks of whole blocks."""
  return cdiv(q_len, 2 * seq_size * block_size) * block_size


def sequence_parallel(
  run_chunk,
  query,
  key,
  value,
  geometry: Geometry,
  tau,
  *,
  mesh,
  shard_map,
  place,
  seq_axis: str,
  batch_axis,
  head_axis,
  block_size: int,
  return_block_layout: bool | str,
):
  """Runs `run_chunk(q_chunk, k_all, v_all, chunk_geometry, tau) -> (out,) or (out, BlockLayout or BlockCounts)` on
  each device's two zig-zag chunks of the queries, after all-gathering K and V along `seq_axis`; returns what the
  unsharded op returns (out [B, T, N, H], and the BlockLayout or BlockCounts in the unsharded query-block order if
  asked).

  `shard_map(local, args, in_specs, out_specs)` runs `local` over `mesh`; `place(x, spec)` lays x out as `spec`
  (an explicit reshard on Explicit mesh axes, nothing on Auto ones).
  """
  explicit = dict(zip(mesh.axis_names, mesh.axis_types))[seq_axis] == jax.sharding.AxisType.Explicit
  concrete = isinstance(mesh, jax.sharding.Mesh)
  sharding = lambda spec: jax.sharding.NamedSharding(mesh, spec) if concrete else spec
  tokens = P(batch_axis, seq_axis, head_axis, None)
  rows = P(batch_axis, head_axis, seq_axis)
  B, T, N, H = query.shape
  S = key.shape[1]
  parts = mesh.shape[seq_axis]
  c = chunk_tokens(T, parts, block_size)
  Tp, Sp = 2 * parts * c, cdiv(S, parts) * parts
  # Padding queries and keys lie past the lengths that `geometry` holds: never attended, never selected.
  q = jnp.pad(query, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
  k, v = (jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))) for x in (key, value))
  order = zigzag_order(parts)
  q = _permute(place(q, tokens), order, axis=1, parts=2 * parts, spec=tokens if explicit else None, sharding=sharding)

  def local(q, k, v, q_lengths, kv_lengths, q_positions, tau):
    k_all = lax.all_gather(k, seq_axis, axis=1, tiled=True)
    v_all = lax.all_gather(v, seq_axis, axis=1, tiled=True)
    i = lax.axis_index(seq_axis)
    geom = Geometry(q_lengths, kv_lengths, q_positions)
    results = [
      run_chunk(q[:, j * c : (j + 1) * c], k_all, v_all, geom.chunk(start * c, c), tau)
      for j, start in enumerate((i, 2 * parts - 1 - i))
    ]
    out = jnp.concatenate([r[0] for r in results], axis=1)
    if not return_block_layout:
      return out
    return out, *(jnp.concatenate([getattr(r[1], name) for r in results], axis=2) for name in names)

  names = returned_table_names(return_block_layout)
  specs = table_specs(return_block_layout, rows)
  out_specs = (tokens, *specs) if return_block_layout else tokens
  in_specs = (tokens, tokens, tokens, P(batch_axis), P(batch_axis), P(batch_axis), P(head_axis))
  result = shard_map(local, (q, k, v, *geometry, tau), in_specs, out_specs)
  inverse = np.argsort(order)
  # On Explicit mesh axes a slice of a sharded dim must divide evenly: the padded tail is cut after gathering that
  # dim (on Auto axes XLA places the slice itself).
  trim = lambda x, spec, axis, size: (
    jax.reshard(x, sharding(P(*spec[:axis], None, *spec[axis + 1 :]))) if explicit else x
  )[(slice(None),) * axis + (slice(0, size),)]

  def unpermute_out(x):
    x = _permute(x, inverse, axis=1, parts=2 * parts, spec=tokens if explicit else None, sharding=sharding)
    return trim(x, tokens, 1, T)

  if not return_block_layout:
    return unpermute_out(result)
  out, *tables = result
  nqb, nkb = cdiv(T, block_size), cdiv(S, block_size)

  def unpermute(x, spec):
    x = _permute(x, inverse, axis=2, parts=2 * parts, spec=spec if explicit else None, sharding=sharding)
    return trim(x, spec, 2, nqb)

  tables = [
    unpermute(x, spec)[..., :nkb] if name == "indices" else unpermute(x, spec)
    for name, x, spec in zip(names, tables, specs)
  ]
  return unpermute_out(out), returned_layout(return_block_layout, tables, block_size)
