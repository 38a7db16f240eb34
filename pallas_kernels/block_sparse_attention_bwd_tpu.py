"""Block-sparse flash attention backward for TPU (Pallas, Mosaic TPU lowering): a dQ kernel and a dK/dV kernel.

The FlashAttention-2 backward of `xattn_jax.attention_xla_bwd`, restricted to the layout's blocks. With
P = exp(S - lse) recomputed from the forward's float32 lse, D = rowsum(dO * O) and dS = P * (dP - D + dlse):

    dQ_r  = scale * sum over key blocks c selected by row r             dS_rc K_c
    dK_c  = scale * sum over (query head n of kv head, row r) selecting c  dS_rc^T Q_r
    dV_c  =         sum over the same (n, r)                               P_rc^T dO_r

XLA prepares, per (b, n, query block r), one `stats` tile [2, 128] f32: row 0 = lse where the query is real and
saw a key, +inf elsewhere (so P = exp(S - inf) = 0: padding queries and queries that attended to nothing contribute
nothing, with no mask and no NaN), row 1 = D - dlse (0 for those queries). Nothing of size T x S is ever stored.

dQ kernel -- grid (B, N, chunks of `dq_block_rows` query blocks), every step self-contained ("parallel"), the
forward's loop structure with the roles of the operands unchanged:

    for row r in chunk:                       q, dO [b, r*128:(r+1)*128, n], stats[b, n, r]  (DMAs, two slots)
      lse, D-dlse -> lane-replicated columns  (one 128x128 transpose per row, into VMEM scratch)
      for j < counts[b, n, r]:                c = indices[b, n, r, j]   (index row DMA'd into SMEM per row)
        S = q K_c^T * scale; P = exp(S - lse); dP = dO V_c^T; dS = P * (dP - (D - dlse))
        dQ_acc += dS K_c                      K/V [b, c*128:(c+1)*128, n//G]  (two slots, prefetched across rows)
      dQ row -> HBM (async DMA, double-buffered)

dK/dV kernel -- grid (B, K, chunks of `dkv_block_rows` key blocks), "parallel" as well: each step owns its key
blocks' dK/dV outright (no atomics, no second pass). It reads the TRANSPOSED layout (`layout.transposed_layout`: for
each (b, n, key block c) the ascending query blocks that selected c) with the G query heads of kv head h regrouped
next to each other, so that one DMA brings a key block's whole visit list. For G = 2, nQb = 4, key block c:

    head n = 2h    : tcounts 2, tindices [1 3 3 3]     index row in SMEM  [1 3 3 3 | 0 2 2 2]   (G * nQb entries)
    head n = 2h+1  : tcounts 2, tindices [0 2 2 2]     counts  (2, 2)  -> visits v = 0..3:
                                                        v=0 (g=0, r=1)  v=1 (g=0, r=3)  v=2 (g=1, r=0)  v=3 (g=1, r=2)

    for key block c in chunk:                 K, V [b, c*128:(c+1)*128, h]  (two slots, next block's prefetched)
      for v < sum_g tcounts[b, hG+g, c]:      (g, r) of visit v; n = h*G + g
        S^T = K_c q_r^T * scale; P^T = exp(S^T - lse_row); dV_acc += P^T dO_r          (keys on sublanes, queries
        dP^T = V_c dO_r^T; dS^T = P^T * (dP^T - (D - dlse)_row); dK_acc += dS^T q_r      on lanes: the stats rows
      dK, dV rows -> HBM (async DMAs, double-buffered)                                    broadcast, no transpose)

Every operand is read in place from its [B, T|S, N|K, H] array with strided DMAs (GQA: nothing is repeated), and the
per-visit q / dO / stats copies are double-buffered across visits and across key blocks, like the forward's K/V.
Masks only where needed: a (query block r, key block c) pair needs the iota mask iff some key of c lies past kv_len
or, causal, past the position of r's first query -- two scalar compares per visit, as in the forward. Padding
queries need no mask (their lse is +inf).

SMEM (scalars; 1 MiB per core on v5e/v6e, budget asserted 256 KiB). Neither layout table enters SMEM whole:

    dQ   scalar prefetch 3 * B * 4 B + counts chunk dq_rows * 4 B + two index rows 2 * nKb * 4 B
    dKV  scalar prefetch 3 * B * 4 B + counts chunk dkv_rows * G * 4 B + two regrouped rows 2 * G * nQb * 4 B
    => at 32K tokens (nQb = nKb = 256), G = 4, 32 rows: dQ 12 + 128 + 2048 B ~ 2.1 KiB; dKV 12 + 512 + 8192 B ~ 8.5 KiB.

VMEM (dtype size d, blk = 128, H = 128, bf16; scratch only, nothing pipelined by BlockSpecs):

    dQ   q, dO, K, V, dQ slots  5 * 2 * blk * H * d = 320 KiB;  stats slots 2 * 8 * 128 * 4 = 8 KiB (2 rows pad to 8);
         lse / D columns 2 * blk * 128 * 4 = 128 KiB;  dQ acc blk * H * 4 = 64 KiB;  temps ~4 * blk * blk * 4 = 256 KiB
    dKV  q, dO, K, V, dK, dV slots 6 * 2 * blk * H * d = 384 KiB; stats slots 8 KiB; dK, dV acc 2 * 64 = 128 KiB;
         temps 256 KiB
    => ~0.8 MiB each, independent of T and S; asserted below 16 MiB (v5e's default scoped VMEM limit).

Numerics: logits, P, dP, dS and all accumulators are float32; for bf16 inputs P and dS are rounded to bf16 before
their matmuls (the MXU's native input); for float32 inputs every product uses Precision.HIGHEST.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xattn_jax.pallas_kernels.block_sparse_attention_tpu import (
  BLOCK,
  NUM_LANES,
  SMEM_BUDGET_BYTES,
  VMEM_BUDGET_BYTES,
  _row_bounds,
  supports,
)
from xattn_jax.pallas_kernels.common import NT, check_budget, pad_tokens
from xattn_jax.pallas_kernels.row_pipeline_tpu import RowPipeline, load_counts, program_items, when_masked
from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import BlockLayout, transposed_layout

_NN = (((1,), (0,)), ((), ()))  # a b
_STATS_ROWS = 2  # lse (or +inf), D - dlse


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackwardConfig:
  """Static kernel settings.

  Attributes:
    dq_block_rows: query blocks per dQ grid step (any positive int); amortizes the grid-step overhead.
    dkv_block_rows: key blocks per dK/dV grid step (any positive int).
  """

  dq_block_rows: int = 32
  dkv_block_rows: int = 32

  def __post_init__(self):
    for name in ("dq_block_rows", "dkv_block_rows"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


def smem_bytes(
  *, batch: int, num_q_blocks: int, num_kv_blocks: int, group: int, dq_rows: int, dkv_rows: int
) -> tuple[int, int]:
  """SMEM of (the dQ kernel, the dK/dV kernel), see the module docstring."""
  dq = 3 * batch * 4 + dq_rows * 4 + 2 * num_kv_blocks * 4
  dkv = 3 * batch * 4 + dkv_rows * group * 4 + 2 * group * num_q_blocks * 4
  return dq, dkv


def vmem_bytes(*, head_dim: int, dtype) -> tuple[int, int]:
  """VMEM of (the dQ kernel, the dK/dV kernel): scratch + an estimate of the compiler's temporaries."""
  d = jnp.dtype(dtype).itemsize
  lanes_h = max(head_dim, NUM_LANES)  # a 64-wide f32 row still occupies a 128-lane vreg row
  slot = 2 * BLOCK * head_dim * d  # two slots of one [128, H] operand
  stats = 2 * 8 * NUM_LANES * 4  # two [2, 128] f32 slots, padded to 8 sublanes
  acc = BLOCK * lanes_h * 4
  temps = 4 * BLOCK * BLOCK * 4  # S, P, dP, dS
  dq = 5 * slot + stats + 2 * BLOCK * NUM_LANES * 4 + acc + temps
  dkv = 6 * slot + stats + 2 * acc + temps
  return dq, dkv


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _dq_kernel(
  q_len_ref,
  kv_len_ref,
  q_pos_ref,  # scalar prefetch (SMEM) [B]
  q_hbm,
  k_hbm,
  v_hbm,
  do_hbm,
  stats_hbm,
  counts_hbm,
  indices_hbm,  # inputs (HBM)
  dq_hbm,  # output [B, Tp, N, H] (HBM)
  q_vmem,
  do_vmem,
  st_vmem,
  k_vmem,
  v_vmem,
  lse_col,
  dd_col,
  acc,
  dq_vmem,  # VMEM scratch
  cnt_smem,
  idx_smem,  # SMEM scratch
  q_sems,
  do_sems,
  st_sems,
  k_sems,
  v_sems,
  dq_sems,
  idx_sems,
  cnt_sem,  # DMA semaphores
  *,
  causal: bool,
  scale: float,
  group: int,
  num_q_blocks: int,
  rows: int,
):
  b, n, r0, n_rows = program_items(rows=rows, num_items=num_q_blocks)
  kv_head = lax.div(n, group)
  q_len, kv_len, q_pos = q_len_ref[b], kv_len_ref[b], q_pos_ref[b]
  precision = _precision(q_vmem.dtype)
  f32_inputs = q_vmem.dtype == jnp.float32

  load_counts(counts_hbm.at[b, n, pl.ds(r0, rows)], cnt_smem, cnt_sem.at[0])

  def row_copies(i):  # q, dO and stats of local row i
    slot, tokens = i % 2, pl.ds((r0 + i) * BLOCK, BLOCK)
    return (
      pltpu.make_async_copy(q_hbm.at[b, tokens, n], q_vmem.at[slot], q_sems.at[slot]),
      pltpu.make_async_copy(do_hbm.at[b, tokens, n], do_vmem.at[slot], do_sems.at[slot]),
      pltpu.make_async_copy(stats_hbm.at[b, n, r0 + i], st_vmem.at[slot], st_sems.at[slot]),
    )

  def dq_copy(i):
    dst = dq_hbm.at[b, pl.ds((r0 + i) * BLOCK, BLOCK), n]
    return pltpu.make_async_copy(dq_vmem.at[i % 2], dst, dq_sems.at[i % 2])

  def idx_copy(i):
    return pltpu.make_async_copy(indices_hbm.at[b, n, r0 + i], idx_smem.at[i % 2], idx_sems.at[i % 2])

  def kv_copies(slot, block):
    keys = pl.ds(block * BLOCK, BLOCK)
    return (
      pltpu.make_async_copy(k_hbm.at[b, keys, kv_head], k_vmem.at[slot], k_sems.at[slot]),
      pltpu.make_async_copy(v_hbm.at[b, keys, kv_head], v_vmem.at[slot], v_sems.at[slot]),
    )

  pipe = RowPipeline(
    n_rows, idx_copy, row_copies, lambda i: cnt_smem[i], lambda i, slot: kv_copies(slot, idx_smem[i % 2, 0])
  )
  pipe.prologue()  # row 0's index row, q / dO / stats, and first K/V block

  def row_body(i, slot0):
    r = r0 + i
    pipe.advance(i)

    steps = cnt_smem[i]
    _, visible = _row_bounds(r, q_len, kv_len, q_pos, causal=causal)
    stats = st_vmem[i % 2]  # [2, 128]: one lane-dense row per statistic
    # Lane-replicated columns: element (t, x) = stat of query t, for every lane x (the logits' layout).
    lse_col[...] = jnp.broadcast_to(stats[0:1, :], (BLOCK, NUM_LANES)).T
    dd_col[...] = jnp.broadcast_to(stats[1:2, :], (BLOCK, NUM_LANES)).T
    acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def update(block, slot, *, masked: bool):
      q, do = q_vmem[i % 2], do_vmem[i % 2]
      k, v = k_vmem[slot], v_vmem[slot]
      s = lax.dot_general(q, k, NT, precision=precision, preferred_element_type=jnp.float32) * scale
      if masked:
        keys = block * BLOCK + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        ok = keys < kv_len
        if causal:
          ok &= keys <= q_pos + r * BLOCK + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        s = jnp.where(ok, s, -jnp.inf)
      p = jnp.exp(s - lse_col[...])  # 0 where masked (-inf - x) and for dead queries (s - inf)
      dp = lax.dot_general(do, v, NT, precision=precision, preferred_element_type=jnp.float32)
      ds = p * (dp - dd_col[...])
      acc[...] += lax.dot_general(
        ds if f32_inputs else ds.astype(k.dtype), k, _NN, precision=precision, preferred_element_type=jnp.float32
      )

    def block_body(j, slot, carry):
      block = idx_smem[i % 2, j]
      when_masked((block + 1) * BLOCK > visible, functools.partial(update, block, slot))
      return carry

    copies = lambda slot, j: kv_copies(slot, 0 if j is None else idx_smem[i % 2, j])
    pipe.visit_loop(i, slot0, steps, copies, block_body, jnp.int32(0))

    @pl.when(i >= 2)
    def _():
      dq_copy(i - 2).wait()  # its slot is ours now

    dq_vmem[i % 2] = (acc[...] * scale).astype(dq_vmem.dtype)
    dq_copy(i).start()
    return slot0 + steps

  lax.fori_loop(0, n_rows, row_body, jnp.int32(0))

  @pl.when(n_rows >= 2)
  def _():
    dq_copy(n_rows - 2).wait()

  dq_copy(n_rows - 1).wait()


