"""Block-sparse flash attention backward for Hopper (Pallas Mosaic GPU, `plgpu.kernel`): a dQ and a dK/dV kernel.

The FlashAttention-2 backward of `xattn_jax.attention_xla_bwd`, restricted to the layout's blocks. With
P = exp(S - lse) recomputed from the forward's float32 lse, D = rowsum(dO * O) and dS = P * (dP - D + dlse):

    dQ_r = scale * sum over key blocks c selected by row r                dS_rc K_c
    dK_c = scale * sum over (query head n of kv head h, row r) selecting c  dS_rc^T Q_r
    dV_c =         sum over the same (n, r)                                 P_rc^T dO_r

XLA prepares two float32 row statistics per (b, n, query): `lse2` = lse * log2(e) where the query is real and saw a
key, +inf elsewhere (so P = exp2(S * scale * log2(e) - inf) = 0: padding queries and queries that attended to
nothing contribute nothing, with no extra mask and no NaN), and `dd` = D - dlse (0 for those queries). Nothing of
size T x S is ever stored.

dQ kernel -- one CTA per layout row (b, query head n, query block r), grid (N, nQb, B) so that the G query heads of
one kv head run next to each other and share K/V in L2; the rows run last query block first (the longest rows of a
causal layout start first, as the forward's longest-first order). Three warpgroups:

    WG0, WG1 (consumers)  query rows [r*128 + 64*wg, +64): Q, dO, lse2, dd loaded once (TMA), then per step j:
                          S = Q K_c^T (wgmma) -> P = exp2(S*scale*log2e - lse2); dP = dO V_c^T (wgmma)
                          dS = P * (dP - dd) -> dQ_acc += dS K_c (wgmma, f32 accumulator in registers)
    WG2 (producer)        TMA copies of K_c and V_c, c = indices[b, n, r, j] (data-dependent offsets), into a ring
                          of `num_stages` slots; k/v barriers say "loaded", a consumed barrier (2 arrivals) "free".

dK/dV kernel -- one CTA per (b, kv head h, key block c), grid (K, nKb, B). Each CTA owns its dK/dV block outright
(no atomics); key block 0 first (under a causal mask the first key blocks have the most visits). It walks the
TRANSPOSED layout (`layout.transposed_layout`): for g < G (the query heads n = h*G + g), the ascending query blocks
r that selected c. A visit is one (n, r):

    WG0, WG1 (consumers)  key rows [c*128 + 64*wg, +64): K, V loaded once; per visit, per 64-query half of r
                          (`dkv_block_q`): S^T = K Q^T (wgmma, keys on rows) -> P^T = exp2(S^T*scale*log2e - lse2 row)
                          dV_acc += P^T dO;  dP^T = V dO^T;  dS^T = P^T * (dP^T - dd row);  dK_acc += dS^T Q
    WG2 (producer)        per visit: TMA copies of Q_r, dO_r (rows of head n), lse2 and dd (128 floats each) into a
                          ring of `num_stages` slots.

Both sides compute S^T directly (K as the A operand) rather than transposing S: the row statistics are then
broadcast along the key rows (a `reduce(0)` layout), no register transpose.

Masks only where needed. The dQ kernel reuses the forward's `unmasked_prefix` (the key blocks needing the token
mask form a suffix of each row: two loops). On the key side, a visit (r, c) needs the mask iff some key of c lies
past kv_len or, causal, past the position of r's first query; the transposed rows ascend in r, so the masked visits
form a PREFIX of each (n, c) list; XLA counts it (`masked_visits`) and the consumers run [0, n_masked) masked and
[n_masked, count) unmasked.

Two operand variants for the P / dS matmuls: "registers" feeds them to wgmma as the A operand from registers (GPU
only), "smem" stores them to a per-warpgroup SMEM tile first (the variant the CPU interpreter can run).

SMEM (d = dtype bytes, H = head dim, s = num_stages; allocations round to 1 KiB; budget 227 KiB per CTA):

    dQ   Q, dO 2 * 2 * 64 * H * d | K, V ring 2 * s * 128 * H * d | lse2, dd 2 * 2 * 64 * 4 | dS staging (smem
         variant) 2 * 64 * 128 * d | barriers 2.  H = 128, bf16, s = 2: 32 + 32 + 128 + 2 + 2 = 196 KiB (+32 KiB
         staging: over budget, so the smem variant drops to s = 1 at H = 128).
    dKV  K, V 2 * 128 * H * d | Q, dO ring 2 * s * 128 * H * d | lse2, dd ring 2 * s * 128 * 4 | P/dS staging
         (smem variant) 2 * 64 * dkv_block_q * d | barriers 2.  H = 128, bf16, s = 2: 64 + 128 + 2 + 2 = 196 KiB
         (+16 KiB staging).

Registers (per consumer thread, 128 threads per warpgroup): dQ acc 64 x H f32 = 64 regs at H = 128, S and dP
64 x 128 f32 = 64 each; dK, dV accs 2 x 64 regs, S^T / dP^T 64 x 64 f32 = 32 each. Consumers get 232, the producer 40.

Numerics: logits are scaled by scale * log2(e) and exponentiated with exp2; P and dS are rounded to the input dtype
before their matmuls (the tensor cores' inputs); every accumulator is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xattn_jax.pallas_kernels.block_sparse_attention_mosaic_gpu import supports, unmasked_prefix
from xattn_jax.pallas_kernels.common import SM90_SMEM_BYTES, Operand, as_enum, pad_tokens
from xattn_jax.pallas_kernels.tiles_mosaic_gpu import mask_scores
from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import BlockLayout, transposed_layout

_LOG2E = math.log2(math.e)
_BLOCK = 128  # layout block: query rows per dQ CTA, key rows per dK/dV CTA
_ROWS = 64  # rows per consumer warpgroup (the wgmma M)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackwardConfig:
  """Static kernel settings.

  Attributes:
    num_stages: depth of the TMA rings (K/V in the dQ kernel, Q/dO/stats in the dK/dV kernel); lowered
      automatically where the SMEM budget requires it.
    operand: "registers" (P and dS feed wgmma from registers; GPU only) or "smem" (staged through SMEM;
      interpretable).
    dkv_block_q: queries per dK/dV inner step (64 or 128; 64 keeps S^T and dP^T at 32 registers each).
  """

  num_stages: int = 2
  operand: Operand = Operand.REGISTERS  # strings are accepted
  dkv_block_q: int = 64
  producer_registers: int = 40
  consumer_registers: int = 232

  def __post_init__(self):
    object.__setattr__(self, "operand", as_enum(Operand, self.operand, "operand"))
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 1")
    if self.dkv_block_q not in (64, 128):
      raise ValueError(f"dkv_block_q={self.dkv_block_q!r} must be 64 or 128")


def _kib(n: int) -> int:
  return -(-n // 1024) * 1024


def smem_bytes(config: BackwardConfig, head_dim: int, dtype, *, stages: int | None = None) -> tuple[int, int]:
  """SMEM of (the dQ kernel, the dK/dV kernel) per CTA, see the module docstring."""
  d, s = jnp.dtype(dtype).itemsize, config.num_stages if stages is None else stages
  staging = config.operand == "smem"
  barriers = 2 * 1024
  dq = 2 * _kib(2 * _ROWS * head_dim * d) + 2 * _kib(s * _BLOCK * head_dim * d) + 2 * _kib(2 * _ROWS * 4)
  dq += _kib(2 * _ROWS * _BLOCK * d) if staging else 0
  dkv = 2 * _kib(_BLOCK * head_dim * d) + 2 * _kib(s * _BLOCK * head_dim * d) + 2 * _kib(s * _BLOCK * 4)
  dkv += _kib(2 * _ROWS * config.dkv_block_q * d) if staging else 0
  return dq + barriers, dkv + barriers


def _stages(config: BackwardConfig, head_dim: int, dtype, which: int) -> int:
  """The deepest ring <= config.num_stages that fits the SMEM budget (which: 0 dQ, 1 dK/dV)."""
  for s in range(config.num_stages, 0, -1):
    if smem_bytes(config, head_dim, dtype, stages=s)[which] <= SM90_SMEM_BYTES:
      return s
  raise NotImplementedError(
    f"{config} needs {smem_bytes(config, head_dim, dtype, stages=1)} bytes of SMEM at head "
    f"dim {head_dim} (the budget is {SM90_SMEM_BYTES})"
  )


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  dd_ref,
  counts_ref,
  indices_ref,
  n_full_ref,
  kv_len_ref,
  q_pos_ref,  # in
  dq_ref,  # out [B, Tp, N, H]
  q_smem,
  do_smem,
  lse_smem,
  dd_smem,
  k_smem,
  v_smem,
  ds_smem,  # scratch
  q_barriers,
  do_barriers,
  lse_barriers,
  dd_barriers,
  k_barriers,
  v_barriers,
  consumed_barriers,
  *,
  causal: bool,
  scale: float,
  group: int,
  stages: int,
  config: BackwardConfig,
):
  # Last query blocks first: under a causal mask they select the most key blocks, so the long CTAs start first
  # and the short ones fill the tail.
  n, r, b = lax.axis_index("n"), counts_ref.shape[2] - 1 - lax.axis_index("r"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  count = counts_ref[b, n, r]
  dtype = q_ref.dtype
  head_dim = q_ref.shape[-1]
  qk_scale = scale * _LOG2E

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(config.consumer_registers, action="increase")
    q_base = r * _BLOCK + wg * _ROWS
    rows = (b, pl.ds(q_base, _ROWS), n)
    my_q, my_do = q_smem.at[wg], do_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, q_barriers.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], my_do, do_barriers.at[wg])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, n, pl.ds(q_base, _ROWS)], lse_smem.at[wg], lse_barriers.at[wg])
    plgpu.copy_gmem_to_smem(dd_ref.at[b, n, pl.ds(q_base, _ROWS)], dd_smem.at[wg], dd_barriers.at[wg])
    for barriers in (q_barriers, do_barriers, lse_barriers, dd_barriers):
      plgpu.barrier_wait(barriers.at[wg])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse = plgpu.load(lse_smem.at[wg], layout=row_layout)
    dd = plgpu.load(dd_smem.at[wg], layout=row_layout)
    kv_len = kv_len_ref[b]
    q_position = q_pos_ref[b] + q_base  # position of this warpgroup's first query
    acc = plgpu.layout_cast(jnp.full((_ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step(j, acc, *, masked: bool):
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_barriers.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((_ROWS, _BLOCK), jnp.float32)) * qk_scale
      if masked:
        s = mask_scores(
          s, first_key=indices_ref[b, n, r, j] * _BLOCK, first_query_position=q_position, kv_len=kv_len, causal=causal
        )
      p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))  # 0 where masked and for dead queries
      plgpu.barrier_wait(v_barriers.at[slot])

      def dov(acc_ref):
        plgpu.wgmma(acc_ref, my_do, v_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      dp = pl.run_scoped(dov, plgpu.ACC((_ROWS, _BLOCK), jnp.float32))
      ds = (p * (dp - lax.broadcast_in_dim(dd, s.shape, [0]))).astype(dtype)
      if config.operand == "registers":

        def dsk(acc_ref):
          plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

        acc = pl.run_state(dsk)(plgpu.ACC.init(acc))
      else:
        ds_smem.at[wg][...] = ds
        plgpu.commit_smem()

        def dsk(acc_ref):
          plgpu.wgmma(acc_ref, ds_smem.at[wg], k_smem.at[slot])
          return acc_ref[...]

        acc = acc + pl.run_scoped(dsk, plgpu.ACC((_ROWS, head_dim), jnp.float32))
      plgpu.barrier_arrive(consumed_barriers.at[slot])
      return acc

    n_full = n_full_ref[b, n, r]
    acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
    acc = lax.fori_loop(n_full, count, functools.partial(step, masked=True), acc)
    my_q[...] = (acc * scale).astype(dtype)  # Q is dead: its SMEM tile stages dQ
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(config.producer_registers, action="decrease")
    kv_head = lax.div(n, group)

    @pl.loop(0, count)
    def _(j):
      slot = lax.rem(j, stages)
      keys = (b, pl.ds(indices_ref[b, n, r, j] * _BLOCK, _BLOCK), kv_head)

      @pl.when(j >= stages)  # the slot's previous block must be consumed by both warpgroups
      def _():
        plgpu.barrier_wait(consumed_barriers.at[slot])

      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])

    # Observe the last consumed phases: a no-op on the GPU, required by the interpreter's barrier bookkeeping.
    @pl.loop(jnp.maximum(count - stages, 0), count)
    def _(j):
      plgpu.barrier_wait(consumed_barriers.at[lax.rem(j, stages)])


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  dd_ref,
  counts_ref,
  indices_ref,
  n_masked_ref,
  kv_len_ref,
  q_pos_ref,  # in
  dk_ref,
  dv_ref,  # out [B, Sp, K, H]
  k_smem,
  v_smem,
  q_smem,
  do_smem,
  lse_smem,
  dd_smem,
  st_smem,  # scratch
  k_barriers,
  v_barriers,
  q_barriers,
  do_barriers,
  lse_barriers,
  dd_barriers,
  consumed_barriers,
  *,
  causal: bool,
  scale: float,
  group: int,
  stages: int,
  config: BackwardConfig,
):
  h, c, b = lax.axis_index("h"), lax.axis_index("c"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  head_dim = q_ref.shape[-1]
  qk_scale = scale * _LOG2E
  bq = config.dkv_block_q

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(config.consumer_registers, action="increase")
    key_base = c * _BLOCK + wg * _ROWS
    rows = (b, pl.ds(key_base, _ROWS), h)
    my_k, my_v = k_smem.at[wg], v_smem.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[rows], my_k, k_barriers.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], my_v, v_barriers.at[wg])
    plgpu.barrier_wait(k_barriers.at[wg])
    plgpu.barrier_wait(v_barriers.at[wg])
    kv_len, q_pos = kv_len_ref[b], q_pos_ref[b]
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    my_staging = None if st_smem is None else st_smem.at[wg]
    zeros = plgpu.layout_cast(jnp.full((_ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def visit(step, r, dk, dv, *, masked: bool):
      slot = lax.rem(step, stages)
      for barriers in (q_barriers, do_barriers, lse_barriers, dd_barriers):
        plgpu.barrier_wait(barriers.at[slot])
      for half in range(_BLOCK // bq):
        cols = pl.ds(half * bq, bq)
        q_half, do_half = q_smem.at[slot, cols], do_smem.at[slot, cols]

        def kq(acc_ref):
          plgpu.wgmma(acc_ref, my_k, q_half.transpose((1, 0)))
          return acc_ref[...]

        st = pl.run_scoped(kq, plgpu.ACC((_ROWS, bq), jnp.float32)) * qk_scale  # S^T: keys x queries
        if masked:
          keys = plgpu.broadcasted_iota(jnp.int32, st.shape, 0, layout=plgpu.Layout.WGMMA) + key_base
          ok = keys < kv_len
          if causal:
            q_ids = plgpu.broadcasted_iota(jnp.int32, st.shape, 1, layout=plgpu.Layout.WGMMA)
            ok &= keys <= q_ids + (q_pos + r * _BLOCK + half * bq)
          st = jnp.where(ok, st, -jnp.inf)
        lse = plgpu.load(lse_smem.at[slot, cols], layout=col_layout)
        pt = jnp.exp2(st - lax.broadcast_in_dim(lse, st.shape, [1]))  # 0 where masked and for dead queries
        dv = _accumulate(dv, pt.astype(dtype), do_half, my_staging, config.operand)

        def vdo(acc_ref):
          plgpu.wgmma(acc_ref, my_v, do_half.transpose((1, 0)))
          return acc_ref[...]

        dpt = pl.run_scoped(vdo, plgpu.ACC((_ROWS, bq), jnp.float32))
        dd = plgpu.load(dd_smem.at[slot, cols], layout=col_layout)
        dst = (pt * (dpt - lax.broadcast_in_dim(dd, st.shape, [1]))).astype(dtype)
        dk = _accumulate(dk, dst, q_half, my_staging, config.operand)
      plgpu.barrier_arrive(consumed_barriers.at[slot])
      return dk, dv

    def head(g, carry):
      n = h * group + g
      count, n_masked = counts_ref[b, n, c], n_masked_ref[b, n, c]

      def body(j, carry, *, masked):
        step, dk, dv = carry
        dk, dv = visit(step, indices_ref[b, n, c, j], dk, dv, masked=masked)
        return step + 1, dk, dv

      carry = lax.fori_loop(0, n_masked, functools.partial(body, masked=True), carry)
      return lax.fori_loop(n_masked, count, functools.partial(body, masked=False), carry)

    _, dk, dv = lax.fori_loop(0, group, head, (jnp.int32(0), zeros, zeros))
    my_k[...] = (dk * scale).astype(dtype)  # K and V are dead: their SMEM tiles stage dK and dV
    my_v[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_k, dk_ref.at[rows])
    plgpu.copy_smem_to_gmem(my_v, dv_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(config.producer_registers, action="decrease")

    def head(g, step):
      n = h * group + g

      def load(j, step):
        slot = lax.rem(step, stages)
        tokens = pl.ds(indices_ref[b, n, c, j] * _BLOCK, _BLOCK)

        @pl.when(step >= stages)  # the slot's previous visit must be consumed by both warpgroups
        def _():
          plgpu.barrier_wait(consumed_barriers.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[b, tokens, n], q_smem.at[slot], q_barriers.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, tokens, n], do_smem.at[slot], do_barriers.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, n, tokens], lse_smem.at[slot], lse_barriers.at[slot])
        plgpu.copy_gmem_to_smem(dd_ref.at[b, n, tokens], dd_smem.at[slot], dd_barriers.at[slot])
        return step + 1

      return lax.fori_loop(0, counts_ref[b, n, c], load, step)

    total = lax.fori_loop(0, group, head, jnp.int32(0))

    # Observe the last consumed phases: a no-op on the GPU, required by the interpreter's barrier bookkeeping.
    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(j):
      plgpu.barrier_wait(consumed_barriers.at[lax.rem(j, stages)])


def _accumulate(acc, a, b_smem, staging_smem, operand: str):
  """acc + a @ b (wgmma; a [64, k] in registers, b [k, H] in SMEM), a fed from registers or staged through SMEM."""
  if operand == "registers":

    def mma(acc_ref):
      plgpu.wgmma(acc_ref, a, b_smem)

    return pl.run_state(mma)(plgpu.ACC.init(acc))
  staging_smem[...] = a
  plgpu.commit_smem()

  def mma(acc_ref):
    plgpu.wgmma(acc_ref, staging_smem, b_smem)
    return acc_ref[...]

  # The wgmma has completed when its accumulator is read: the staging tile is free for the next product.
  return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))


def row_stats(out, lse, d_out, d_lse, geometry: Geometry, padded_len: int) -> tuple[jax.Array, jax.Array]:
  """f32 [B, N, padded_len] each: lse * log2(e) (+inf for queries that contribute nothing), D - dlse (0 there)."""
  _, T, _, _ = out.shape
  tokens = jnp.arange(T, dtype=jnp.int32)
  live = (tokens[None, None, :] < geometry.q_lengths[:, None, None]) & (lse > -jnp.inf)  # [B, N, T]
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))  # D = rowsum(dO * O)
  lse2 = jnp.where(live, lse * _LOG2E, jnp.inf)
  dd = jnp.where(live, delta - d_lse.astype(jnp.float32), 0.0)
  pad = ((0, 0), (0, 0), (0, padded_len - T))
  return jnp.pad(lse2, pad, constant_values=jnp.inf), jnp.pad(dd, pad)


def masked_visits(t_counts: jax.Array, t_indices: jax.Array, geometry: Geometry, *, causal: bool) -> jax.Array:
  """int32 [B, N, nKb]: leading visits of each transposed row whose (query block, key block) pair needs the mask.

  Pair (r, c) needs the token mask iff key block c reaches past the keys visible to r's first query:
  (c + 1) * 128 > min(kv_len, q_pos + r * 128 + 1) (causal), > kv_len (not). The bound grows with r and a
  transposed row ascends in r, so these visits come first.
  """
  nkb = t_indices.shape[2]
  kv_len = geometry.kv_lengths[:, None, None, None]
  visible = jnp.broadcast_to(kv_len, t_indices.shape)
  if causal:
    visible = jnp.minimum(visible, geometry.q_positions[:, None, None, None] + t_indices * _BLOCK + 1)
  block_end = (jnp.arange(nkb, dtype=jnp.int32)[None, None, :, None] + 1) * _BLOCK
  steps = jnp.arange(t_indices.shape[-1], dtype=jnp.int32)
  needs = (block_end > visible) & (steps < t_counts[..., None])
  return jnp.sum(needs, axis=-1, dtype=jnp.int32)


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
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) in the dtypes of q, k, v; the same gradients as `attention_xla_bwd.block_sparse_attention_bwd`.

  Raises:
    NotImplementedError: dtype, head dim or block size the kernels do not cover (the XLA backward takes over).
  """
  reason = supports(q, k, layout)
  if reason is None and not (k.dtype == v.dtype == q.dtype):
    reason = f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype} (the kernels take one dtype)"
  if reason is not None:
    raise NotImplementedError(f"pallas_mosaic_gpu block_sparse_attention backward does not support {reason}")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  G = N // K
  nqb, nkb = cdiv(T, _BLOCK), cdiv(S, _BLOCK)
  dtype = q.dtype
  dq_stages, dkv_stages = _stages(config, H, dtype, 0), _stages(config, H, dtype, 1)

  lse2, dd = row_stats(out, lse, d_out, d_lse, geometry, nqb * _BLOCK)
  # TMA boxes are whole blocks: pad ragged ends (padding queries have lse2 = +inf, padding keys are masked).
  q, d_out = pad_tokens(q, nqb * _BLOCK), pad_tokens(d_out.astype(dtype), nqb * _BLOCK)
  k, v = pad_tokens(k, nkb * _BLOCK), pad_tokens(v, nkb * _BLOCK)
  t_counts, t_indices = transposed_layout(layout)
  params = dict(
    num_threads=3,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    interpret=plgpu.InterpretGPUParams(detect_races=True, out_of_bounds_reads="raise") if interpret else None,
  )
  staging = config.operand == "smem"

  dq = plgpu.kernel(
    functools.partial(_dq_kernel, causal=causal, scale=scale, group=G, stages=dq_stages, config=config),
    out_type=jax.ShapeDtypeStruct(q.shape, dtype),
    scratch_types=[
      plgpu.SMEM((2, _ROWS, H), dtype),  # Q (then dQ), per consumer
      plgpu.SMEM((2, _ROWS, H), dtype),  # dO
      plgpu.SMEM((2, _ROWS), jnp.float32),  # lse2
      plgpu.SMEM((2, _ROWS), jnp.float32),  # dd
      plgpu.SMEM((dq_stages, _BLOCK, H), dtype),  # K ring
      plgpu.SMEM((dq_stages, _BLOCK, H), dtype),  # V ring
      plgpu.SMEM((2, _ROWS, _BLOCK), dtype) if staging else None,  # dS staging
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),  # Q, dO
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),  # lse2, dd
      plgpu.Barrier(num_barriers=dq_stages),
      plgpu.Barrier(num_barriers=dq_stages),  # K, V loaded
      plgpu.Barrier(num_arrivals=2, num_barriers=dq_stages),  # K/V slot consumed
    ],
    grid=(N, nqb, B),
    grid_names=("n", "r", "b"),
    **params,
  )(
    q,
    k,
    v,
    d_out,
    lse2,
    dd,
    layout.counts,
    layout.indices,
    unmasked_prefix(layout, geometry, causal=causal),
    geometry.kv_lengths,
    geometry.q_positions,
  )

  dk, dv = plgpu.kernel(
    functools.partial(_dkv_kernel, causal=causal, scale=scale, group=G, stages=dkv_stages, config=config),
    out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
    scratch_types=[
      plgpu.SMEM((2, _ROWS, H), dtype),  # K (then dK), per consumer
      plgpu.SMEM((2, _ROWS, H), dtype),  # V (then dV)
      plgpu.SMEM((dkv_stages, _BLOCK, H), dtype),  # Q ring
      plgpu.SMEM((dkv_stages, _BLOCK, H), dtype),  # dO ring
      plgpu.SMEM((dkv_stages, _BLOCK), jnp.float32),  # lse2 ring
      plgpu.SMEM((dkv_stages, _BLOCK), jnp.float32),  # dd ring
      plgpu.SMEM((2, _ROWS, config.dkv_block_q), dtype) if staging else None,  # P^T / dS^T staging
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),  # K, V
      plgpu.Barrier(num_barriers=dkv_stages),
      plgpu.Barrier(num_barriers=dkv_stages),  # Q, dO loaded
      plgpu.Barrier(num_barriers=dkv_stages),
      plgpu.Barrier(num_barriers=dkv_stages),  # lse2, dd loaded
      plgpu.Barrier(num_arrivals=2, num_barriers=dkv_stages),  # visit slot consumed
    ],
    grid=(K, nkb, B),
    grid_names=("h", "c", "b"),
    **params,
  )(
    q,
    k,
    v,
    d_out,
    lse2,
    dd,
    t_counts,
    t_indices,
    masked_visits(t_counts, t_indices, geometry, causal=causal),
    geometry.kv_lengths,
    geometry.q_positions,
  )
  return dq[:, :T], dk[:, :S], dv[:, :S]
