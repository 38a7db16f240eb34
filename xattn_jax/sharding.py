"""XAttention (and dense attention) on a device mesh: `jax.shard_map` over the batch and the kv heads.

Each device estimates, selects and attends for its own batch elements and heads: block selection is per
(batch, query head) and GQA keeps query head n with kv head n // G, so splitting the N query heads and the K kv
heads into the same number of contiguous chunks keeps every group on one device, and no communication happens inside
attention. Works with every backend (the Pallas kernels run per device).

    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    with jax.set_mesh(mesh):
      out = sharded_xattention(q, k, v, is_causal=True, threshold=0.9)  # q [B, T, N, H] sharded or not
"""

from __future__ import annotations

import inspect

import jax
from jax.sharding import PartitionSpec as P

from xattn_jax import _checks
from xattn_jax.dense import dense_attention
from xattn_jax.layout import returned_layout
from xattn_jax.context_parallel import chunk_tokens, sequence_parallel, table_specs
from xattn_jax.ops import _xattention, prepare_xattention, xattention

# xattention's keyword defaults that `prepare_xattention` needs, read from its signature so that they cannot drift.
_XATTENTION_DEFAULTS = {
  name: p.default
  for name, p in inspect.signature(xattention).parameters.items()
  if p.kind is inspect.Parameter.KEYWORD_ONLY
  and name not in ("query_seq_lengths", "key_value_seq_lengths", "threshold", "return_block_layout")
}


def _xattention_defaults(kwargs: dict) -> dict:
  """`xattention`'s keyword arguments with its defaults filled in (for `prepare_xattention`)."""
  unknown = set(kwargs) - set(_XATTENTION_DEFAULTS)
  if unknown:
    raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
  return _XATTENTION_DEFAULTS | kwargs


def _sequence_parallel(query, key, value, geometry, tau, static, mesh, batch_axis, head_axis, seq_axis):
  c = chunk_tokens(query.shape[1], mesh.shape[seq_axis], static["block_size"])
  local_static = dict(static, chunk=min(static["chunk"], c))

  def run_chunk(q, k, v, geometry, tau):
    with _checks.traced_checks(False):  # validated on the whole arrays; checkify cannot cross the shard_map
      return _xattention(q, k, v, geometry, tau, **local_static)

  def shard_map(local, args, in_specs, out_specs):
    return _shard_map(local, mesh, args, in_specs, out_specs)

  return sequence_parallel(
    run_chunk,
    query,
    key,
    value,
    geometry,
    tau,
    mesh=mesh,
    shard_map=shard_map,
    place=lambda x, spec: _placed(x, spec, mesh),
    seq_axis=seq_axis,
    batch_axis=batch_axis,
    head_axis=head_axis,
    block_size=static["block_size"],
    return_block_layout=static["return_block_layout"],
  )


def _axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh axis {axis!r} is not one of the mesh's axes {mesh.axis_names}")
  return mesh.shape[axis]


