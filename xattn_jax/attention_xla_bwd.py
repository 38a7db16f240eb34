"""Backward of block-sparse attention in plain XLA: gradients for q, k, v recomputed blockwise from the saved lse.

FlashAttention-2's backward restricted to the layout's blocks. With P = exp(S - lse) (the forward's probabilities,
recomputed block by block from the float32 lse, so nothing of size T x S is kept), D = rowsum(dO * O):

    dV_c += P^T dO        dP = dO V_c^T        dS = P * (dP - D + dlse)        dQ += dS K_c * scale
    dK_c += dS^T Q * scale

for every (query block r, selected key block c). Same visiting order and chunking as the forward
(`attention_xla`): a query chunk gathers the j-th selected block of every row per step; dK and dV are scattered back
with `.at[].add` and summed over the G query heads that share a kv head (GQA). The mask is constant: no gradient flows
through the block selection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from xattn_jax.attention_xla import query_chunk_blocks
from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import BlockLayout


@functools.partial(jax.jit, static_argnames=("causal", "scale", "query_chunk_size"))
def block_sparse_attention_bwd(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  out: jax.Array,  # [B, T, N, H], the forward output
  lse: jax.Array,  # f32 [B, N, T], the forward log-sum-exp (-inf: the query attended to nothing)
  d_out: jax.Array,  # [B, T, N, H]
  d_lse: jax.Array,  # f32 [B, N, T]
  layout: BlockLayout,
  geometry: Geometry,
  *,
  causal: bool,
  scale: float,
  query_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) in the dtypes of q, k, v."""
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  G, blk = N // K, layout.block_size
  nqb, nkb = cdiv(T, blk), cdiv(S, blk)
  cb = (
    (query_chunk_size // blk)
    if query_chunk_size
    else query_chunk_blocks(batch=B, heads=N, head_dim=H, block_size=blk, num_q_blocks=nqb)
  )
  n_chunks = cdiv(nqb, cb)
  tp = n_chunks * cb * blk

  def chunked(x, fill=0.0):  # [B, T, N, H] -> [C, B, K, G, cb, blk, H] float32
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, tp - T), (0, 0), (0, 0)), constant_values=fill)
    return x.reshape(B, n_chunks, cb, blk, K, G, H).transpose(1, 0, 4, 5, 2, 3, 6)

  def chunked_rows(x, fill):  # [B, N, T] -> [C, B, K, G, cb, blk]
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, tp - T)), constant_values=fill)
    return x.reshape(B, K, G, n_chunks, cb, blk).transpose(3, 0, 1, 2, 4, 5)

  qc, doc = chunked(q), chunked(d_out)
  delta = jnp.sum(chunked(out) * doc, axis=-1)  # D = rowsum(dO * O)  [C, B, K, G, cb, blk]
  lse_c = chunked_rows(lse, -jnp.inf)
  dlse_c = chunked_rows(d_lse, 0.0)
  pad_rows = ((0, 0), (0, 0), (0, n_chunks * cb - nqb))
  counts = jnp.pad(layout.counts, pad_rows).reshape(B, K, G, n_chunks, cb).transpose(3, 0, 1, 2, 4)
  indices = jnp.pad(layout.indices, pad_rows + ((0, 0),))
  indices = indices.reshape(B, K, G, n_chunks, cb, nkb).transpose(3, 0, 1, 2, 4, 5)

  def kv_blocks(x):  # [B, S, K, H] -> [B, K, 1, nKb, blk, H]
    x = jnp.pad(x, ((0, 0), (0, nkb * blk - S), (0, 0), (0, 0))).astype(jnp.float32)
    return x.reshape(B, nkb, blk, K, H).transpose(0, 3, 1, 2, 4)[:, :, None]

  kb, vb = kv_blocks(k), kv_blocks(v)
  q_len = geometry.q_lengths[:, None, None, None, None]
  kv_len = geometry.kv_lengths[:, None, None, None, None, None]
  key_in_block = jnp.arange(blk, dtype=jnp.int32)
  hi = lax.Precision.HIGHEST
  b_ix = jnp.arange(B)[:, None, None]
  k_ix = jnp.arange(K)[None, :, None]

  def chunk_bwd(carry, args):
    dk, dv = carry  # [B, K, nKb, blk, H] float32
    qi, doi, di, lse_i, dlse_i, cnt, idx, c = args
    t = c * cb * blk + jnp.arange(cb * blk, dtype=jnp.int32).reshape(cb, blk)
    q_ok = t < q_len
    pos = geometry.q_positions[:, None, None, None, None] + t
    live = q_ok & (lse_i > -jnp.inf)  # [B, K, G, cb, blk]
    lse_safe = jnp.where(live, lse_i, 0.0)

    def step(j, carry):
      dq_i, dk, dv = carry
      bid = lax.dynamic_index_in_dim(idx, j, axis=-1, keepdims=False)  # [B, K, G, cb]
      gather = bid[..., None, None]
      kj = jnp.take_along_axis(kb, gather, axis=3)  # [B, K, G, cb, blk, H]
      vj = jnp.take_along_axis(vb, gather, axis=3)
      s = jnp.einsum("bkgqth,bkgqsh->bkgqts", qi, kj, precision=hi) * scale
      key = bid[..., None, None] * blk + key_in_block
      ok = live[..., None] & (key < kv_len) & (j < cnt)[..., None, None]
      if causal:
        ok &= key <= pos[..., None]
      p = jnp.where(ok, jnp.exp(jnp.where(ok, s, 0.0) - lse_safe[..., None]), 0.0)
      dp = jnp.einsum("bkgqth,bkgqsh->bkgqts", doi, vj, precision=hi)
      ds = p * (dp - di[..., None] + dlse_i[..., None])
      dq_i = dq_i + jnp.einsum("bkgqts,bkgqsh->bkgqth", ds, kj, precision=hi) * scale
      # Sum over the G query heads of each kv head, then scatter-add into the selected blocks.
      dv_j = jnp.einsum("bkgqts,bkgqth->bkgqsh", p, doi, precision=hi)
      dk_j = jnp.einsum("bkgqts,bkgqth->bkgqsh", ds, qi, precision=hi) * scale
      rows = (b_ix, k_ix, bid.reshape(B, K, G * cb))  # block index of every (b, kv head, g, query block)
      dk = dk.at[rows].add(dk_j.reshape(B, K, G * cb, blk, H))
      dv = dv.at[rows].add(dv_j.reshape(B, K, G * cb, blk, H))
      return dq_i, dk, dv

    dq_i, dk, dv = lax.fori_loop(0, jnp.max(cnt), step, (jnp.zeros_like(qi), dk, dv))
    return (dk, dv), dq_i

  zeros = jnp.zeros((B, K, nkb, blk, H), jnp.float32)
  (dk, dv), dq = lax.scan(
    chunk_bwd, (zeros, zeros), (qc, doc, delta, lse_c, dlse_c, counts, indices, jnp.arange(n_chunks, dtype=jnp.int32))
  )
  dq = dq.transpose(1, 0, 4, 5, 2, 3, 6).reshape(B, tp, N, H)[:, :T]
  unblock = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(B, nkb * blk, K, H)[:, :S]
  return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)
