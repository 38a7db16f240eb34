"""Block-sparse attention in plain XLA: the float32 reference of SPEC §4 (the "xla" backend).

Flash-attention order: for each query block, the selected key blocks are visited in ascending order with an online
softmax (running max m_i, running sum l_i, accumulator acc), so with every block selected the arithmetic is that of a
dense blockwise attention. Work is proportional to the number of selected blocks: step j gathers the j-th selected
block of every row, and the loop runs max(counts) steps per query chunk. Memory is bounded by query chunking
(gathered K/V and logits of one chunk), never O(T*S).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import BlockLayout

# Bytes of float32 working set per query chunk (gathered K and V blocks, logits, probabilities).
_WORKSET_BUDGET_BYTES = 64 * 2**20


def query_chunk_blocks(*, batch: int, heads: int, head_dim: int, block_size: int, num_q_blocks: int) -> int:
  per_block = batch * heads * block_size * (2 * head_dim + 3 * block_size) * 4
  return max(1, min(num_q_blocks, _WORKSET_BUDGET_BYTES // per_block))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "query_chunk_size"))
def block_sparse_attention(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  layout: BlockLayout,  # (B, N, ceil(T/blk), ceil(S/blk))
  geometry: Geometry,
  *,
  causal: bool,
  scale: float,
  query_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # out [B, T, N, H] (q.dtype), lse f32 [B, N, T]
  """SPEC §4 on validated inputs (see `xattn_jax.block_sparse_attention`)."""
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

  # Inputs stay in their dtype until a chunk (q) or a gathered block (K, V) is used: float32 copies of whole
  # arrays would add O(T) memory beyond the inputs (3x q at bf16).
  qf = jnp.pad(q, ((0, 0), (0, tp - T), (0, 0), (0, 0)))
  qf = qf.reshape(B, n_chunks, cb, blk, K, G, H).transpose(1, 0, 4, 5, 2, 3, 6)  # [C, B, K, G, cb, blk, H]
  pad_rows = ((0, 0), (0, 0), (0, n_chunks * cb - nqb))
  counts = jnp.pad(layout.counts, pad_rows).reshape(B, K, G, n_chunks, cb).transpose(3, 0, 1, 2, 4)
  indices = jnp.pad(layout.indices, pad_rows + ((0, 0),))
  indices = indices.reshape(B, K, G, n_chunks, cb, nkb).transpose(3, 0, 1, 2, 4, 5)  # [C, B, K, G, cb, nKb]

  def kv_blocks(x):  # [B, S, K, H] -> [B, K, 1, nKb, blk, H]; K/V are gathered per step, never repeated per head
    x = jnp.pad(x, ((0, 0), (0, nkb * blk - S), (0, 0), (0, 0)))
    return x.reshape(B, nkb, blk, K, H).transpose(0, 3, 1, 2, 4)[:, :, None]

  kb, vb = kv_blocks(k), kv_blocks(v)
  q_len = geometry.q_lengths[:, None, None, None, None]
  kv_len = geometry.kv_lengths[:, None, None, None, None, None]
  key_in_block = jnp.arange(blk, dtype=jnp.int32)

  def chunk_attention(args):
    qc, cnt, idx, c = args
    qc = qc.astype(jnp.float32)
    t = c * cb * blk + jnp.arange(cb * blk, dtype=jnp.int32).reshape(cb, blk)  # query index in the call
    q_ok = t < q_len  # [B, 1, 1, cb, blk]
    pos = geometry.q_positions[:, None, None, None, None] + t

    def step(j, carry):
      m_i, l_i, acc = carry
      bid = lax.dynamic_index_in_dim(idx, j, axis=-1, keepdims=False)  # [B, K, G, cb]
      gather = bid[..., None, None]
      kj = jnp.take_along_axis(kb, gather, axis=3).astype(jnp.float32)  # [B, K, G, cb, blk, H]
      vj = jnp.take_along_axis(vb, gather, axis=3).astype(jnp.float32)
      s = jnp.einsum("bkgqth,bkgqsh->bkgqts", qc, kj, precision=lax.Precision.HIGHEST) * scale
      key = bid[..., None, None] * blk + key_in_block  # [B, K, G, cb, 1, blk]
      ok = q_ok[..., None] & (key < kv_len) & (j < cnt)[..., None, None]
      if causal:
        ok &= key <= pos[..., None]
      s = jnp.where(ok, s, -jnp.inf)
      m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
      m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # all masked so far: exp(-inf - 0) = 0, no NaN
      alpha = jnp.exp(m_i - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      l_i = alpha * l_i + jnp.sum(p, axis=-1)
      acc = alpha[..., None] * acc + jnp.einsum("bkgqts,bkgqsh->bkgqth", p, vj, precision=lax.Precision.HIGHEST)
      return m_new, l_i, acc

    init = (
      jnp.full(qc.shape[:-1], -jnp.inf, jnp.float32),
      jnp.zeros(qc.shape[:-1], jnp.float32),
      jnp.zeros(qc.shape, jnp.float32),
    )
    m_i, l_i, acc = lax.fori_loop(0, jnp.max(cnt), step, init)
    live = l_i > 0
    out = acc / jnp.where(live, l_i, 1.0)[..., None]
    lse = jnp.where(live, m_i + jnp.log(jnp.where(live, l_i, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse

  out, lse = lax.map(chunk_attention, (qf, counts, indices, jnp.arange(n_chunks, dtype=jnp.int32)))
  out = out.transpose(1, 0, 4, 5, 2, 3, 6).reshape(B, tp, N, H)[:, :T]  # [C, B, K, G, cb, blk, H] -> [B, T, N, H]
  lse = lse.transpose(1, 2, 3, 0, 4, 5).reshape(B, N, tp)[:, :, :T]
  return out, lse