def _placed(x, spec: P, mesh):
  """x laid out as `spec`: Explicit mesh axes need an explicit reshard before shard_map; Auto axes reshard there."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  used = [a for a in spec if a is not None]
  if used and all(types[a] == jax.sharding.AxisType.Explicit for a in used):
    return jax.reshard(x, jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec)
  return x


def current_mesh():
  """The mesh set with `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _mesh_and_sizes(mesh, query, key, value, batch_axis, head_axis, seq_axis=None):
  mesh = mesh if mesh is not None else current_mesh()
  if mesh is None:
    raise ValueError("sharded attention needs a mesh: pass mesh= or call it under jax.set_mesh(mesh)")
  named = [a for a in (batch_axis, head_axis, seq_axis) if a is not None]
  if len(set(named)) < len(named):
    raise ValueError(f"{batch_axis=}, {head_axis=} and {seq_axis=} must name different mesh axes")
  _axis_size(mesh, seq_axis)
  dims = _checks.check_qkv(query, key, value, q_name="query", k_name="key", v_name="value")
  dp, tp = _axis_size(mesh, batch_axis), _axis_size(mesh, head_axis)
  if dims.K % tp:
    raise ValueError(
      f"the number of kv heads K={dims.K} must be divisible by the size {tp} of mesh axis "
      f"{head_axis!r} (each device keeps whole GQA groups)"
    )
  if dims.B % dp:
    raise ValueError(f"the batch size B={dims.B} must be divisible by the size {dp} of mesh axis {batch_axis!r}")
  return mesh, dims


def _shard_map(local, mesh, args, in_specs, out_specs):
  args = [_placed(x, spec, mesh) for x, spec in zip(args, in_specs)]
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def sharded_xattention(
  query,
  key,
  value,
  *,
  mesh=None,
  batch_axis: str | None = "data",
  head_axis: str | None = "tensor",
  seq_axis: str | None = None,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  threshold=0.9,
  return_block_layout: bool | str = False,
  **kwargs,
):
  """`xattention` with batch split over `batch_axis`, heads over `head_axis` and, with `seq_axis`, the queries of
  each sequence over `seq_axis` of `mesh` (default: the mesh set with `jax.set_mesh`). Arguments and results as
  `xattn_jax.xattention` (4D inputs); an array threshold is [N].

  seq_axis: split the queries in zig-zag chunks over this axis and all-gather K/V along it (`context_parallel`);
    any T and S (padded inside to 2P chunks of whole blocks); the result equals the unsharded op's.

  Raises:
    ValueError: no mesh, an axis the mesh lacks or named twice, or a batch / kv-head count not divisible by its
      axis size.
  """
  mesh, dims = _mesh_and_sizes(mesh, query, key, value, batch_axis, head_axis, seq_axis)
  if seq_axis is not None:
    geometry, tau, static = prepare_xattention(
      query,
      key,
      value,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      threshold=threshold,
      return_block_layout=return_block_layout,
      **_xattention_defaults(kwargs),
    )
    return _sequence_parallel(query, key, value, geometry, tau, static, mesh, batch_axis, head_axis, seq_axis)
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  tau = _checks.threshold_array(threshold, dims.N)
  heads = P(batch_axis, None, head_axis, None)
  return_block_layout = _checks.check_return_block_layout(return_block_layout)
  if return_block_layout:
    tables = table_specs(return_block_layout, P(batch_axis, head_axis, None))
    out_specs = (heads, returned_layout(return_block_layout, tables, kwargs.get("block_size", 128)))
  else:
    out_specs = heads

  def local(q, k, v, q_lengths, kv_lengths, tau):
    # The inputs were validated above, on the whole arrays; checkify's error flag cannot cross this shard_map.
    with _checks.traced_checks(False):
      return xattention(
        q,
        k,
        v,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
        threshold=tau,
        return_block_layout=return_block_layout,
        **kwargs,
      )

  in_specs = (heads, heads, heads, P(batch_axis), P(batch_axis), P(head_axis))
  return _shard_map(local, mesh, (query, key, value, q_lengths, kv_lengths, tau), in_specs, out_specs)


def sharded_dense_attention(
  query,
  key,
  value,
  *,
  mesh=None,
  batch_axis: str | None = "data",
  head_axis: str | None = "tensor",
  seq_axis: str | None = None,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  **kwargs,
):
  """`dense_attention` with batch split over `batch_axis`, heads over `head_axis` and, with `seq_axis`, queries over
  `seq_axis` of `mesh` (default: the mesh set with `jax.set_mesh`); arguments and result as
  `xattn_jax.dense_attention`. Passing the same array as both lengths keeps cuDNN's route available per device, as
  unsharded. With `seq_axis` each device runs the block route (every block selected) on its zig-zag query chunks.

  Raises:
    ValueError: as `sharded_xattention`.
  """
  mesh, dims = _mesh_and_sizes(mesh, query, key, value, batch_axis, head_axis, seq_axis)
  if seq_axis is not None:
    if kwargs.get("implementation") == "cudnn":
      raise ValueError(
        "sharded_dense_attention(seq_axis=...) runs the block route on each device: implementation "
        "must be None or backend name(s), not 'cudnn'"
      )
    geometry, tau, static = prepare_xattention(
      query,
      key,
      value,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      threshold=1.0,
      return_block_layout=False,
      **_xattention_defaults(dict(kwargs, block_size=128)),
    )
    return _sequence_parallel(
      query, key, value, geometry, tau, dict(static, dense=True), mesh, batch_axis, head_axis, seq_axis
    )
  same = query_seq_lengths is key_value_seq_lengths and (query_seq_lengths is not None or dims.T == dims.S)
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  heads = P(batch_axis, None, head_axis, None)

  def local(q, k, v, q_lengths, kv_lengths):
    with _checks.traced_checks(False):
      return dense_attention(
        q, k, v, query_seq_lengths=q_lengths, key_value_seq_lengths=q_lengths if same else kv_lengths, **kwargs
      )

  in_specs = (heads, heads, heads, P(batch_axis), P(batch_axis))
  return _shard_map(local, mesh, (query, key, value, q_lengths, kv_lengths), in_specs, heads)