def _dkv_kernel(
  q_len_ref,
  kv_len_ref,
  q_pos_ref,  # scalar prefetch (SMEM) [B]
  q_hbm,
  k_hbm,
  v_hbm,
  do_hbm,
  stats_hbm,
  counts_hbm,
  indices_hbm,  # inputs (HBM)
  dk_hbm,
  dv_hbm,  # outputs [B, Sp, K, H] (HBM)
  q_vmem,
  do_vmem,
  st_vmem,
  k_vmem,
  v_vmem,
  dk_acc,
  dv_acc,
  dk_vmem,
  dv_vmem,  # VMEM scratch
  cnt_smem,
  idx_smem,  # SMEM scratch
  q_sems,
  do_sems,
  st_sems,
  k_sems,
  v_sems,
  dk_sems,
  dv_sems,
  idx_sems,
  cnt_sem,  # DMA semaphores
  *,
  causal: bool,
  scale: float,
  group: int,
  num_q_blocks: int,
  num_kv_blocks: int,
  rows: int,
):
  b, h, c0, n_rows = program_items(rows=rows, num_items=num_kv_blocks)
  q_len, kv_len, q_pos = q_len_ref[b], kv_len_ref[b], q_pos_ref[b]
  precision = _precision(q_vmem.dtype)
  f32_inputs = q_vmem.dtype == jnp.float32

  load_counts(counts_hbm.at[b, h, pl.program_id(2)], cnt_smem, cnt_sem.at[0])

  def count(i, g):  # query blocks of head h*G + g that selected local key block i
    return cnt_smem[i * group + g]

  def num_visits(i):
    total = count(i, 0)
    for g in range(1, group):
      total += count(i, g)
    return total

  def visit(i, v):
    """(g, query block r) of visit v of local key block i; its index row must be in SMEM."""
    start, g, base = jnp.int32(0), jnp.int32(0), jnp.int32(0)
    for gg in range(1, group):  # g = number of heads gg >= 1 whose visits start at or before v
      start += count(i, gg - 1)
      later = start <= v
      g += later.astype(jnp.int32)
      base = jnp.where(later, start, base)
    return g, idx_smem[i % 2, g * num_q_blocks + v - base]

  def visit_copies(slot, g, r):  # q, dO and stats of (head h*G + g, query block r)
    n, tokens = h * group + g, pl.ds(r * BLOCK, BLOCK)
    return (
      pltpu.make_async_copy(q_hbm.at[b, tokens, n], q_vmem.at[slot], q_sems.at[slot]),
      pltpu.make_async_copy(do_hbm.at[b, tokens, n], do_vmem.at[slot], do_sems.at[slot]),
      pltpu.make_async_copy(stats_hbm.at[b, n, r], st_vmem.at[slot], st_sems.at[slot]),
    )

  def kv_copies(i):
    slot, keys = i % 2, pl.ds((c0 + i) * BLOCK, BLOCK)
    return (
      pltpu.make_async_copy(k_hbm.at[b, keys, h], k_vmem.at[slot], k_sems.at[slot]),
      pltpu.make_async_copy(v_hbm.at[b, keys, h], v_vmem.at[slot], v_sems.at[slot]),
    )

  def out_copies(i):
    slot, keys = i % 2, pl.ds((c0 + i) * BLOCK, BLOCK)
    return (
      pltpu.make_async_copy(dk_vmem.at[slot], dk_hbm.at[b, keys, h], dk_sems.at[slot]),
      pltpu.make_async_copy(dv_vmem.at[slot], dv_hbm.at[b, keys, h], dv_sems.at[slot]),
    )

  def idx_copy(i):
    return pltpu.make_async_copy(indices_hbm.at[b, h, c0 + i], idx_smem.at[i % 2], idx_sems.at[i % 2])

  pipe = RowPipeline(n_rows, idx_copy, kv_copies, num_visits, lambda i, slot: visit_copies(slot, *visit(i, 0)))
  pipe.prologue()  # key block 0's index rows, K/V, and first visit

  def block_body(i, slot0):
    block = c0 + i
    pipe.advance(i)

    steps = num_visits(i)
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(r, slot, *, masked: bool):
      q, do, stats = q_vmem[slot], do_vmem[slot], st_vmem[slot]
      k, v = k_vmem[i % 2], v_vmem[i % 2]
      st = lax.dot_general(k, q, NT, precision=precision, preferred_element_type=jnp.float32) * scale
      if masked:  # keys on sublanes (dim 0), queries on lanes (dim 1)
        keys = block * BLOCK + lax.broadcasted_iota(jnp.int32, st.shape, 0)
        ok = keys < kv_len
        if causal:
          ok &= keys <= q_pos + r * BLOCK + lax.broadcasted_iota(jnp.int32, st.shape, 1)
        st = jnp.where(ok, st, -jnp.inf)
      pt = jnp.exp(st - stats[0:1, :])  # P^T; the lse row broadcasts over the key sublanes
      dv_acc[...] += lax.dot_general(
        pt if f32_inputs else pt.astype(do.dtype), do, _NN, precision=precision, preferred_element_type=jnp.float32
      )
      dpt = lax.dot_general(v, do, NT, precision=precision, preferred_element_type=jnp.float32)
      dst = pt * (dpt - stats[1:2, :])
      dk_acc[...] += lax.dot_general(
        dst if f32_inputs else dst.astype(q.dtype), q, _NN, precision=precision, preferred_element_type=jnp.float32
      )

    def visit_body(j, slot, carry):
      _, r = visit(i, j)
      _, visible = _row_bounds(r, q_len, kv_len, q_pos, causal=causal)
      when_masked((block + 1) * BLOCK > visible, functools.partial(update, r, slot))
      return carry

    copies = lambda slot, j: visit_copies(slot, 0, 0) if j is None else visit_copies(slot, *visit(i, j))
    pipe.visit_loop(i, slot0, steps, copies, visit_body, jnp.int32(0))

    @pl.when(i >= 2)
    def _():
      for cp in out_copies(i - 2):
        cp.wait()  # their slots are ours now

    dk_vmem[i % 2] = (dk_acc[...] * scale).astype(dk_vmem.dtype)
    dv_vmem[i % 2] = dv_acc[...].astype(dv_vmem.dtype)
    for cp in out_copies(i):
      cp.start()
    return slot0 + steps

  lax.fori_loop(0, n_rows, block_body, jnp.int32(0))

  @pl.when(n_rows >= 2)
  def _():
    for cp in out_copies(n_rows - 2):
      cp.wait()

  for cp in out_copies(n_rows - 1):
    cp.wait()


