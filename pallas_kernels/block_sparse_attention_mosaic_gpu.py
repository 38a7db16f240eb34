"""Block-sparse flash attention forward for Hopper (Pallas Mosaic GPU, `plgpu.kernel`, warp specialized).

A tile is one row of the BlockLayout: (batch b, query head n, query block r). A persistent grid of CTAs (one per
SM) takes the tiles in an order computed from each tile's position (no table, no sort; `ForwardConfig.tile_order`):
kv head by kv head, and within one the rows from the last query block (the longest rows of a causal layout), the
query heads of the group side by side. Each CTA's producer claims its next tile from a GMEM counter when it has
issued the current tile's loads (`ForwardConfig.tile_scheduler`), so a CTA that drew short rows takes more of them
and the CTAs finish together. Each CTA has three warpgroups:

    WG0, WG1 (consumers)  rows [r*128, r*128+64) and [r*128+64, r*128+128) of the query block:
                          S = Q K^T (wgmma, f32 acc) -> online softmax (m_i, l_i in registers) -> acc += P V (wgmma)
    WG2 (producer)        TMA copies of the selected K and V blocks, read from the layout's index row, into a ring
                          of `num_stages` SMEM slots; k/v barriers say "loaded", k/v consumed barriers say "free".
                          The ring runs on across tiles, so the next tile's first blocks arrive early. With two
                          Q/O buffers it also loads both consumers' Q rows of each tile it claims.

Every warpgroup reads the same trip count `counts[b, n, r]`, so producer and consumers agree on the number of
steps (a row may have 0 steps: padding query blocks; the output is then 0 and the lse -inf).

Masking is token exact but only where needed: the selected indices ascend, so the key blocks that cross the causal
diagonal of the CTA's first query or the key padding form a suffix of the row. The launcher counts the unmasked
prefix per row (`n_full`, one XLA reduction over the layout) and the consumers run two loops: [0, n_full) without
a mask and [n_full, count) with the iota mask.

Two P @ V variants: "registers" keeps P in registers as the wgmma A operand (FA3; GPU only), "smem" stores P to
SMEM first (about 5% slower on an H200, and the variant the CPU interpreter can run).

Numerics: logits are scaled by scale * log2(e) and exponentiated with exp2; the lse is returned in natural log. The
epilogue normalizes with one reciprocal per row (`acc * (1 / l)`): a float division of a tile lowers to an IEEE
division per element.
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

from xattn_jax.pallas_kernels.common import (
  SM90_SMEM_BYTES,
  SUPPORTED_HEAD_DIMS,
  Operand,
  TileOrder,
  TileScheduler,
  TMA_TILE_ROWS,
  as_enum,
  pad_tokens_to_multiple,
)
from xattn_jax.pallas_kernels.tile_counter_mosaic_gpu import fetch_add_to_smem
from xattn_jax.pallas_kernels.tiles_mosaic_gpu import mask_scores
from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import BlockLayout

_LOG2E = math.log2(math.e)
TILE_SLOTS = 2  # the producer publishes claimed tiles in a ring of this many SMEM slots (a tile ahead is enough)
WARPGROUPS = 3  # two consumers and the producer (the profiler writes one trace per warpgroup)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardConfig:
  """Kernel tiles. block_kv is the layout's block size; a CTA covers one layout query block with two warpgroups."""

  block_kv: int = 128
  num_stages: int = 2  # K/V ring depth (SMEM: 2 * num_stages * block_kv * H * 2 bytes)
  pv_operand: Operand = Operand.REGISTERS  # REGISTERS (FA3) or SMEM (interpretable); strings are accepted
  producer_registers: int = 40
  consumer_registers: int = 232
  num_ctas: int | None = 132  # persistent grid: one CTA per SM (the backend passes the GPU's); None: one per row
  # The order of the tiles:
  # "kv_head": (batch, kv head) major; within one, query blocks from the last, the G query heads of the kv head
  #   fastest: the CTAs work on one kv head at a time, whose K/V (16 MiB at 32K tokens) stays in L2, and rows of
  #   like length come together (with the counter, 1.001-1.015 x the mean CTA's work at 8K-32K, simulated);
  # "head": (batch, head) major, query blocks from the last: also one kv head's K/V at a time, but a head's short
  #   first rows meet the next head's long last rows (1.004-1.05 with the counter, 1.03-1.07 with the snake);
  # "rows": query blocks from the last; within one, (batch, head) with heads fastest: the CTAs spread over all
  #   heads. On an H200 at 32K, 32 kv heads, 100% density it read 9x the DRAM bytes of "head" (42.7 vs 4.8 GB) and
  #   took 7% longer (benchmarks/notes_attention_mosaic_gpu.md).
  tile_order: TileOrder = TileOrder.KV_HEAD
  # How a CTA gets its next tile: "counter" (a GMEM atomic counter: the next position of the order goes to the
  # first CTA to ask) or "snake" (static: CTA c takes positions c, 2G - 1 - c, 2G + c, ... of G CTAs). The CPU
  # interpreter cannot run the counter's atomic (inlined Mosaic GPU code) and takes the snake instead.
  tile_scheduler: TileScheduler = TileScheduler.COUNTER
  # Mosaic GPU's profiler: a directory to write a Perfetto trace of each consumer's tile phases to (the named scopes
  # "open", "steps", "close"; `benchmarks/profile_attention_tiles.py --phases` reads it); "" (default): none.
  profile_dir: str = ""

  def __post_init__(self):
    object.__setattr__(self, "pv_operand", as_enum(Operand, self.pv_operand, "pv_operand"))
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1")
    object.__setattr__(self, "tile_order", as_enum(TileOrder, self.tile_order, "tile_order"))
    object.__setattr__(self, "tile_scheduler", as_enum(TileScheduler, self.tile_scheduler, "tile_scheduler"))
    if self.num_ctas is not None and self.num_ctas < 1:
      raise ValueError(f"num_ctas={self.num_ctas} must be None or >= 1")

  @property
  def block_q(self) -> int:  # rows per consumer warpgroup
    return self.block_kv // 2


