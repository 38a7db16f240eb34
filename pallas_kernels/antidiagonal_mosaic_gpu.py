"""XAttention antidiagonal block scoring (SPEC §1) for Hopper: Pallas Mosaic GPU, `plgpu.kernel`, jax 0.11.2 API.

One pass, no [T/s, S/s] matrix in HBM. The strided logits are z = sum_u Q_u K_u^T with
    Q_u = q.reshape(B, T/s, s, N, H)[b, :, s-1-u, n, :]      K_u = k.reshape(B, S/s, s, K, H)[b, :, u, n//G, :]
(both free reshapes, so every operand is a plain TMA box). The other estimator of SPEC §1.7 ("alternating") pairs
key offset u with query offset o_i(u) = s-1-u on even strided rows i and (s-u) mod s on odd rows, which no single
box of that view holds. So for it q is viewed as row pairs, q.reshape(B, T/2s, 2s, N, H) (free too), where slot
p*s + o of pair i/2 is token o of strided row i of parity p, and each step loads two boxes of it:
    even rows: [b, CTA's 64 pairs, s-1-u,           n, h-chunk]  -> q_smem rows  0..63  (WG0)
    odd rows:  [b, CTA's 64 pairs, s + (s-u) mod s, n, h-chunk]  -> q_smem rows 64..127 (WG1)
So WG w holds the CTA's rows of parity w (row0 + 2k + w at its row k) instead of rows row0 + 64w + k, and the
epilogue regroups (see `_combine`); the kernel's outputs keep their layout, indexed by CTA row position. No XLA
copy of q (the earlier build reordered q by one fused XLA copy before the kernel: 2 GiB of HBM traffic at 128K,
32 heads, H = 128; measured on an H100 1.06-1.16x the paper's time at 128K and 1.17-1.46x at 32K).
Budget of the two boxes: the same bytes per step into the same q_smem slot (SMEM unchanged); one TMA descriptor
(both boxes are [64, chunk] boxes of the one row-pair view, at different slot coordinates); the q barrier of each
slot counts 2 arrivals (one arrive.expect_tx per box) instead of 1, no new barriers. Every box row is still one
contiguous 128-byte run (chunk = 64 bf16), only the row stride doubles. The paper's estimator compiles to the same
kernel and XLA program as before (one [128, chunk] box per step).

Kernel (grid (heads x key_splits, row blocks, batch), optional 2-CTA cluster over heads; 3 warpgroups):
  WG2 (producer)   streams the contraction (u, h-chunk) in steps of `chunk` = 64 columns of s*H: per step one TMA of
                   the CTA's 128 strided query rows [128, 64] (alternating: two [64, 64], one per row parity) and
                   one of the key tile [block_n, 64] into a ring of `num_stages` slots.
  WG0, WG1         64 strided rows each (alternating: the CTA's even / odd rows). Per key tile of block_n strided
                   columns: acc[64, block_n] += Q_u K_u^T over all steps (wgmma, bf16/f16 in, f32 acc); then online
                   softmax statistics (m, l per row, base 2) and the per-row partial block sums
                   C = exp2(z*c - m_tile) @ E, E the [block_n, block_n/g] 0/1 indicator of "column j is in key block
                   c" (g = blk/s strided columns per block): a second, tiny wgmma with f16 P. C [64, block_n/g]
                   and m_tile [64] go to GMEM by TMA.
  The causal diagonal: a CTA runs only the key tiles with any allowed cell ("count"); the first "n_full" tiles
  are allowed for every row of the CTA and skip the iota mask. Causal row blocks run longest first.
  Options (ScoresConfig): cluster_heads=2 multicasts each K chunk to the CTAs of two query heads sharing a kv head;
  key_splits=P gives a row block's key tiles to P CTAs (the per-tile m_tile makes the tiles independent). The GPU
  default takes both (clusters only where the GQA group is even, P = 2): a step loads 48 KiB of Q and K boxes for
  ~980 cycles of wgmma, ~50 B/cycle/SM from L2, about twice what L2 serves to all SMs at once; the cluster halves
  the K part (measured 0.85-0.92x the time of neither at 16K-128K on an H100).

Epilogue (XLA, memory bound, reads 1/g of what the [T/s, S/s] logits would take):
  A[r, c] = sum_{i in block r} part[i, c] * exp2(m_tile[i, tile(c)] - m[i]) / l[i]
(The row-group sum needs the final per-row normaliser, so it cannot be done while streaming the keys.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from xattn_jax.pallas_kernels.common import TMA_TILE_ROWS, Operand, as_enum, pad_tokens_to_multiple
from xattn_jax.estimators import Estimator, check_estimator
from xattn_jax.geometry import Geometry, cdiv

_LOG2E = math.log2(math.e)
_ROWS_PER_WG = 64  # wgmma M
_NUM_CONSUMERS = 2
_MIN_E_COLS = 16  # E [block_n, block_n/g] needs a minor dim of >= 16 f16 (32-byte swizzle); narrower ones are padded


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoresConfig:
  block_n: int = 256  # strided key columns per tile (wgmma N <= 256); E gets >= 16 columns (zero padded for s=4)
  chunk: int = 64  # contraction columns per pipeline step (one 128-byte swizzle row of bf16)
  num_stages: int = 4  # TMA ring depth: num_stages * (128 + block_n) * chunk * 2 bytes of SMEM
  p_operand: Operand = Operand.REGISTERS  # SMEM for the CPU interpreter (it cannot take a register LHS)
  split_p: bool = False  # P = hi + lo (two f16 wgmmas): exact to ~1e-7 instead of ~2^-12 relative per element
  producer_registers: int = 40
  consumer_registers: int = 232
  # Row reductions of the WGMMA layout stay inside a warp (quad shuffles): no SMEM needed. 0 frees the 2 KiB that
  # the default reserves (s=16 is 104 bytes over the 227 KiB limit with it).
  reduction_scratch_bytes: int = 0
  # 2: a cluster of the two query heads 2p, 2p+1 (same kv head, needs G even) shares every K chunk by TMA multicast,
  # halving the K bytes each SM pulls from L2 (48 -> 32 bytes per 1024-cycle step); the "consumed" barrier becomes a
  # cluster barrier. 1: no cluster. None (the default): 2 where the GQA group is even, else 1.
  cluster_heads: int | None = None
  # P > 1 splits each row block's key tiles into P contiguous ranges handled by P CTAs that run side by side (the
  # grid's fastest axis): they read the same Q chunks at the same time (Q stays in L2), and causal work is spread
  # more evenly. Each split writes its own (m, l); the epilogue merges them (m_tile already makes tiles independent).
  # The default pair (2-CTA clusters where G is even, 2 splits) measured 0.85-0.92x the time of (1, 1) at 16K-128K,
  # both strides, 32/8 heads, on an H100 (benchmarks/notes_antidiagonal_mosaic_gpu.md, 2026-12-07).
  key_splits: int = 2

  def __post_init__(self):
    object.__setattr__(self, "p_operand", as_enum(Operand, self.p_operand, "p_operand"))

  @property
  def cta_rows(self) -> int:
    return _NUM_CONSUMERS * _ROWS_PER_WG

  def for_group(self, group: int) -> ScoresConfig:
    """cluster_heads=None resolved for a GQA group of `group` query heads per kv head."""
    if self.cluster_heads is not None:
      return self
    return dataclasses.replace(self, cluster_heads=2 if group % 2 == 0 else 1)


# The interpreter's default: P through SMEM (it cannot take a register LHS), a 2-deep ring, one CTA per row block
# and head (its threads per CTA make clusters and key splits slow to simulate; the test suites cover both).
INTERPRETER_CONFIG = ScoresConfig(p_operand="smem", num_stages=2, cluster_heads=1, key_splits=1)


def _kernel(
  q5_ref,
  k5_ref,
  e_ref,
  cnt_ref,
  nfull_ref,
  qlen_ref,
  kvlen_ref,
  qpos_ref,  # inputs
  part_ref,
  mt_ref,
  ml_ref,  # outputs
  q_smem,
  k_smem,
  e_smem,
  p_smem,
  c_smem,
  v_smem,  # scratch
  q_bars,
  k_bars,
  consumed,
  e_bar,
  *,
  s: int,
  g: int,
  phases: int,
  causal: bool,
  c_scale: float,
  group: int,
  nrb: int,
  cfg: ScoresConfig,
):
  H = q5_ref.shape[-1]
  bn, ch, ns = cfg.block_n, cfg.chunk, cfg.num_stages
  ng = bn // g
  ne = max(ng, _MIN_E_COLS)
  hc_per_u = H // ch
  nsteps = s * hc_per_u  # contraction steps per key tile
  hs = lax.axis_index("heads")
  sp = lax.rem(hs, cfg.key_splits)  # which key range of the row block
  n = lax.div(hs, cfg.key_splits)
  if cfg.cluster_heads > 1:
    n = n * cfg.cluster_heads + lax.axis_index("cl")
  rb = lax.axis_index("rows")
  if causal:  # longest rows first (LPT) so the short tail CTAs fill the last wave
    rb = nrb - 1 - rb
  b = lax.axis_index("batch")
  wg = lax.axis_index("wg")
  row0 = rb * cfg.cta_rows
  count = cnt_ref[b, rb]
  per_split = lax.div(count + (cfg.key_splits - 1), cfg.key_splits)
  t0 = jnp.minimum(sp * per_split, count)  # this CTA's key tiles: [t0, t1)
  t1 = jnp.minimum(t0 + per_split, count)
  n_full = jnp.clip(nfull_ref[b, rb], t0, t1)  # [t0, n_full) need no mask
  total = (t1 - t0) * nsteps  # pipeline steps of this CTA

  @pl.when(wg < _NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(cfg.consumer_registers, action="increase")
    r0 = row0 + wg * _ROWS_PER_WG
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    # Last allowed strided column per row (SPEC §1.3; jmax is nondecreasing in the row).
    q_len, kv_len, q_pos = qlen_ref[b], kvlen_ref[b], qpos_ref[b]
    kv_last = lax.div(kv_len + (s - 1), s) - 1
    rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS_PER_WG,), 0, layout=row_layout)
    # The strided rows of this WG: its own 64 (one phase), or every other row of the CTA's 128 (WG w = parity w).
    rows = rows + r0 if phases == 1 else rows * 2 + (row0 + wg)
    if causal:
      lim = q_pos + jnp.minimum(rows * s + (s - 1), q_len - 1)
      jc = jnp.where(lim < 0, -1, lax.div(jnp.maximum(lim, 0), s))
      jmax = jnp.minimum(jc, kv_last)
    else:
      jmax = jnp.where(rows >= 0, kv_last, -1)
    m_i = plgpu.layout_cast(jnp.full((_ROWS_PER_WG,), -jnp.inf, jnp.float32), row_layout)
    l_i = plgpu.layout_cast(jnp.full((_ROWS_PER_WG,), 0.0, jnp.float32), row_layout)
    plgpu.barrier_wait(e_bar)

    def tile(t, carry, *, masked: bool):
      m_i, l_i = carry
      base = (t - t0) * nsteps

      def gemm(acc_ref):
        def step(kk, _):
          slot = lax.rem(base + kk, ns)
          plgpu.barrier_wait(q_bars.at[slot])
          plgpu.barrier_wait(k_bars.at[slot])
          plgpu.wgmma(
            acc_ref, q_smem.at[slot, pl.ds(wg * _ROWS_PER_WG, _ROWS_PER_WG)], k_smem.at[slot].transpose((1, 0))
          )
          plgpu.wgmma_wait(1)  # the previous step's wgmma is done: release its slot

          @pl.when(kk > 0)
          def _():
            plgpu.barrier_arrive(consumed.at[lax.rem(base + kk - 1, ns)])

          return ()

        lax.fori_loop(0, nsteps, step, ())
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[lax.rem(base + nsteps - 1, ns)])
        return acc_ref[...]

      z = pl.run_scoped(gemm, plgpu.ACC((_ROWS_PER_WG, bn), jnp.float32))
      z = z * c_scale
      if masked:
        # Broadcast inside the tile: a [64, block_n] int32 carried across the loop would pin 128 registers.
        cols = plgpu.broadcasted_iota(jnp.int32, z.shape, 1, layout=plgpu.Layout.WGMMA)
        z = jnp.where(cols <= lax.broadcast_in_dim(jmax - t * bn, z.shape, [0]), z, -jnp.inf)
      m_new = jnp.maximum(m_i, z.max(axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing allowed yet: exp2(-inf - 0) = 0, no NaN
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(z - lax.broadcast_in_dim(m_use, z.shape, [0]))
      p_hi = p.astype(jnp.float16)
      ps = [p_hi]
      if cfg.split_p:
        ps.append((p - p_hi.astype(jnp.float32)).astype(jnp.float16))
      if cfg.p_operand == "registers":

        def group_sum(acc_ref):
          for pk in ps:
            plgpu.wgmma(acc_ref, pk, e_smem)
          return acc_ref[...]
      else:

        def group_sum(acc_ref):
          for pk in ps:
            p_smem.at[wg][...] = pk
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, p_smem.at[wg], e_smem)
          return acc_ref[...]

      c = pl.run_scoped(group_sum, plgpu.ACC((_ROWS_PER_WG, ne), jnp.float32))
      if ne > ng:  # E was padded with zero columns (s=4: 8 key blocks per 256-column tile)
        c = c[:, :ng]
      l_i = l_i * alpha + c.sum(axis=1)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read c_smem / v_smem
      c_smem.at[wg][...] = c
      v_smem.at[wg][...] = m_use
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(c_smem.at[wg], part_ref.at[b, n, pl.ds(r0, _ROWS_PER_WG), pl.ds(t * ng, ng)])
      plgpu.copy_smem_to_gmem(v_smem.at[wg], mt_ref.at[b, n, t, pl.ds(r0, _ROWS_PER_WG)])
      return m_new, l_i

    carry = lax.fori_loop(t0, n_full, functools.partial(tile, masked=False), (m_i, l_i))
    m_i, l_i = lax.fori_loop(n_full, t1, functools.partial(tile, masked=True), carry)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    v_smem.at[wg][...] = jnp.where(m_i == -jnp.inf, 0.0, m_i)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(v_smem.at[wg], ml_ref.at[b, n, sp, 0, pl.ds(r0, _ROWS_PER_WG)])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    v_smem.at[wg][...] = l_i
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(v_smem.at[wg], ml_ref.at[b, n, sp, 1, pl.ds(r0, _ROWS_PER_WG)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(cfg.producer_registers, action="decrease")
    kvh = lax.div(n, group)
    plgpu.copy_gmem_to_smem(e_ref, e_smem, e_bar)

    def load(gs, slot):  # gs: the CTA's pipeline step
      t = t0 + lax.div(gs, nsteps)
      kk = lax.rem(gs, nsteps)
      u = lax.div(kk, hc_per_u)
      h0 = lax.rem(kk, hc_per_u) * ch
      if phases == 1:  # the paper's o(u) = s-1-u: slot s-1-u of all 128 rows, one box
        plgpu.copy_gmem_to_smem(
          q5_ref.at[b, pl.ds(row0, cfg.cta_rows), s - 1 - u, n, pl.ds(h0, ch)], q_smem.at[slot], q_bars.at[slot]
        )
      else:  # q5 holds row pairs [.., 2s, ..]: box p is the 64 rows of parity p at their own o_p(u) (SPEC §1.7)
        half = cfg.cta_rows // 2
        for p, o in enumerate((s - 1 - u, lax.rem(s - u, s))):
          plgpu.copy_gmem_to_smem(
            q5_ref.at[b, pl.ds(rb * half, half), p * s + o, n, pl.ds(h0, ch)],
            q_smem.at[slot, pl.ds(p * half, half)],
            q_bars.at[slot],
          )
      plgpu.copy_gmem_to_smem(
        k5_ref.at[b, pl.ds(t * bn, bn), u, kvh, pl.ds(h0, ch)],
        k_smem.at[slot],
        k_bars.at[slot],
        collective_axes="cl" if cfg.cluster_heads > 1 else None,
      )

    for j in range(ns):
      pl.when(j < total)(functools.partial(load, j, j))

    @pl.loop(ns, jnp.maximum(total, ns))
    def _(gs):
      slot = lax.rem(gs, ns)
      plgpu.barrier_wait(consumed.at[slot])
      load(gs, slot)

    # Observe the last consumed phases (a no-op on the GPU; the interpreter's barrier bookkeeping requires it).
    @pl.loop(jnp.maximum(total - ns, 0), total)
    def _(gs):
      plgpu.barrier_wait(consumed.at[lax.rem(gs, ns)])


def _tables(geometry: Geometry, *, s: int, nrb: int, cta_rows: int, bn: int, causal: bool):
  """int32 [B, nrb]: key tiles a CTA visits (count) and those allowed for all of its rows (n_full)."""
  q_len = geometry.q_lengths[:, None]
  kv_last = (geometry.kv_lengths[:, None] + s - 1) // s - 1  # last real strided column
  first_row = jnp.arange(nrb, dtype=jnp.int32)[None, :] * cta_rows
  last_row = first_row + cta_rows - 1

  def jmax(i):
    if not causal:
      return kv_last + jnp.zeros_like(i)
    lim = geometry.q_positions[:, None] + jnp.minimum(i * s + s - 1, q_len - 1)
    return jnp.minimum(jnp.where(lim < 0, -1, lim // s), kv_last)

  has_rows = first_row * s < q_len
  count = jnp.where(has_rows, (jmax(last_row) + 1 + bn - 1) // bn, 0)
  n_full = jnp.clip((jmax(first_row) + 1) // bn, 0, count)
  return count.astype(jnp.int32), n_full.astype(jnp.int32)


def indicator(bn: int, g: int) -> np.ndarray:
  """E [bn, max(bn/g, 16)] f16: E[j, c] = 1 iff strided column j lies in key block c of the tile."""
  return (np.arange(bn)[:, None] // g == np.arange(max(bn // g, _MIN_E_COLS))[None, :]).astype(np.float16)


def supports(q, k, *, stride: int, block_size: int, config: ScoresConfig = ScoresConfig()) -> str | None:
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f"dtypes {q.dtype}/{k.dtype} (bfloat16 or float16, equal)"
  if q.shape[-1] % config.chunk:
    return f"head dim {q.shape[-1]} (multiple of {config.chunk})"
  if block_size % stride or config.cta_rows % (block_size // stride) or config.block_n % (block_size // stride):
    return f"block_size={block_size}, stride={stride}"
  config = config.for_group(q.shape[2] // k.shape[2])
  if config.cluster_heads not in (1, 2) or (q.shape[2] // k.shape[2]) % config.cluster_heads:
    return f"cluster_heads={config.cluster_heads} with G={q.shape[2] // k.shape[2]} (needs 1, or 2 with G even)"
  return None


@functools.partial(
  jax.jit,
  static_argnames=(
    "stride",
    "block_size",
    "causal",
    "scale",
    "interpret",
    "config",
    "return_parts",
    "estimator",
    "padding_zeroed",
  ),
)
def antidiagonal_scores(
  q,
  k,
  geometry: Geometry,
  *,
  stride: int,
  block_size: int,
  causal: bool,
  scale: float,
  interpret=False,
  config: ScoresConfig | None = None,
  return_parts: bool = False,
  estimator: Estimator = Estimator.ANTIDIAGONAL,
  padding_zeroed: bool = False,
):
  """SPEC §1 block scores f32 [B, N, ceil(T/blk), ceil(S/blk)]. `interpret`: False, True or InterpretGPUParams.
  `padding_zeroed`: the caller zeroed the padding tokens that share a stride group with real ones
  (`geometry.zero_straddling_tokens`, as `xattention` does), so no conditional pass over q and K is staged here."""
  if config is None:
    config = INTERPRETER_CONFIG if interpret else ScoresConfig()
  config = config.for_group(q.shape[2] // k.shape[2])
  reason = supports(q, k, stride=stride, block_size=block_size, config=config)
  if reason is not None:
    raise NotImplementedError(f"antidiagonal_scores (mosaic gpu) does not support {reason}")
  estimator = check_estimator(estimator, stride=stride, block_size=block_size)
  phases = 1 if estimator is Estimator.ANTIDIAGONAL else 2  # strided-row phases of the query order (SPEC §1.7)
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  s, blk, bn = stride, block_size, config.block_n
  g = blk // s  # strided rows/columns per block
  ng = bn // g
  nqb, nkb = cdiv(T, blk), cdiv(S, blk)
  rows_tok = config.cta_rows * s
  nrb = cdiv(T, rows_tok)
  Tp = nrb * rows_tok
  ntiles = cdiv(S, bn * s)
  Trp = Tp // s

  # Padding tokens count as zero vectors (SPEC §1.1). Only a strided row/column that mixes real and padding tokens
  # (length % s != 0) can see them: whole padding rows are dropped by the epilogue and whole padding columns by the
  # in-kernel mask (a where, so even NaN garbage is harmless). So the full pass over q/k runs only when needed.
  # The arrays are not padded to whole CTA row blocks / key tiles: the last block's boxes run past the end of the
  # view and TMA fills those rows with zeros (as the interpreter does; the masks above would make any value harmless).
  # Only a length that does not fill whole 8-row swizzle tiles of the view (8s tokens, 16s for q's row pairs: the
  # TMA's gmem tiling) is padded, to the next one.
  # (Padding to the tiles copied q and K per query chunk: ~1.9 GB per layer at T = 130944, s = 16.)
  def zero_pad(x, lengths, multiple):
    idx = jnp.arange(x.shape[1], dtype=jnp.int32)
    zero = lambda x: jnp.where((idx[None, :] < lengths[:, None])[:, :, None, None], x, jnp.zeros((), x.dtype))
    # With traced lengths the conditional stays in the program and its identity branch copies x (XLA's copy
    # insertion: the attention still reads the original), a full pass either way: `padding_zeroed` skips it.
    if not padding_zeroed:
      x = lax.cond(jnp.any(lengths % s != 0), zero, lambda x: x, x)
    return pad_tokens_to_multiple(x, multiple)

  # [B, T/s, s, N, H], or row pairs [B, T/2s, 2s, N, H] for two phases: a free reshape either way.
  q5 = zero_pad(q, geometry.q_lengths, TMA_TILE_ROWS * phases * s)
  q5 = q5.reshape(B, q5.shape[1] // (phases * s), phases * s, N, H)
  k5 = zero_pad(k, geometry.kv_lengths, TMA_TILE_ROWS * s)
  k5 = k5.reshape(B, k5.shape[1] // s, s, K, H)
  count, n_full = _tables(geometry, s=s, nrb=nrb, cta_rows=config.cta_rows, bn=bn, causal=causal)
  e = jnp.asarray(indicator(bn, g))
  dt = q.dtype
  ns = config.num_stages
  scratch = [
    plgpu.SMEM((ns, config.cta_rows, config.chunk), dt),  # q_smem
    plgpu.SMEM((ns, bn, config.chunk), dt),  # k_smem
    plgpu.SMEM(e.shape, jnp.float16),  # e_smem
    plgpu.SMEM((_NUM_CONSUMERS, _ROWS_PER_WG, bn), jnp.float16) if config.p_operand == "smem" else None,
    plgpu.SMEM((_NUM_CONSUMERS, _ROWS_PER_WG, ng), jnp.float32),  # c_smem
    plgpu.SMEM((_NUM_CONSUMERS, _ROWS_PER_WG), jnp.float32),  # v_smem (m_tile, final m, l)
    plgpu.Barrier(num_arrivals=phases, num_barriers=ns),  # q loaded (one TMA box per phase)
    plgpu.Barrier(num_barriers=ns),  # k loaded
    (
      plgpu.ClusterBarrier(collective_axes=("cl",), num_arrivals=_NUM_CONSUMERS, num_barriers=ns)
      if config.cluster_heads > 1
      else plgpu.Barrier(num_arrivals=_NUM_CONSUMERS, num_barriers=ns)
    ),  # consumed
    plgpu.Barrier(),  # E loaded
  ]
  if interpret is True:
    # The last row block's and key tile's boxes run past the end of q5 / k5: the interpreter fills zeros as TMA does.
    interpret = plgpu.InterpretGPUParams(out_of_bounds_reads="raise")
  kernel = functools.partial(
    _kernel, s=s, g=g, phases=phases, causal=causal, c_scale=scale / s * _LOG2E, group=N // K, nrb=nrb, cfg=config
  )
  part, mt, ml = plgpu.kernel(
    kernel,
    out_type=(
      jax.ShapeDtypeStruct((B, N, Trp, ntiles * ng), jnp.float32),  # per-row partial block sums
      jax.ShapeDtypeStruct((B, N, ntiles, Trp), jnp.float32),  # the row max each tile used
      jax.ShapeDtypeStruct((B, N, config.key_splits, 2, Trp), jnp.float32),
    ),  # row max, sum (base 2)
    scratch_types=scratch,
    # heads fastest: the G heads of a kv head share K tiles in L2
    grid=(N // config.cluster_heads * config.key_splits, nrb, B),
    grid_names=("heads", "rows", "batch"),
    **(dict(cluster=(config.cluster_heads,), cluster_names=("cl",)) if config.cluster_heads > 1 else {}),
    num_threads=_NUM_CONSUMERS + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(
      approx_math=True,
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
      reduction_scratch_bytes=config.reduction_scratch_bytes,
    ),
    interpret=interpret if interpret else None,
  )(q5, k5, e, count, n_full, geometry.q_lengths, geometry.kv_lengths, geometry.q_positions)
  if return_parts:
    return part, mt, ml, count
  return _combine(
    part, mt, ml, count, geometry, s=s, g=g, ng=ng, nqb=nqb, nkb=nkb, cta_rows=config.cta_rows, phases=phases
  )


def _combine(part, mt, ml, count, geometry, *, s, g, ng, nqb, nkb, cta_rows, phases):
  """A[b,n,r,c] = sum_{i in r} part[i,c] * exp2(m_tile[i, c // ng] - m[i]) / l[i] over visited tiles, real rows.

  part is [B, N, Trp, ntiles*ng] f32 (1/g of the strided logits); tiles a CTA never visited hold garbage (even NaN),
  so they are removed with a where, fused into the single reduction pass over part.
  The kernel's outputs (part, m_tile, m, l) are per CTA row position p = 64 w + k (WG w, its row k). With one phase
  that is strided row p; with two, WG w held the rows of parity w, so p is row 2k + w, and query block r (g rows)
  gathers k in [r g/2, (r+1) g/2) of both WGs. E.g. g = 16: block 0 = positions 0-7 (rows 0, 2, .., 14) and 64-71
  (rows 1, 3, .., 15).
  """
  B, N, Trp, C = part.shape
  ntiles = C // ng
  m_s, l_s = ml[:, :, :, 0], ml[:, :, :, 1]  # per key split [B, N, P, Trp]
  m_s = jnp.where(l_s > 0, m_s, -jnp.inf)
  m = jnp.max(m_s, axis=2)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  l = jnp.sum(jnp.where(l_s > 0, l_s * jnp.exp2(jnp.minimum(m_s - m[:, :, None], 0.0)), 0.0), axis=2)
  rows = jnp.arange(Trp, dtype=jnp.int32)  # position -> strided row
  if phases == 2:
    half = cta_rows // 2
    rows = rows // cta_rows * cta_rows + rows % half * 2 + rows % cta_rows // half
  row_ok = rows[None, :] * s < geometry.q_lengths[:, None]  # [B, Trp]
  visited = jnp.arange(ntiles, dtype=jnp.int32)[None, None, :] < jnp.repeat(count, cta_rows, axis=1)[:, :, None]
  ok = (row_ok[:, :, None] & visited)[:, None] & (l > 0)[..., None]  # [B, N, Trp, ntiles]
  # Unvisited tiles of part / mt were never written (any bits, NaN included): select them away before any
  # arithmetic touches them. m_tile <= m wherever part != 0; the clamp keeps placeholder rows finite.
  mt = jnp.where(ok, jnp.swapaxes(mt, 2, 3), 0.0)
  w = jnp.where(ok, jnp.exp2(jnp.minimum(mt - m[..., None], 0.0)) / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
  # positions grouped by query block: [Trp/g, g], or [nrb, WG, cta_rows/g, g/2] for two phases
  grouped = (B, N, Trp // g, g) if phases == 1 else (B, N, Trp // cta_rows, 2, cta_rows // g, g // 2)
  w = w.reshape(*grouped, ntiles, 1)  # small: [B, N, Trp, ntiles]
  p6 = jnp.where(ok.reshape(*grouped, ntiles, 1), part.reshape(*grouped, ntiles, ng), 0.0)
  pw = p6 * w
  # One fused pass over part. Two phases: the WGs are added as two slices, so the reduction keeps one axis (a sum
  # over two non-adjacent axes is one XLA may split into two passes).
  a = jnp.sum(pw, axis=3) if phases == 1 else jnp.sum(pw[:, :, :, 0] + pw[:, :, :, 1], axis=4)
  return a.reshape(B, N, Trp // g, ntiles * ng)[:, :, :nqb, :nkb]
