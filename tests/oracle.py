"""An independent float64 NumPy oracle of SPEC §1, §2 and §4, written from the SPEC text, token by token.

It calls no library code: loops and plain matrices, slow and obvious, for small shapes only.
"""

from __future__ import annotations

import math

import numpy as np


def _lengths(lengths, batch, full):
  return [full] * batch if lengths is None else [int(x) for x in np.asarray(lengths)]


def block_geometry(r: int, *, block_size: int, q_len: int, kv_len: int, causal: bool):
  """(last allowed key block or -1, diagonal key block or None) of query block r (SPEC §2.1-2.2)."""
  first = r * block_size
  if first >= q_len:
    return -1, None
  last_query = min(first + block_size, q_len) - 1
  p_last = kv_len - q_len + last_query
  diagonal = p_last // block_size
  if causal:
    return diagonal, diagonal
  return (kv_len - 1) // block_size if kv_len > 0 else -1, diagonal


def scores(q, k, *, stride, block_size, causal, scale=None, q_lens=None, kv_lens=None, estimator="antidiagonal"):
  """SPEC §1: float64 [B, N, ceil(T/blk), ceil(S/blk)]; `estimator` as SPEC §1.7."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G, s, blk = N // K, stride, block_size
  scale = 1 / math.sqrt(H) if scale is None else scale
  rows, cols = math.ceil(T / s), math.ceil(S / s)
  nqb, nkb = math.ceil(T / blk), math.ceil(S / blk)
  q_lens, kv_lens = _lengths(q_lens, B, T), _lengths(kv_lens, B, S)
  out = np.zeros((B, N, nqb, nkb))
  for b in range(B):
    qb, kb = q_lens[b], kv_lens[b]
    for n in range(N):
      qq = np.zeros((rows * s, H))
      qq[:qb] = q[b, :qb, n]  # padding tokens are zero vectors
      kk = np.zeros((cols * s, H))
      kk[:kb] = k[b, :kb, n // G]
      logits = qq @ kk.T
      # z[i, j] = sum_u <q[i*s + o_i(u)], k[j*s + u]>: o_i(u) = s-1-u, the antidiagonal of cell (i, j); the
      # alternating estimator's odd rows take o_i(u) = (s - u) mod s
      z = np.zeros((rows, cols))
      for i in range(rows):
        for u in range(s):
          o = (s - u) % s if estimator == "alternating" and i % 2 else s - 1 - u
          z[i] += logits[i * s + o, u::s]
      z *= scale / s
      p = np.zeros((rows, cols))
      for i in range(rows):
        if i * s >= qb:
          continue
        pos = kb - qb + min(i * s + s - 1, qb - 1)
        ok = np.array([j * s < kb and (not causal or j * s <= pos) for j in range(cols)])
        if not ok.any():
          continue
        e = np.where(ok, np.exp(z[i] - z[i][ok].max()), 0.0)
        p[i] = e / e.sum()
      per = blk // s
      for r in range(nqb):
        for c in range(nkb):
          out[b, n, r, c] = p[r * per : (r + 1) * per, c * per : (c + 1) * per].sum()
  return out


def select(
  scores_,
  *,
  q_len,
  kv_len,
  block_size,
  threshold,
  causal,
  keep_sink=True,
  keep_diagonal=True,
  keep_top_neighbors=False,
  q_lens=None,
  kv_lens=None,
):
  """SPEC §2: bool [B, N, nQb, nKb], visiting blocks one by one."""
  a = np.asarray(scores_, np.float64)
  B, N, nqb, nkb = a.shape
  tau = np.broadcast_to(np.asarray(threshold, np.float64), (N,))
  q_lens, kv_lens = _lengths(q_lens, B, q_len), _lengths(kv_lens, B, kv_len)
  mask = np.zeros(a.shape, bool)
  for b in range(B):
    for n in range(N):
      for r in range(nqb):
        last, diag = block_geometry(r, block_size=block_size, q_len=q_lens[b], kv_len=kv_lens[b], causal=causal)
        allowed = list(range(last + 1))
        if not allowed:
          continue
        forced = set()
        if keep_sink:
          forced.add(0)
        if causal or keep_diagonal:
          forced.add(diag)
        forced &= set(allowed)
        row = a[b, n, r]
        if tau[n] >= 1:
          chosen = set(allowed)
        else:
          need = tau[n] * sum(row[c] for c in allowed)
          chosen = set(forced)
          mass = sum(row[c] for c in forced)
          others = sorted(set(allowed) - forced, key=lambda c: (-row[c], c))
          for visit, c in enumerate(others):
            if mass < need or (not forced and visit == 0):
              chosen.add(c)
              mass += row[c]
          if keep_top_neighbors and tau[n] > 0:  # §2.7
            top = min(allowed, key=lambda c: (-row[c], c))
            chosen |= {top - 1, top + 1} & set(allowed)
        mask[b, n, r, sorted(chosen)] = True
  return mask


def attention(q, k, v, block_mask, *, block_size, causal, scale=None, q_lens=None, kv_lens=None):
  """SPEC §4 from a dense block mask: (out float64 [B, T, N, H], lse float64 [B, N, T])."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  scale = 1 / math.sqrt(H) if scale is None else scale
  q_lens, kv_lens = _lengths(q_lens, B, T), _lengths(kv_lens, B, S)
  out = np.zeros((B, T, N, H))
  lse = np.full((B, N, T), -np.inf)
  for b in range(B):
    qb, kb = q_lens[b], kv_lens[b]
    for n in range(N):
      logits = q[b, :, n] @ k[b, :, n // G].T * scale
      t_idx, j_idx = np.arange(T)[:, None], np.arange(S)[None, :]
      allowed = (j_idx < kb) & block_mask[b, n][t_idx // block_size, j_idx // block_size]
      if causal:
        allowed &= j_idx <= kb - qb + t_idx
      for t in range(qb):
        ok = allowed[t]
        if not ok.any():
          continue
        m = logits[t][ok].max()
        e = np.where(ok, np.exp(logits[t] - m), 0.0)
        out[b, t, n] = e @ v[b, :, n // G] / e.sum()
        lse[b, n, t] = m + np.log(e.sum())
  return out, lse