def snake_position(i, cta, grid: int):
  """Position in the tile order of CTA `cta`'s i-th tile under TileScheduler.SNAKE: rounds of `grid` positions, the
  direction alternating between rounds (c, 2G - 1 - c, 2G + c, ...); int32 scalars in the kernel, arrays anywhere
  (benchmarks/simulate_tile_schedule.py deals the same way)."""
  return i * grid + jnp.where(lax.rem(i, 2) == 0, cta, grid - 1 - cta)


def tile_coords(t, order: TileOrder, *, batch: int, num_heads: int, num_q_blocks: int, group: int):
  """(b, r, n): batch, query block and query head of position t of the tile order (ForwardConfig.tile_order); int32
  scalars in the kernel, arrays anywhere (benchmarks/simulate_tile_schedule.py walks the same order)."""
  if order == "rows":
    r = num_q_blocks - 1 - lax.div(t, batch * num_heads)
    return lax.rem(lax.div(t, num_heads), batch), r, lax.rem(t, num_heads)
  if order == "head":
    bn = lax.div(t, num_q_blocks)
    return lax.div(bn, num_heads), num_q_blocks - 1 - lax.rem(t, num_q_blocks), lax.rem(bn, num_heads)
  per_kv_head = group * num_q_blocks  # "kv_head": the query heads of one kv head, row by row from the last
  bh, w = lax.div(t, per_kv_head), lax.rem(t, per_kv_head)
  kv_heads = num_heads // group
  return lax.div(bh, kv_heads), num_q_blocks - 1 - lax.div(w, group), lax.rem(bh, kv_heads) * group + lax.rem(w, group)


