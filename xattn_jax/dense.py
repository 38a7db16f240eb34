"""Dense attention in the op's geometry with memory that grows as O(T), never O(T*S), on every platform.

What a model runs where XAttention does not: dense layers, decode steps, chunked prefill of a dense model and dense
baselines. Same layout, masks and alignment as `xattention` (bottom-right causal, seq lengths, native GQA). One
function, `dense_route`, decides how:

    route    when (implementation=None)                                   memory
    CUDNN    a GPU, bf16/fp16, head dim a multiple of 8 up to 128, and    O(T): cuDNN's flash attention
             cuDNN's top-left causal mask equals ours (T == S with the
             same lengths for queries and keys, or not causal)
    DECODE   a decode step (T = 1): two dots that read K and V in         the [B, N, S] logits: O(S)
             place in their [B, S, K, H] layout (batch dimensions
             chosen so that XLA never transposes the cache)
    LOGITS   logits of at most 256 MiB (short prompts)                    the [B, N, T, S] logits
    BLOCKS   everything else: chunked prefill (T < S), TPUs, CPUs,        one query chunk's block tables and
             float32                                                      working set: the block-sparse kernels of
                                                                          the platform with every allowed block
                                                                          selected (Mosaic GPU, Mosaic TPU, or the
                                                                          blockwise XLA reference on a CPU)

cuDNN is not used for T < S because `jax.nn.dot_product_attention` exposes only its top-left causal mask; there the
block-sparse Mosaic GPU kernel with the full layout runs within a few percent of cuDNN (benchmarks/results).
"""

from __future__ import annotations

import enum
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from xattn_jax import _checks, backends
from xattn_jax.config import normalize_implementation
from xattn_jax.geometry import Geometry, cdiv, chunk_blocks
from xattn_jax.ops import _xattention  # the public op's query-chunk loop, run in its dense mode

# Logits up to this many float32 elements (256 MiB: e.g. 32 heads x 1.4K x 1.4K tokens) are materialized: short
# prompts, where XLA's fused dense attention is the fastest route on a CPU. Beyond it the blockwise route runs.
_LOGITS_BUDGET_ELEMENTS = 64 * 2**20
# Bytes of the dense layout's index table per query chunk of the BLOCKS route (nKb int32 per row and head).
_DENSE_TABLE_BUDGET_BYTES = 256 * 2**20
_BLOCK_SIZE = 128  # the kernels' native block


class DenseRoute(enum.Enum):
  CUDNN = "cudnn"
  DECODE = "decode"
  LOGITS = "logits"
  BLOCKS = "blocks"


def dense_route(
  *,
  platform: str,
  dtype,
  batch: int,
  q_len: int,
  kv_len: int,
  num_heads: int,
  head_dim: int,
  causal: bool,
  aligned: bool,
  implementation=None,
) -> DenseRoute:
  """How `dense_attention` computes a call (see the module docstring).

  Args:
    platform: `jax.default_backend()` ("cpu", "gpu", "tpu").
    dtype: the inputs' dtype.
    batch, q_len, kv_len, num_heads, head_dim: B, T, S, N, H of the call.
    causal: causal attention.
    aligned: T == S and the query and key lengths are one and the same (so top-left causal == bottom-right).
    implementation: None (automatic), "cudnn", or backend name(s) for the BLOCKS route.

  Raises:
    ValueError: implementation="cudnn" for a call cuDNN cannot compute exactly.
  """
  cudnn_exact = not causal or aligned
  if implementation == "cudnn":
    if not cudnn_exact:
      raise ValueError(
        "implementation='cudnn' cannot compute causal attention with queries that end where the keys end unless "
        f"T == S and the query and key lengths are the same array (T={q_len}, S={kv_len}); use None"
      )
    return DenseRoute.CUDNN
  if implementation is not None:
    return DenseRoute.BLOCKS
  cudnn = (
    platform == "gpu"
    and dtype in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
    and q_len > 1
    and cudnn_exact
  )
  if cudnn:
    return DenseRoute.CUDNN
  if q_len == 1:
    return DenseRoute.DECODE
  if batch * num_heads * q_len * kv_len <= _LOGITS_BUDGET_ELEMENTS:
    return DenseRoute.LOGITS
  return DenseRoute.BLOCKS