def _stats(out, lse, d_out, d_lse, geometry: Geometry, num_q_blocks: int):
  """f32 [B, N, nQb, 2, 128]: (lse, or +inf for queries that contribute nothing; D - dlse, or 0 there)."""
  B, T, N, _ = out.shape
  tokens = jnp.arange(T, dtype=jnp.int32)
  live = (tokens[None, None, :] < geometry.q_lengths[:, None, None]) & (lse > -jnp.inf)  # [B, N, T]
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # D [B, N, T]
  lse_safe = jnp.where(live, lse, jnp.inf)
  dd = jnp.where(live, delta - d_lse.astype(jnp.float32), 0.0)
  pad = ((0, 0), (0, 0), (0, num_q_blocks * BLOCK - T))
  lse_safe = jnp.pad(lse_safe, pad, constant_values=jnp.inf).reshape(B, N, num_q_blocks, 1, BLOCK)
  dd = jnp.pad(dd, pad).reshape(B, N, num_q_blocks, 1, BLOCK)
  return jnp.concatenate([lse_safe, dd], axis=3)


def _kv_side_tables(layout: BlockLayout, *, kv_heads: int, rows: int):
  """The transposed layout regrouped per kv head (see the module docstring).

  Returns:
    counts: int32 [B, K, chunks, rows * G]: entry i * G + g = query blocks of head h*G + g selecting key block
      chunk * rows + i (0 past nKb).
    indices: int32 [B, K, nKb, G * nQb]: the G transposed rows of each key block side by side.
  """
  B, N, nqb, nkb = layout.shape
  G = N // kv_heads
  counts, indices = transposed_layout(layout)  # [B, N, nKb], [B, N, nKb, nQb]
  n_chunks = cdiv(nkb, rows)
  counts = counts.reshape(B, kv_heads, G, nkb).transpose(0, 1, 3, 2)  # [B, K, nKb, G]
  counts = jnp.pad(counts, ((0, 0), (0, 0), (0, n_chunks * rows - nkb), (0, 0)))
  counts = counts.reshape(B, kv_heads, n_chunks, rows * G)
  indices = indices.reshape(B, kv_heads, G, nkb, nqb).transpose(0, 1, 3, 2, 4).reshape(B, kv_heads, nkb, G * nqb)
  return counts, indices