def _kernel(
  q_ref,
  k_ref,
  v_ref,
  counts_ref,
  indices_ref,
  n_full_ref,
  q_len_ref,
  kv_len_ref,
  q_pos_ref,  # GMEM in
  counter_ref,  # GMEM in and out: the tile counter (TileScheduler.COUNTER), 0 at the start
  out_ref,
  lse_ref,  # GMEM out
  qo_smem,
  k_smem,
  v_smem,
  p_smem,
  lse_smem,
  tile_smem,  # scratch
  k_barriers,
  v_barriers,
  q_barriers,
  q_free_barriers,  # two Q buffers: a consumer arrives once its previous output's stores have read the buffer
  k_consumed_barriers,
  v_consumed_barriers,
  schedule_barrier,
  tile_barriers,
  tile_consumed_barriers,
  *,
  causal: bool,
  qk_scale: float,
  group: int,
  num_tiles: int,
  grid: int,
  config: ForwardConfig,
  scheduler: TileScheduler,
):
  """Persistent: the producer claims each next tile for its CTA (the tile counter, or the static snake: positions c,
  2G - 1 - c, 2G + c, ... of the tile order for CTA c of G) when it has issued the current tile's loads, and
  publishes it in a ring of `TILE_SLOTS` SMEM slots (tile, steps, unmasked steps); the consumers read it there.
  A claimed position past the last tile ends the CTA.

  The K/V ring and its barriers run on across tiles (global step counter), so the producer prefetches the next
  tile's first blocks while the consumers finish the current one. Q/O staging is double buffered per consumer
  (where SMEM holds two buffers: P in registers): tile i's output store drains while tile i+1 computes, and the
  producer loads tile i+1's Q rows of both consumers as soon as it claims that tile, about a tile ahead, so that no
  tile opens on a full HBM round trip (~2 kcyc per tile measured; notes, "v4" and "Producer Q"). With one buffer
  each consumer loads its Q at the open, once its previous stores have read the buffer.
  """
  block_q, block_kv, stages = config.block_q, config.block_kv, config.num_stages
  num_heads, num_q_blocks = counts_ref.shape[1], counts_ref.shape[2]
  batch = counts_ref.shape[0]
  cta = lax.axis_index("cta")
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  head_dim = q_ref.shape[-1]

  coords = functools.partial(
    tile_coords, order=config.tile_order, batch=batch, num_heads=num_heads, num_q_blocks=num_q_blocks, group=group
  )
  buffers = qo_smem.shape[1]  # Q/O buffers per consumer: two where SMEM holds them (P in registers), else one

  def copy_q(b, r, n, w, buf):  # consumer w's Q rows of tile (b, r, n) into its Q/O buffer buf
    rows = pl.ds(r * block_kv + w * block_q, block_q)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], qo_smem.at[w, buf], q_barriers.at[w * buffers + buf])

  def schedule():  # ping-pong the two consumers so one's softmax overlaps the other's wgmma
    plgpu.barrier_arrive(schedule_barrier)
    plgpu.barrier_wait(schedule_barrier)

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(config.consumer_registers, action="increase")
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def read_tile(i):  # (tile, steps, unmasked steps) of this CTA's i-th tile, as the producer published them
      slot = lax.rem(i, TILE_SLOTS)
      plgpu.barrier_wait(tile_barriers.at[slot])
      published = tile_smem[slot, 0], tile_smem[slot, 1], tile_smem[slot, 2]
      plgpu.barrier_arrive(tile_consumed_barriers.at[slot])
      return published

    q_ahead = buffers > 1  # the producer loads each next tile's Q into the other buffer as soon as it claims the tile

    def arrive_for(next_tile):
      """WG1's half of the ping-pong turn that opens the next tile, taken as soon as it knows there is one.

      Within a tile each consumer arrives at the schedule barrier and waits for that phase before its next arrival
      (schedule()). The turn at a tile boundary is split instead: WG0 arrives as its epilogue begins (WG1's last
      P V may go) and waits for that phase when it opens the next tile; WG1 arrives for the next tile's first phase
      here and waits for it when it opens that tile. So WG0 normalizes and stores while WG1 runs its last softmax,
      and WG0's first softmax of the next tile runs under WG1's epilogue, instead of each epilogue waiting for the
      other consumer (notes, "split handoff"). Each consumer still waits for every phase once, before its next
      arrival: WG1 waited for its last one before its last P V, and it arrives only if a next tile will wait.
      """
      pl.when((wg == 1) & (next_tile < num_tiles))(lambda: plgpu.barrier_arrive(schedule_barrier))

    def run_tile(carry):
      i, first_step, t, count, n_full = carry
      b, r, n = coords(t)
      buf = lax.rem(i, buffers)
      q_smem = qo_smem.at[wg, buf]
      q_base = r * block_kv + wg * block_q
      # Profiled ranges (ForwardConfig.profile_dir): "open" (the Q wait, loaded here with one buffer; with two the
      # producer loaded it ahead, and the other buffer is freed here), "open_first_k" (the tile's first K block),
      # "open_turn" (the boundary turn's wait), "steps", "close".
      with jax.named_scope("open"):
        if not q_ahead:  # the one buffer: the previous tile's stores (O, lse: two groups) must have read it
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          copy_q(b, r, n, wg, 0)
        kv_len = kv_len_ref[b]
        q_position = q_pos_ref[b] + q_base  # position of this warpgroup's first query
        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(q_barriers.at[wg * buffers + buf])
        if q_ahead:  # the other buffer is free once the previous tile's stores have read it: the producer loads the
          # next tile's Q there (it waits for both consumers)

          @pl.when(i > 0)
          def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(q_free_barriers.at[lax.rem(i + 1, buffers)])

      with jax.named_scope("open_first_k"):

        @pl.when(count > 0)
        def _():
          plgpu.barrier_wait(k_barriers.at[lax.rem(first_step, stages)])

      with jax.named_scope("open_turn"):
        # The second half of the tile boundary's turn (arrive_for): WG0 waits for the phase it arrived at as its
        # previous epilogue began, WG1 for the one it arrived at as it learned of this tile.
        pl.when((wg == 1) | (i > 0))(lambda: plgpu.barrier_wait(schedule_barrier))

      def step(j, carry, *, masked: bool):
        acc, m_i, l_i = carry
        slot = lax.rem(first_step + j, stages)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          schedule()
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_consumed_barriers.at[slot])
        s = s * qk_scale
        if masked:
          s = mask_scores(
            s,
            first_key=indices_ref[b, n, r, j] * block_kv,
            first_query_position=q_position,
            kv_len=kv_len,
            causal=causal,
          )
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows masked so far: exp2(-inf - 0) = 0, not NaN
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_wait(schedule_barrier)

        def wait_next_k():
          @pl.when(j + 1 < count)
          def _():
            plgpu.barrier_wait(k_barriers.at[lax.rem(first_step + j + 1, stages)])

        if config.pv_operand == "registers":

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            wait_next_k()

          acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:
          p_smem.at[wg][...] = p16
          plgpu.commit_smem()

          def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
            wait_next_k()
            return acc_ref[...]

          acc = acc + pl.run_scoped(pv, plgpu.ACC((block_q, head_dim), jnp.float32))
        plgpu.barrier_arrive(v_consumed_barriers.at[slot])
        return acc, m_new, l_i

      with jax.named_scope("steps"):
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(n_full, count, functools.partial(step, masked=True), carry)
      with jax.named_scope("close"):  # epilogue: the turn, the next tile's slot; normalize, stage and store O and lse
        pl.when(wg == 0)(lambda: plgpu.barrier_arrive(schedule_barrier))  # WG1's last P V may go (arrive_for)
        following = read_tile(i + 1)
        arrive_for(following[0])

        rows = plgpu.broadcasted_iota(jnp.int32, (block_q,), 0, layout=row_layout) + q_base
        live = (l_i > 0) & (rows < q_len_ref[b])  # padding queries and queries that attend to nothing
        l_safe = jnp.where(live, l_i, 1.0)
        # One division per row, then multiplies: `acc / l` divides every element (IEEE, the lowering sets no fast-math
        # flag: 64 divisions per thread and ~0.5 kcyc per warpgroup in the epilogue).
        out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        out = jnp.where(lax.broadcast_in_dim(live, acc.shape, [0]), out, 0.0)
        q_smem[...] = out.astype(dtype)  # Q is dead: its SMEM tile stages the output
        lse_smem.at[wg, buf][...] = jnp.where(live, (m_i + jnp.log2(l_safe)) * (1.0 / _LOG2E), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q_base, block_q), n])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg, buf], lse_ref.at[b, n, pl.ds(q_base, block_q)])
      return (i + 1, first_step + count, *following)

    first = read_tile(0)
    arrive_for(first[0])
    tiles = lax.while_loop(lambda carry: carry[2] < num_tiles, run_tile, (jnp.int32(0), jnp.int32(0), *first))[0]
    pl.when((wg == 0) & (tiles > 0))(lambda: plgpu.barrier_wait(schedule_barrier))  # the last epilogue's turn
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(config.producer_registers, action="decrease")

    def publish(i):  # claims this CTA's i-th tile and publishes it in tile slot i % TILE_SLOTS: (tile, steps)
      slot = lax.rem(i, TILE_SLOTS)

      @pl.when(i >= TILE_SLOTS)  # both consumers must have read the slot's previous tile
      def _():
        plgpu.barrier_wait(tile_consumed_barriers.at[slot])

      if scheduler == "counter":
        fetch_add_to_smem(counter_ref, tile_smem.at[slot])
        t = tile_smem[slot, 0]
      else:  # the snake: round i of G positions, the direction alternating (evens out a causal triangle)
        t = snake_position(i, cta, grid)
        tile_smem[slot, 0] = t
      b, r, n = coords(jnp.minimum(t, num_tiles - 1))
      count = jnp.where(t < num_tiles, counts_ref[b, n, r], 0)
      tile_smem[slot, 1] = count
      tile_smem[slot, 2] = n_full_ref[b, n, r]
      plgpu.barrier_arrive(tile_barriers.at[slot])
      if buffers > 1:
        pl.when(t < num_tiles)(lambda: load_q_of_both(i, b, r, n))
      return t, count

    def load_q_of_both(i, b, r, n):
      """Two Q buffers: both consumers' Q rows of this CTA's i-th tile, into buffer i % 2, as soon as the tile is
      claimed (a tile or more ahead of its open: v4 requested it at the start of the previous tile's epilogue, and
      the open still waited for it). Buffer i % 2 last held tile i - 2, whose output stores must have read it: both
      consumers say so at tile i - 1's open."""
      buf = lax.rem(i, buffers)

      @pl.when(i >= buffers)
      def _():
        plgpu.barrier_wait(q_free_barriers.at[buf])

      for w in range(2):
        copy_q(b, r, n, w, buf)

    def load_tile(carry):  # g: blocks loaded so far by this CTA (ring position)
      i, g, t, count = carry
      b, r, n = coords(t)
      kv_head = lax.div(n, group)

      def load(j, g):
        slot = lax.rem(g, stages)
        keys = (b, pl.ds(indices_ref[b, n, r, j] * block_kv, block_kv), kv_head)

        @pl.when(g >= stages)  # the slot's previous block must be consumed
        def _():
          plgpu.barrier_wait(k_consumed_barriers.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])

        @pl.when(g >= stages)
        def _():
          plgpu.barrier_wait(v_consumed_barriers.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])
        return g + 1

      g = lax.fori_loop(0, count, load, g)
      return (i + 1, g, *publish(i + 1))  # claimed once this tile's loads are issued: late claims balance best

    tiles, total, _, _ = lax.while_loop(
      lambda carry: carry[2] < num_tiles, load_tile, (jnp.int32(0), jnp.int32(0), *publish(jnp.int32(0)))
    )

    # Observe the last consumed phases: a no-op on the GPU, required by the interpreter's barrier bookkeeping.
    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(g):
      slot = lax.rem(g, stages)
      plgpu.barrier_wait(k_consumed_barriers.at[slot])
      plgpu.barrier_wait(v_consumed_barriers.at[slot])

    @pl.loop(jnp.maximum(tiles + 1 - TILE_SLOTS, 0), tiles + 1)  # tiles + 1 published: the last one ends the CTA
    def _(i):
      plgpu.barrier_wait(tile_consumed_barriers.at[lax.rem(i, TILE_SLOTS)])

    if buffers > 1:  # the last tile's open freed the buffer of the tile before it; no Q load waited for that

      @pl.when(tiles >= 2)
      def _():
        plgpu.barrier_wait(q_free_barriers.at[lax.rem(tiles, buffers)])