def dense_attention(
  query,
  key,
  value,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  implementation=None,
  query_chunk_size: int | None = None,
  interpret: bool = False,
):
  """Dense attention, O(T) memory, in `xattention`'s geometry: what tau >= 1 computes, without the estimator.

  Args:
    query: [B, T, N, H].
    key: [B, S, K, H], S >= T, N % K == 0.
    value: like key.
    scale: logit scale; default 1/sqrt(H).
    is_causal: causal attention, bottom-right aligned (query t at position k_b - q_b + t).
    query_seq_lengths: optional int [B] (right padding). Pass the same array as `key_value_seq_lengths` for
      self-attention: that is what lets cuDNN's causal mask serve.
    key_value_seq_lengths: optional int [B].
    implementation: None (the route `dense_route` picks for the platform), "cudnn", or backend name(s) of the
      block-sparse op ("xla", "pallas_mosaic_gpu", "pallas_tpu") run with every allowed block selected.
    query_chunk_size: queries per step of the block route (multiple of 128); None picks one from a memory budget.
    interpret: run Pallas kernels in their CPU interpreter.

  Returns:
    out [B, T, N, H] in query's dtype, zeros for padding queries.

  Raises:
    ValueError: a wrong shape, dtype or value (naming the argument), or "cudnn" for a call it cannot compute.
  """
  dims = _checks.check_qkv(query, key, value, q_name="query", k_name="key", v_name="value")
  scale = _checks.check_scale(scale, dims.H)
  aligned = dims.T == dims.S and query_seq_lengths is key_value_seq_lengths
  implementation = normalize_implementation(implementation)
  if implementation not in (None, "cudnn"):
    implementation = backends.resolve(implementation)
  if query_chunk_size is not None:
    query_chunk_size = _checks.check_static_int(query_chunk_size, "query_chunk_size")
    if query_chunk_size % _BLOCK_SIZE:
      raise ValueError(f"{query_chunk_size=} must be a multiple of {_BLOCK_SIZE}")
  q_lengths, kv_lengths = _checks.query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims)
  call = dict(
    dims=dims,
    scale=scale,
    causal=bool(is_causal),
    aligned=aligned,
    implementation=implementation,
    query_chunk_size=query_chunk_size,
    interpret=bool(interpret),
    padded=query_seq_lengths is not None,
    lengths_given=query_seq_lengths is not None or key_value_seq_lengths is not None,
  )
  if implementation is None:  # the route of the platform the program is lowered for (exportable from any host)
    return backends.on_each_platform(
      lambda platform, *args: _dense(platform, *args, **call), query, key, value, q_lengths, kv_lengths
    )
  return _dense(jax.default_backend(), query, key, value, q_lengths, kv_lengths, **call)


def _dense(
  platform,
  query,
  key,
  value,
  q_lengths,
  kv_lengths,
  *,
  dims,
  scale,
  causal,
  aligned,
  implementation,
  query_chunk_size,
  interpret,
  padded,
  lengths_given,
):
  """`dense_attention` on validated arguments, by the route `dense_route` picks for `platform`."""
  route = dense_route(
    platform=platform,
    dtype=query.dtype,
    batch=dims.B,
    q_len=dims.T,
    kv_len=dims.S,
    num_heads=dims.N,
    head_dim=dims.H,
    causal=causal,
    aligned=aligned,
    implementation=implementation,
  )
  if route is DenseRoute.CUDNN and implementation is None and not _cudnn_may_lower():
    route = DenseRoute.BLOCKS  # a placeholder: this branch is not lowered for another platform's mesh
  if route is DenseRoute.CUDNN:
    lengths = dict(query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths) if lengths_given else {}
    try:
      out = jax.nn.dot_product_attention(
        query, key, value, scale=scale, is_causal=causal, implementation="cudnn", **lengths
      )
    except RuntimeError as e:  # tracing the CUDA branch on a host without cuDNN (exporting from a CPU): the kernels
      if implementation == "cudnn" or "cuDNN" not in str(e):
        raise
      if jax.default_backend() == "gpu":  # not expected where cuDNN is installed: say so rather than run slower
        warnings.warn(f"dense_attention: cuDNN refused a call it should take ({e}); running the block route")
      route = DenseRoute.BLOCKS
  if route is DenseRoute.DECODE:
    out = _decode_attention(query, key, value, kv_lengths, scale)
  elif route is DenseRoute.LOGITS:
    out = jax.nn.dot_product_attention(
      query, key, value, scale=scale, implementation="xla", mask=_mask(dims, q_lengths, kv_lengths, causal)
    )
    padded = True  # XLA's softmax over a row with no allowed key is uniform, not zero
  elif route is DenseRoute.BLOCKS:  # not a bare else: cuDNN's output (route CUDNN) must not be overwritten
    nkb = cdiv(dims.S, _BLOCK_SIZE)
    max_blocks = _DENSE_TABLE_BUDGET_BYTES // (dims.B * dims.N * nkb * 4)
    chunk = query_chunk_size or chunk_blocks(cdiv(dims.T, _BLOCK_SIZE), max_blocks) * _BLOCK_SIZE
    (out,) = _xattention(
      query,
      key,
      value,
      Geometry.from_lengths(q_lengths, kv_lengths),
      jnp.ones((dims.N,), jnp.float32),
      scale=scale,
      causal=causal,
      stride=8,
      block_size=_BLOCK_SIZE,
      keep_sink=True,
      keep_diagonal=True,
      chunk=min(chunk, cdiv(dims.T, _BLOCK_SIZE) * _BLOCK_SIZE),
      implementation=implementation or backends.resolve(None),
      interpret=interpret,
      return_block_layout=False,
      dense=True,
    )
    padded = False  # the block route writes zeros for padding queries itself
  if padded:
    real = jnp.arange(dims.T, dtype=jnp.int32)[None, :] < q_lengths[:, None]
    out = jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype))
  return out