@functools.partial(jax.jit, static_argnames=("causal", "scale", "config", "interpret"))
def block_sparse_attention_bwd(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  out: jax.Array,  # [B, T, N, H], the forward output
  lse: jax.Array,  # f32 [B, N, T], the forward log-sum-exp (-inf: the query attended to nothing)
  d_out: jax.Array,  # [B, T, N, H]
  d_lse: jax.Array,  # f32 [B, N, T]
  layout: BlockLayout,  # (B, N, ceil(T/128), ceil(S/128)), validated
  geometry: Geometry,
  *,
  causal: bool,
  scale: float,
  config: BackwardConfig = BackwardConfig(),
  interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) in the dtypes of q, k, v; the same gradients as `attention_xla_bwd.block_sparse_attention_bwd`.

  Raises:
    NotImplementedError: dtype, head dim or block size the kernels do not cover, or layout rows too long for SMEM.
  """
  reason = supports(q, k, layout)
  if reason is not None:
    raise NotImplementedError(f"pallas_tpu block_sparse_attention backward does not support {reason}")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  G = N // K
  nqb, nkb = cdiv(T, BLOCK), cdiv(S, BLOCK)
  dq_rows, dkv_rows = min(config.dq_block_rows, nqb), min(config.dkv_block_rows, nkb)
  dq_chunks, dkv_chunks = cdiv(nqb, dq_rows), cdiv(nkb, dkv_rows)
  smem = smem_bytes(batch=B, num_q_blocks=nqb, num_kv_blocks=nkb, group=G, dq_rows=dq_rows, dkv_rows=dkv_rows)
  if max(smem) > SMEM_BUDGET_BYTES:
    raise NotImplementedError(
      f"pallas_tpu block_sparse_attention backward needs {smem} B of SMEM (dQ, dKV) > {SMEM_BUDGET_BYTES}"
    )
  vmem = vmem_bytes(head_dim=H, dtype=q.dtype)
  check_budget("pallas_tpu block_sparse_attention backward", "VMEM", max(vmem), VMEM_BUDGET_BYTES)

  stats = _stats(out, lse, d_out, d_lse, geometry, nqb)
  q, d_out = pad_tokens(q, nqb * BLOCK), pad_tokens(d_out.astype(q.dtype), nqb * BLOCK)
  k, v = pad_tokens(k, nkb * BLOCK), pad_tokens(v, nkb * BLOCK)
  counts = layout.counts
  if dq_chunks * dq_rows != nqb:  # the last step's counts DMA reads a whole chunk
    counts = jnp.pad(counts, ((0, 0), (0, 0), (0, dq_chunks * dq_rows - nqb)))
  t_counts, t_indices = _kv_side_tables(layout, kv_heads=K, rows=dkv_rows)
  scalars = (geometry.q_lengths, geometry.kv_lengths, geometry.q_positions)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3, vmem_limit_bytes=VMEM_BUDGET_BYTES)
  dma = pltpu.SemaphoreType.DMA

  dq = pl.pallas_call(
    functools.partial(_dq_kernel, causal=causal, scale=scale, group=G, num_q_blocks=nqb, rows=dq_rows),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, N, dq_chunks),
      in_specs=[any_spec] * 7,
      out_specs=any_spec,
      scratch_shapes=[
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # q slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # dO slots
        pltpu.VMEM((2, _STATS_ROWS, BLOCK), jnp.float32),  # stats slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # k slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # v slots
        pltpu.VMEM((BLOCK, NUM_LANES), jnp.float32),  # lse column
        pltpu.VMEM((BLOCK, NUM_LANES), jnp.float32),  # D - dlse column
        pltpu.VMEM((BLOCK, H), jnp.float32),  # dQ accumulator
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # dQ slots
        pltpu.SMEM((dq_rows,), jnp.int32),  # counts of the step's rows
        pltpu.SMEM((2, nkb), jnp.int32),  # index rows
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((1,)),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((B, nqb * BLOCK, N, H), q.dtype),
    compiler_params=params,
    interpret=interpret,
    name="xattn_block_sparse_attention_bwd_dq",
  )(*scalars, q, k, v, d_out, stats, counts, layout.indices)

  dk, dv = pl.pallas_call(
    functools.partial(
      _dkv_kernel, causal=causal, scale=scale, group=G, num_q_blocks=nqb, num_kv_blocks=nkb, rows=dkv_rows
    ),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, K, dkv_chunks),
      in_specs=[any_spec] * 7,
      out_specs=[any_spec, any_spec],
      scratch_shapes=[
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # q slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # dO slots
        pltpu.VMEM((2, _STATS_ROWS, BLOCK), jnp.float32),  # stats slots
        pltpu.VMEM((2, BLOCK, H), k.dtype),  # k slots
        pltpu.VMEM((2, BLOCK, H), v.dtype),  # v slots
        pltpu.VMEM((BLOCK, H), jnp.float32),  # dK accumulator
        pltpu.VMEM((BLOCK, H), jnp.float32),  # dV accumulator
        pltpu.VMEM((2, BLOCK, H), k.dtype),  # dK slots
        pltpu.VMEM((2, BLOCK, H), v.dtype),  # dV slots
        pltpu.SMEM((dkv_rows * G,), jnp.int32),  # counts of the step's key blocks, per head
        pltpu.SMEM((2, G * nqb), jnp.int32),  # regrouped transposed index rows
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((2,)),
        dma((1,)),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((B, nkb * BLOCK, K, H), k.dtype),
      jax.ShapeDtypeStruct((B, nkb * BLOCK, K, H), v.dtype),
    ],
    compiler_params=params,
    interpret=interpret,
    name="xattn_block_sparse_attention_bwd_dkv",
  )(*scalars, q, k, v, d_out, stats, t_counts, t_indices)
  return dq[:, :T], dk[:, :S], dv[:, :S]