# One unit of the profiler's `profile_space`: a range's 2 events x 2 int32 entries in SMEM, in each warpgroup's
# trace (jax.experimental.mosaic.gpu.profiler.ProfilerSpec; its buffer follows the kernel's SMEM).
_PROFILE_UNIT_BYTES = 2 * 2 * 4 * WARPGROUPS
_PROFILED_RANGES_PER_TILE = 5  # open, open_first_k, open_turn, steps, close


def _profiler_params(config: ForwardConfig, *, tiles_per_cta: int, smem_free: int) -> dict:
  """CompilerParams fields of the profiler: room for the five ranges of every tile of a CTA (two events each), as
  far as the SMEM left beside the kernel's (`smem_free`, from the conservative `smem_bytes`) holds it; events past
  the buffer are dropped rather than written past it (benchmarks/profile_attention_tiles.py says when a trace was
  cut short). Beside the GPU's configuration (204 KiB by `smem_bytes`) 490 units fit (23 KiB): the counter's bound
  at 8K (32 tiles per CTA, 336 units) whole, 16K's mean share (31 tiles) whole, 32K's (63 tiles, 646 units) not:
  profile 32K's tile phases from a shorter trace or with fewer ranges."""
  if not config.profile_dir:
    return {}
  space = min(2 * _PROFILED_RANGES_PER_TILE * tiles_per_cta + 16, smem_free // _PROFILE_UNIT_BYTES)
  return dict(profile_space=space, profile_dir=config.profile_dir, profile_bounds_check=True)


def _most_tiles_per_cta(num_tiles: int, grid: int, scheduler: TileScheduler) -> int:
  """A bound on one CTA's tiles for the profiler's buffer: the snake's exact share; with the counter a CTA that
  draws short rows takes more (twice the mean at most in the cases profiled; events past the buffer are dropped)."""
  share = cdiv(num_tiles, grid)
  return share if scheduler == "snake" else min(num_tiles, 2 * share)


def smem_bytes(config: ForwardConfig, head_dim: int, dtype, *, q_buffers: int) -> int:
  """SMEM of one CTA, each allocation rounded up to 1 KiB as Mosaic GPU does, plus the reduction scratch.

  Head dim 128, bf16, 2 stages, P in registers, 2 Q buffers: Q/O 2 x 2 x 64 x 128 x 2 = 64 KiB, K and V
  2 x 128 x 128 x 2 = 64 KiB each, lse 1 KiB, barriers 1 KiB each group: ~196 KiB of 227. With P in SMEM
  (+32 KiB) only one Q buffer fits.
  """
  itemsize = jnp.dtype(dtype).itemsize
  kib = lambda n: -(-n // 1024) * 1024
  total = kib(2 * q_buffers * config.block_q * head_dim * itemsize)
  total += 2 * kib(config.num_stages * config.block_kv * head_dim * itemsize)
  if config.pv_operand == "smem":
    total += kib(2 * config.block_q * config.block_kv * itemsize)
  total += kib(2 * q_buffers * config.block_q * 4) + 1024  # lse, the tile slots
  total += 8 * 1024 + 128 * 4 * 4  # barrier groups, reductions
  return total


def supports(q, k, layout: BlockLayout) -> str | None:
  """Why this kernel cannot run the call (None if it can)."""
  if q.dtype not in _SUPPORTED_DTYPES:
    return f"q.dtype={q.dtype} (the kernel takes bfloat16 or float16)"
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    return f"head dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS})"
  if layout.block_size != 128:
    return f"layout.block_size={layout.block_size} (the kernel takes 128)"
  return None


def unmasked_prefix(layout: BlockLayout, geometry: Geometry, *, causal: bool) -> jax.Array:
  """int32 [B, N, nQb]: leading selected blocks whose keys are all visible to every query of the block."""
  blk = layout.block_size
  nqb = layout.indices.shape[2]
  first_query = jnp.arange(nqb, dtype=jnp.int32)[None, :] * blk  # [1, nQb]
  visible = jnp.broadcast_to(geometry.kv_lengths[:, None], (geometry.kv_lengths.shape[0], nqb))
  if causal:  # keys up to the first query's position
    visible = jnp.minimum(visible, geometry.q_positions[:, None] + first_query + 1)
  full_blocks = (visible // blk)[:, None, :, None]  # blocks [0, full_blocks) need no mask
  steps = jnp.arange(layout.indices.shape[-1], dtype=jnp.int32)
  full = (layout.indices < full_blocks) & (steps < layout.counts[..., None])
  return jnp.sum(full, axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "config", "interpret"))
def block_sparse_attention(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  layout: BlockLayout,
  geometry: Geometry,
  *,
  causal: bool,
  scale: float,
  config: ForwardConfig = ForwardConfig(),
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """SPEC §4 on validated inputs; raises NotImplementedError for what the kernel does not cover."""
  reason = supports(q, k, layout)
  if reason is not None:
    raise NotImplementedError(f"pallas_mosaic_gpu block_sparse_attention does not support {reason}")
  B, T, N, H = q.shape
  K = k.shape[2]
  blk = config.block_kv
  nqb = cdiv(T, blk)
  # TMA boxes are whole blocks. Those past the end of q, k, v read zeros, and the padding is masked (it lies past
  # q_len / kv_len), so only lengths off whole swizzle tiles are padded: a ragged prompt costs no copy of q, k and v
  # (~300 MiB at 8000 tokens, 32 / 8 heads: measured -43 to -48 us per call on an H100). The output has q's rows
  # too: its stores are tiled TMA boxes, bounded per dimension, so a last block's rows past the end are dropped and
  # no whole-block output is written and sliced (a copy of the output: ~62 MiB there). The lse keeps whole blocks:
  # its 64-float stores are contiguous, and Mosaic GPU issues those as bulk copies clamped only to the end of the
  # whole array, so rows past T would land at the start of the next head's row (seen on an H100; the interpreter
  # does not model it). Its slice moves 4 bytes per query and head (1 MiB at 8000 tokens).
  q, k, v = (pad_tokens_to_multiple(x, TMA_TILE_ROWS) for x in (q, k, v))
  rows = q.shape[1]
  block_q, stages = config.block_q, config.num_stages
  dtype = q.dtype
  num_tiles = B * N * nqb
  grid = num_tiles if config.num_ctas is None else min(config.num_ctas, num_tiles)
  buffers = 2 if smem_bytes(config, H, dtype, q_buffers=2) <= SM90_SMEM_BYTES else 1
  kernel_smem = smem_bytes(config, H, dtype, q_buffers=buffers)
  if kernel_smem > SM90_SMEM_BYTES:
    raise NotImplementedError(
      f"{config} needs {kernel_smem} bytes of SMEM at head dim {H} (the budget is {SM90_SMEM_BYTES})"
    )
  scratch = dict(
    qo_smem=plgpu.SMEM((2, buffers, block_q, H), dtype),  # [consumer, buffer]
    k_smem=plgpu.SMEM((stages, blk, H), dtype),
    v_smem=plgpu.SMEM((stages, blk, H), dtype),
    p_smem=plgpu.SMEM((2, block_q, blk), dtype) if config.pv_operand == "smem" else None,
    lse_smem=plgpu.SMEM((2, buffers, block_q), jnp.float32),
    tile_smem=plgpu.SMEM((TILE_SLOTS, 4), jnp.int32),  # (tile, steps, unmasked steps, unused) per slot
    k_barriers=plgpu.Barrier(num_barriers=stages),
    v_barriers=plgpu.Barrier(num_barriers=stages),
    q_barriers=plgpu.Barrier(num_barriers=2 * buffers),
    q_free_barriers=plgpu.Barrier(num_arrivals=2, num_barriers=2) if buffers > 1 else None,
    k_consumed_barriers=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    v_consumed_barriers=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    schedule_barrier=plgpu.Barrier(num_arrivals=2),
    tile_barriers=plgpu.Barrier(num_barriers=TILE_SLOTS),
    tile_consumed_barriers=plgpu.Barrier(num_arrivals=2, num_barriers=TILE_SLOTS),
  )
  scheduler = TileScheduler.SNAKE if interpret else config.tile_scheduler  # the interpreter runs no atomics
  kernel = functools.partial(
    _kernel,
    causal=causal,
    qk_scale=scale * _LOG2E,
    group=N // K,
    num_tiles=num_tiles,
    grid=grid,
    config=config,
    scheduler=scheduler,
  )
  out, lse = plgpu.kernel(
    kernel,
    out_type=(jax.ShapeDtypeStruct((B, rows, N, H), dtype), jax.ShapeDtypeStruct((B, N, nqb * blk), jnp.float32)),
    scratch_types=list(scratch.values()),
    grid=(grid,),
    grid_names=("cta",),
    num_threads=WARPGROUPS,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(
      approx_math=True,
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
      **_profiler_params(
        config, tiles_per_cta=_most_tiles_per_cta(num_tiles, grid, scheduler), smem_free=SM90_SMEM_BYTES - kernel_smem
      ),
    ),
    interpret=plgpu.InterpretGPUParams(detect_races=True, out_of_bounds_reads="raise") if interpret else None,
  )(
    q,
    k,
    v,
    layout.counts,
    layout.indices,
    unmasked_prefix(layout, geometry, causal=causal),
    geometry.q_lengths,
    geometry.kv_lengths,
    geometry.q_positions,
    jax.new_ref(jnp.zeros((1,), jnp.int32)),  # the tile counter: XLA aliases it to an extra output
  )
  return (out if rows == T else out[:, :T]), lse[:, :, :T]
