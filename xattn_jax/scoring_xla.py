"""Antidiagonal block scoring in plain XLA: the float32 reference of SPEC §1 (the "xla" backend).

The antidiagonal sum of the s x s cell (i, j) of q k^T is one matmul row of strided views:

    Kr[j] = k[j*s] | k[j*s+1] | ... | k[j*s+s-1]        (forward order, a free reshape of k)
    Qr[i] = q[i*s+s-1] | q[i*s+s-2] | ... | q[i*s]        (reversed inside the group)
    Z[i, j] = <Qr[i], Kr[j]> = sum_u <q[i*s+s-1-u], k[j*s+u]>

e.g. s = 2: Z[0, 0] = <q1, k0> + <q0, k1>, the antidiagonal of the 2 x 2 top-left cell. Other estimators
(`xattn_jax.estimators`, SPEC §1.7) only change the order of the tokens inside each Qr row.

Memory: the queries are processed in chunks of strided rows so that the [rows, S/s] logits of one chunk stay within
a budget; the softmax is over whole rows, so the result does not depend on the chunk size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from xattn_jax.estimators import Estimator, arrange_query_groups
from xattn_jax.geometry import Geometry, cdiv

# Bytes of float32 logits per query chunk; XLA keeps two or three such buffers alive (logits, exp, probabilities).
_LOGITS_BUDGET_BYTES = 64 * 2**20


def row_chunk_tokens(*, batch: int, heads: int, kv_len: int, stride: int, block_size: int, q_len: int) -> int:
  """Query tokens per chunk (a multiple of block_size) whose logits fit the budget."""
  bytes_per_block = batch * heads * (block_size // stride) * cdiv(kv_len, stride) * 4
  blocks = max(1, _LOGITS_BUDGET_BYTES // bytes_per_block)
  return min(blocks, cdiv(q_len, block_size)) * block_size


@functools.partial(
  jax.jit, static_argnames=("stride", "block_size", "causal", "scale", "query_chunk_size", "estimator")
)
def antidiagonal_scores(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  geometry: Geometry,
  *,
  stride: int,
  block_size: int,
  causal: bool,
  scale: float,
  query_chunk_size: int | None = None,
  estimator: Estimator = Estimator.ANTIDIAGONAL,
) -> jax.Array:  # f32 [B, N, ceil(T/block_size), ceil(S/block_size)]
  """SPEC §1 block scores, float32, for validated inputs (see `xattn_jax.antidiagonal_scores`)."""
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  G, s, blk = N // K, stride, block_size
  nqb, nkb = cdiv(T, blk), cdiv(S, blk)
  chunk = query_chunk_size or row_chunk_tokens(batch=B, heads=N, kv_len=S, stride=s, block_size=blk, q_len=T)
  n_chunks = cdiv(nqb * blk, chunk)
  rows, cols = chunk // s, nkb * blk // s

  # Padding tokens count as zero vectors (SPEC §1.1), whatever their stored values.
  t = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
  # q stays in its dtype until a chunk is used (a float32 copy of all of it would be O(T) memory beyond q).
  qf = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - T), (0, 0), (0, 0)))
  qf = jnp.where((t[None, :] < geometry.q_lengths[:, None])[..., None, None], qf, jnp.zeros((), q.dtype))
  j = jnp.arange(nkb * blk, dtype=jnp.int32)
  kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nkb * blk - S), (0, 0), (0, 0)))
  kf = jnp.where((j[None, :] < geometry.kv_lengths[:, None])[..., None, None], kf, 0.0)

  kr = kf.reshape(B, cols, s, K, H).transpose(0, 3, 1, 2, 4).reshape(B, K, cols, s * H)
  qr = arrange_query_groups(qf.reshape(B, n_chunks * rows, s, K, G, H), estimator, row_axis=1, slot_axis=2)
  qr = qr.reshape(B, n_chunks, rows, s, K, G, H).transpose(1, 0, 4, 5, 2, 3, 6).reshape(n_chunks, B, K, G, rows, s * H)

  col = jnp.arange(cols, dtype=jnp.int32) * s  # first key token of each strided column
  col_ok = col[None, None, :] < geometry.kv_lengths[:, None, None]  # [B, 1, cols]

  def chunk_scores(args):
    qc, c = args  # [B, K, G, rows, s*H], chunk index
    qc = qc.astype(jnp.float32)
    z = jnp.einsum("bkgid,bkjd->bkgij", qc, kr, precision=lax.Precision.HIGHEST) * (scale / s)
    first = (c * rows + jnp.arange(rows, dtype=jnp.int32)) * s  # first query token of each strided row
    q_len = geometry.q_lengths[:, None]
    row_ok = first[None, :] < q_len  # [B, rows]
    ok = row_ok[:, :, None] & col_ok
    if causal:
      p_last = geometry.q_positions[:, None] + jnp.minimum(first[None, :] + s - 1, q_len - 1)
      ok &= col[None, None, :] <= p_last[:, :, None]
    ok = ok[:, None, None]  # [B, 1, 1, rows, cols]
    z = jnp.where(ok, z, -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(m > -jnp.inf, m, 0.0)  # rows with nothing allowed: exp(-inf - 0) = 0, no NaN
    e = jnp.exp(z - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    per = blk // s
    a = p.reshape(B, K, G, rows // per, per, nkb, per).sum(axis=(4, 6))
    return a.reshape(B, N, rows // per, nkb)

  a = lax.map(chunk_scores, (qr, jnp.arange(n_chunks, dtype=jnp.int32)))  # [n_chunks, B, N, chunk/blk, nKb]
  a = a.transpose(1, 2, 0, 3, 4).reshape(B, N, n_chunks * (chunk // blk), nkb)
  return a[:, :, :nqb]