def _cudnn_may_lower() -> bool:
  """False where the program is traced for an abstract mesh of another platform's devices (a TPU program exported
  from a GPU host under `use_abstract_mesh`). Its cuda branch is never lowered, but cuDNN's attention is a primitive
  that needs devices to lower, and its mere presence in the traced program makes lowering for an abstract mesh fail.
  (On a host without cuDNN the call raises, and `_dense` falls back to the block route the same way.)"""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device is None or device.platform in ("gpu", "cuda")


def _decode_attention(q, k, v, kv_lengths, scale: float, widen: bool | None = None) -> jax.Array:
  """One query per sequence (T = 1, at position k_b - 1: causal or not, it sees every real key). [B, 1, N, H].

  Two dot_generals that read the cache in place, as stored ([B, S, K, H]); softmax in f32 between them,
  probabilities in the cache's dtype for the second, as flash attention does. Memory: the [B, N, S] f32 logits,
  O(S). The dots' batch dimensions must be a single stride of the cache, else XLA transposes it, and inside the
  model's decode loop that transpose is hoisted out of the loop: a second copy of the whole cache (32 GiB at 32K
  tokens and B = 8 for an 8B model, which then runs out of memory on an 80 GB card). So:
  - B = 1: the kv head is the batch dimension (the G query heads of a group against their head's keys; GEMVs at
    3.1 TB/s on the H200 at 128K, benchmarks/probe_decode_attention.py);
  - B > 1: the sequence is the only batch dimension and each query is widened to all K kv heads with zeros outside
    its own ([B, N, K * H]), so the contraction runs over the cache's contiguous K * H minor dims and a head's
    logits see only its kv head's keys. K times the multiply-adds of a memory-bound step; the same bytes read.
    The second dot returns [B, N, K * H] of which each head keeps its own kv head's H. Both dots see the caches
    as [B, S, K * H] (a free reshape): with (K, H) as two contracting dims XLA's GPU compiler kept the K cache as
    [B, K, H, S] for the whole decode loop, temporaries of half the cache (16.5 GiB at 32K, B = 8, 8B model), and
    each step was 10% slower (benchmarks/probe_decode_attention.py --in-loop; notes_model_prefill.md v10).
  `widen` forces either (None: B > 1), for benchmarks/probe_decode_attention.py.
  """
  B, S, K, H = k.shape
  widen = B > 1 if widen is None else widen
  N = q.shape[2]
  G = N // K
  f32 = jnp.float32
  if not widen:
    qg = q.reshape(B, K, G, H).astype(k.dtype)
    s = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=f32).reshape(B, N, S)
  else:
    own = (jnp.arange(N)[:, None] // G == jnp.arange(K)[None, :])[None, :, :, None]  # [1, N, K, 1]
    wide = jnp.where(own, q.reshape(B, N, 1, H), jnp.zeros((), q.dtype)).astype(k.dtype).reshape(B, N, K * H)
    s = lax.dot_general(wide, k.reshape(B, S, K * H), (((2,), (2,)), ((0,), (0,))), preferred_element_type=f32)
  s = s * scale
  real = jnp.arange(S, dtype=jnp.int32)[None, None, :] < kv_lengths[:, None, None]
  s = jnp.where(real, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1)  # [B, N]
  if not widen:
    pg = p.reshape(B, K, G, S).astype(v.dtype)
    o = jnp.einsum("bkgs,bskh->bkgh", pg, v, preferred_element_type=f32).reshape(B, N, H)
  else:
    flat_v = v.reshape(B, S, K * H)
    wide_o = lax.dot_general(p.astype(v.dtype), flat_v, (((2,), (1,)), ((0,), (0,))), preferred_element_type=f32)
    wide_o = wide_o.reshape(B, N, K, H)
    o = jnp.sum(jnp.where(own, wide_o, 0.0), axis=2)  # [B, N, K, H] -> each head's own kv head: [B, N, H]
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  return o.reshape(B, 1, N, H).astype(q.dtype)


def _mask(dims: _checks.Dims, q_lengths, kv_lengths, causal: bool) -> jax.Array:
  """bool [B, 1, T, S]: real keys, and with `causal` keys at or before the query's position k_b - q_b + t."""
  t = jnp.arange(dims.T, dtype=jnp.int32)[None, :, None]
  key = jnp.arange(dims.S, dtype=jnp.int32)[None, None, :]
  ok = key < kv_lengths[:, None, None]
  if causal:
    ok &= key <= (kv_lengths - q_lengths)[:, None, None] + t
  return ok[:, None]
