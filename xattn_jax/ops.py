"""The public ops: validation, then dispatch to a backend (see `backends`).

Layout everywhere: q [B, T, N, H], k/v [B, S, K, H] with S >= T and N % K == 0 (query head n reads kv head
n // (N/K)); query t sits at position k_b - q_b + t ("bottom-right", as flash-attention >= 2.1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xattn_jax import _checks, backends
from xattn_jax.estimators import Estimator, check_estimator
from xattn_jax.geometry import Geometry, block_bounds, cdiv, chunk_blocks, zero_straddling_tokens
from xattn_jax.layout import BlockLayout, returned_layout, returned_table_names, validate_layout
from xattn_jax.selection import dense_layout, select_layout

# Bytes per query chunk of xattention's block-level buffers: scores, sort keys, order, indices (~6 words per
# block) plus a scoring kernel's per-strided-row partial block sums (block_size / stride words per block).
_TABLE_BUDGET_BYTES = 1024 * 2**20
# Keyword arguments that Flax attention modules pass to an `attention_fn`; xattention accepts and checks them.
_FLAX_KWARGS = frozenset(
  {"dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic", "dtype", "precision", "module", "promote_dtype"}
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, layout, geometry, causal, scale, implementation, interpret):
  """Block-sparse attention of any backend, differentiable in q, k, v (the layout is a constant).

  The backward recomputes the probabilities blockwise from the saved lse: the backward kernels of the first backend of
  `implementation` that has them and supports the call, else `attention_xla_bwd` (which serves any forward); memory
  O(T) per head besides the inputs.
  """
  return backends.dispatch(
    "block_sparse_attention", implementation, q, k, v, layout, geometry, causal=causal, scale=scale, interpret=interpret
  )


def _attention_fwd(q, k, v, layout, geometry, causal, scale, implementation, interpret):
  out, lse = _attention(q, k, v, layout, geometry, causal, scale, implementation, interpret)
  return (out, lse), (q, k, v, out, lse, layout, geometry)


def _attention_bwd(causal, scale, implementation, interpret, residuals, cotangents):
  q, k, v, out, lse, layout, geometry = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = backends.dispatch_backward(  # a backend's backward kernels, else the XLA backward
    implementation, q, k, v, out, lse, d_out, d_lse, layout, geometry, causal=causal, scale=scale, interpret=interpret
  )
  no_gradient = lambda tree: jax.tree_util.tree_map(lambda x: np.zeros(x.shape, jax.dtypes.float0), tree)
  return dq, dk, dv, no_gradient(layout), no_gradient(geometry)


_attention.defvjp(_attention_fwd, _attention_bwd)


def antidiagonal_scores(
  q,
  k,
  *,
  stride: int = 8,
  block_size: int = 128,
  causal: bool = True,
  scale: float | None = None,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  implementation=None,
  interpret: bool = False,
  estimator: str = "antidiagonal",
) -> jax.Array:
  """Antidiagonal block-importance scores (SPEC §1).

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, S >= T, N % K == 0.
    stride: s, the antidiagonal stride; must divide block_size.
    block_size: tokens per block.
    causal: mask strided cells above the (bottom-right aligned) diagonal.
    scale: logit scale; default 1/sqrt(H).
    query_seq_lengths: optional int [B], real queries per batch element (right padding).
    key_value_seq_lengths: optional int [B], real keys per batch element.
    implementation: None, a backend name or a sequence of names (see `xattn_jax.backends`).
    interpret: run Pallas kernels in their CPU interpreter.
    estimator: "antidiagonal" (the paper's: with an even stride it samples odd token distances only) or
      "alternating" (odd strided rows use the cell's next antidiagonal, so every distance is sampled; SPEC §1.7).

  Returns:
    float32 [B, N, ceil(T/block_size), ceil(S/block_size)]: per query block, the estimated attention mass of each
    key block; a full real query block's row sums to block_size/stride.

  Raises:
    ValueError: a wrong rank, shape, dtype or value, naming the argument.
    NotImplementedError: no backend of `implementation` supports the call.
  """
  dims = _checks.check_qkv(q, k)
  stride, block_size = _checks.check_stride_block(stride, block_size)
  scale = _checks.check_scale(scale, dims.H)
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  estimator = check_estimator(estimator, stride=stride, block_size=block_size)
  return backends.dispatch(
    "antidiagonal_scores",
    implementation,
    q,
    k,
    Geometry.from_lengths(q_lengths, kv_lengths),
    stride=stride,
    block_size=block_size,
    causal=bool(causal),
    scale=scale,
    estimator=estimator,
    interpret=bool(interpret),
  )


def block_sparse_attention(
  q,
  k,
  v,
  layout: BlockLayout,
  *,
  causal: bool = True,
  scale: float | None = None,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  return_lse: bool = False,
  implementation=None,
  interpret: bool = False,
):
  """Attention restricted to the key blocks of `layout` (SPEC §4), token-exact causal and padding masks.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys.
    v: [B, S, K, H] values.
    layout: BlockLayout of shape (B, N, ceil(T/blk), ceil(S/blk)), blk = layout.block_size; validated against the
      allowed blocks of this geometry before any kernel reads it.
    causal: query t attends to keys j <= k_b - q_b + t.
    scale: logit scale; default 1/sqrt(H).
    query_seq_lengths: optional int [B].
    key_value_seq_lengths: optional int [B].
    return_lse: also return the float32 log-sum-exp [B, N, T] (-inf where a query attends to nothing).
    implementation: None, a backend name or a sequence of names.
    interpret: run Pallas kernels in their CPU interpreter.

  Returns:
    out [B, T, N, H] in q.dtype (zeros for padding queries), and lse if asked.
  """
  dims = _checks.check_qkv(q, k, v)
  if not isinstance(layout, BlockLayout):
    raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
  blk = layout.block_size
  expected = (dims.B, dims.N, cdiv(dims.T, blk), cdiv(dims.S, blk))
  if layout.shape != expected:
    raise ValueError(
      f"layout.shape={layout.shape} must be (B, N, ceil(T/blk), ceil(S/blk))={expected} for q.shape="
      f"{tuple(q.shape)}, k.shape={tuple(k.shape)}, layout.block_size={blk}"
    )
  scale = _checks.check_scale(scale, dims.H)
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  geometry = Geometry.from_lengths(q_lengths, kv_lengths)
  last_allowed, _ = block_bounds(geometry, num_q_blocks=expected[2], block_size=blk, causal=bool(causal))
  validate_layout(layout, last_allowed)
  out, lse = _attention(
    q, k, v, layout, geometry, bool(causal), scale, backends.resolve(implementation), bool(interpret)
  )
  return (out, lse) if return_lse else out


def xattention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  threshold=0.9,
  stride: int = 8,
  block_size: int = 128,
  keep_sink: bool = True,
  keep_diagonal: bool = True,
  keep_top_neighbors: bool = False,
  query_chunk_size: int | None = None,
  implementation=None,
  interpret: bool = False,
  return_block_layout: bool | str = False,
  estimator: str = "antidiagonal",
  **kwargs,
):
  """XAttention: estimate block importance, select blocks, attend -- a drop-in for `jax.nn.dot_product_attention`.

  One jittable function with no host round trip: the selection changes with the data without recompiling. Queries
  are processed in chunks of `query_chunk_size` tokens so that scores and block tables never exceed a memory budget.
  A decode step (T = 1) attends densely (XAttention is a prefill method).

  Args:
    query: [B, T, N, H] or [T, N, H].
    key: [B, S, K, H] or [S, K, H], S >= T, N % K == 0.
    value: like key.
    bias: must be None (a dense bias cannot be honoured: NotImplementedError, so callers can fall back).
    mask: must be None (likewise); use is_causal and the seq lengths.
    scale: logit scale; default 1/sqrt(H).
    is_causal: causal attention, bottom-right aligned (query t at position k_b - q_b + t).
    query_seq_lengths: optional int [B], real queries per batch element (right padding).
    key_value_seq_lengths: optional int [B], real keys per batch element.
    threshold: tau, a float or a float array [N] in [0, inf); tau >= 1 is dense attention. A Python float is checked
      at once; a traced one (under jit) only inside `jax.experimental.checkify` (plain jit cannot raise on values).
    stride: antidiagonal stride (divides block_size).
    block_size: tokens per block.
    keep_sink: always keep key block 0.
    keep_diagonal: always keep the diagonal block (causal always does).
    keep_top_neighbors: also keep both neighbours of each query block's highest-scoring key block (SPEC §2.7: a
      sharp diagonal that crosses a key-block boundary needs them for a few rows).
    query_chunk_size: queries per step (multiple of block_size); None picks one from a memory budget.
    implementation: None, a backend name or a sequence of names.
    interpret: run Pallas kernels in their CPU interpreter.
    return_block_layout: also return the BlockLayout (B, N, nQb, nKb) that was used; "counts": return its per-row
      counts alone (a BlockCounts, O(T) where the layout's indices are O(T * S / block_size^2) and are never held
      for the whole sequence), enough for `density()`.
    estimator: the block-importance estimator, "antidiagonal" (the paper's) or "alternating" (sees every token
      distance; SPEC §1.7).
    **kwargs: what Flax passes to an attention_fn (dropout_rng, dropout_rate, deterministic, dtype, precision,
      module, ...); active dropout raises NotImplementedError.

  Returns:
    out like query (and the BlockLayout or BlockCounts if asked).
  """
  unknown = set(kwargs) - _FLAX_KWARGS
  if unknown:
    raise TypeError(f"xattention() got unexpected keyword arguments {sorted(unknown)}")
  if kwargs.get("dropout_rate", 0.0) and not kwargs.get("deterministic", False):
    raise NotImplementedError(f"dropout_rate={kwargs['dropout_rate']} > 0 is not supported by xattention")
  if bias is not None:
    raise NotImplementedError("xattention cannot honour a dense bias; pass bias=None")
  if mask is not None:
    raise NotImplementedError("xattention cannot honour a dense mask; use is_causal and the seq lengths")
  unbatched = getattr(query, "ndim", None) == 3
  if unbatched:
    if getattr(key, "ndim", None) != 3 or getattr(value, "ndim", None) != 3:
      raise ValueError("with an unbatched query [T, N, H], key and value must be [S, K, H] too")
    query, key, value = query[None], key[None], value[None]
  geometry, tau, static = prepare_xattention(
    query,
    key,
    value,
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    threshold=threshold,
    stride=stride,
    block_size=block_size,
    keep_sink=keep_sink,
    keep_diagonal=keep_diagonal,
    keep_top_neighbors=keep_top_neighbors,
    query_chunk_size=query_chunk_size,
    implementation=implementation,
    interpret=interpret,
    return_block_layout=return_block_layout,
    estimator=estimator,
  )
  result = _xattention(query, key, value, geometry, tau, **static)
  out = result[0][0] if unbatched else result[0]
  return (out, result[1]) if return_block_layout else out


def prepare_xattention(
  query,
  key,
  value,
  *,
  scale,
  is_causal,
  query_seq_lengths,
  key_value_seq_lengths,
  threshold,
  stride,
  block_size,
  keep_sink,
  keep_diagonal,
  query_chunk_size,
  implementation,
  interpret,
  return_block_layout,
  estimator="antidiagonal",
  keep_top_neighbors=False,
):
  """Validates `xattention`'s (batched) arguments: (geometry, tau [N], the static keyword arguments of `_xattention`).

  Shared by `xattention` and the sequence-parallel path of `sharded_xattention`, which runs `_xattention` per device
  on query chunks of the geometry validated here (`Geometry.chunk`).
  """
  dims = _checks.check_qkv(query, key, value, q_name="query", k_name="key", v_name="value")
  stride, block_size = _checks.check_stride_block(stride, block_size)
  scale = _checks.check_scale(scale, dims.H)
  if query_chunk_size is not None:
    query_chunk_size = _checks.check_static_int(query_chunk_size, "query_chunk_size")
    if query_chunk_size % block_size:
      raise ValueError(f"{query_chunk_size=} must be a multiple of {block_size=}")
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  tau = _checks.threshold_array(threshold, dims.N)
  nqb, nkb = cdiv(dims.T, block_size), cdiv(dims.S, block_size)
  if query_chunk_size is None:
    per_block = dims.B * dims.N * nkb * 4 * (6 + block_size // stride)
    query_chunk_size = chunk_blocks(nqb, _TABLE_BUDGET_BYTES // per_block) * block_size
  static = dict(
    scale=scale,
    causal=bool(is_causal),
    stride=stride,
    block_size=block_size,
    keep_sink=bool(keep_sink),
    keep_diagonal=bool(keep_diagonal),
    keep_top_neighbors=bool(keep_top_neighbors),
    chunk=min(query_chunk_size, nqb * block_size),
    implementation=backends.resolve(implementation),
    interpret=bool(interpret),
    return_block_layout=_checks.check_return_block_layout(return_block_layout),
    estimator=check_estimator(estimator, stride=stride, block_size=block_size),
    padded=query_seq_lengths is not None or key_value_seq_lengths is not None,
  )
  return Geometry.from_lengths(q_lengths, kv_lengths), tau, static


def _output_buffer(q, out_shape):
  """The chunk loop's output buffer [B, T, N, Hv]: q itself where the shapes allow (see `_xattention`)."""
  shape = q.shape[:-1] + out_shape.shape[-1:]
  return q.astype(out_shape.dtype) if shape == q.shape else jnp.zeros(shape, out_shape.dtype)


@functools.partial(
  jax.jit,
  static_argnames=(
    "scale",
    "causal",
    "stride",
    "block_size",
    "keep_sink",
    "keep_diagonal",
    "keep_top_neighbors",
    "chunk",
    "implementation",
    "interpret",
    "return_block_layout",
    "dense",
    "estimator",
    "padded",
  ),
)
def _xattention(
  q,
  k,
  v,
  geometry: Geometry,
  tau,
  *,
  scale,
  causal,
  stride,
  block_size,
  keep_sink,
  keep_diagonal,
  chunk,
  implementation,
  interpret,
  return_block_layout,
  dense=False,
  keep_top_neighbors=False,
  estimator=Estimator.ANTIDIAGONAL,
  padded=True,
):
  """Estimate, select and attend per query chunk of `chunk` tokens; with `dense` (or a decode step) every allowed
  block is attended and nothing is estimated: `dense_attention`'s blockwise route. `padded`: lengths were given
  (without them every token is real, and the padding to whole tiles that the kernels add is zeros)."""
  B, T, N, H = q.shape
  S = k.shape[1]
  if padded and not (dense or T == 1):
    # For the Mosaic GPU scoring kernel (`padding_zeroed`): the padding tokens that share a stride group with real
    # ones, zeroed once for the estimator of every chunk (SPEC §1.1) and seen by the attention too, which never
    # reads them (padding keys are masked, padding query rows written as zeros): a write of at most `stride`
    # tokens per sequence, in place where q and K have no other use, instead of a conditional pass over the whole
    # q chunk and K per chunk in its launcher. Gradients are unchanged (nothing depends on those tokens). Without
    # lengths, or where that kernel cannot run (the XLA and TPU scorers zero inside copies they make anyway),
    # nothing is written: q and K, a program's arguments, would be copied for it.
    zero = lambda q, k: (
      zero_straddling_tokens(q, geometry.q_lengths, stride),
      zero_straddling_tokens(k, geometry.kv_lengths, stride),
    )
    q, k = backends.where_backend_may_run("pallas_mosaic_gpu", implementation, zero, q, k)

  def one_chunk(qc, geom):
    t = qc.shape[1]
    if dense or T == 1:
      layout = dense_layout(geom, num_heads=N, q_len=t, kv_len=S, block_size=block_size, causal=causal)
    else:
      scores = backends.dispatch(  # the selection is a constant of the attention: no gradient through it
        "antidiagonal_scores",
        implementation,
        lax.stop_gradient(qc),
        lax.stop_gradient(k),
        geom,
        stride=stride,
        block_size=block_size,
        causal=causal,
        scale=scale,
        estimator=estimator,
        interpret=interpret,
        padding_zeroed=True,
      )
      layout = select_layout(
        scores,
        geom,
        tau,
        block_size=block_size,
        causal=causal,
        keep_sink=keep_sink,
        keep_diagonal=keep_diagonal,
        keep_top_neighbors=keep_top_neighbors,
      )
    out, _ = _attention(qc, k, v, layout, geom, causal, scale, implementation, interpret)
    return out, layout

  def parts(layout):
    return tuple(getattr(layout, name) for name in returned_table_names(return_block_layout))

  if chunk >= T:
    out, layout = one_chunk(q, geometry)
    return (out, returned_layout(return_block_layout, parts(layout), block_size)) if return_block_layout else (out,)

  # Whole chunks in a loop, then the ragged tail (if any) as one smaller static chunk. The loop's buffer starts as q
  # itself: each chunk reads its queries from it with a dynamic slice and writes its output rows over them, so no
  # chunked copy of q and no zero-filled output exists (XLA's GPU compiler fuses the zero fills of all of a model's
  # layers into one kernel at the program's start, holding one q-sized buffer per layer): the memory beyond
  # q/k/v/out is one chunk's scores, tables and attention temporaries.
  n_full, tail = divmod(T, chunk)

  def run_chunk(buf, start, size):
    return one_chunk(lax.dynamic_slice_in_dim(buf, start, size, axis=1), geometry.chunk(start, size))

  def write(carry, start, result):
    out, tables = carry
    out = lax.dynamic_update_slice_in_dim(out, result[0], start, axis=1)
    tables = tuple(
      lax.dynamic_update_slice_in_dim(buf, x, start // block_size, axis=2) for buf, x in zip(tables, parts(result[1]))
    )
    return out, tables

  nqb = cdiv(T, block_size)
  out_shape, layout_shape = jax.eval_shape(lambda: run_chunk(q, 0, chunk))
  tables = tuple(jnp.zeros(x.shape[:2] + (nqb,) + x.shape[3:], x.dtype) for x in parts(layout_shape))
  carry = lax.fori_loop(
    0,
    n_full,
    lambda c, carry: write(carry, c * chunk, run_chunk(carry[0], c * chunk, chunk)),
    (_output_buffer(q, out_shape), tables),
  )
  if tail:
    carry = write(carry, n_full * chunk, run_chunk(carry[0], n_full * chunk, tail))
  out, tables = carry
  return (out, returned_layout(return_block_layout, tables, block_size)) if return_block_layout else (out,)
