"""Block-sparse flash attention forward for TPU (Pallas, Mosaic TPU lowering).

One grid step per (batch b, query head n, chunk of `block_rows` query blocks); every step is self-contained, so all
three grid axes are "parallel" (megacore / multi-core chips may split any of them). Inside a step a loop runs over
the chunk's query blocks -- the rows of the BlockLayout -- and, for each row, over its selected key blocks:

    for row r in chunk:                       q[b, r*128:(r+1)*128, n]      (DMA, double-buffered across rows)
      for j < counts[b, n, r]:                c = indices[b, n, r, j]       (index row DMA'd into SMEM per row)
        s = q k_c^T * scale                   k/v[b, c*128:(c+1)*128, n//G]  (DMA, double-buffered, also across rows)
        online softmax (m_i, l_i, acc in f32 VMEM scratch); token-exact mask only where the block needs one
      out row -> HBM (async DMA, double-buffered); lse row -> the (block_rows, 128) lse output block

Only selected blocks are ever copied: the inner loop has a data-dependent trip count (the row's count) and issues
exactly one K and one V DMA per visited block, so skipped blocks cost neither DMA nor compute nor grid steps. K/V
are read straight from the [B, S, K, H] arrays (GQA: query head n reads kv head n // G; nothing is repeated) with
strided DMAs; q and out likewise, so the kernel makes no transposed copy of any operand.

Prefetch order inside a step (two slots each): while row r computes block j, block j+1's K/V are in flight; while
it computes its last block, the next row's index row has arrived and its first K/V block is in flight; the next
row's q is fetched when row r starts; row r's output leaves while row r+1 computes (its slot is reused two rows
later, after a wait). Nothing crosses a grid step, so no DMA is ever left in flight at a step boundary.

Masking: a block needs the iota mask only if some key in it lies past kv_len or, causal, past the position of the
row's first query (position q_pos + r*128). Selected indices ascend, so those blocks are a suffix of the row; the
kernel decides per block with two scalar compares and runs the unmasked or the masked update. Queries past q_len
(padding) and queries that see no key output 0 with lse = -inf.

SMEM (scalars, 1 MiB per core on v5e/v6e; the budget asserted is 256 KiB). The layout table indices
[B, N, nQb, nKb] never enters SMEM whole (int32 at 128K tokens, 32 heads: 32 * 1024 * 1024 * 4 B = 128 MiB):

    scalar prefetch   q_lengths, kv_lengths, q_positions      3 * B * 4 B
    counts chunk      counts[b, n, chunk]                     block_rows * 4 B          (one DMA per step)
    index rows        indices[b, n, r, :], two slots          2 * nKb * 4 B              (one DMA per row)
    => at B = 1, 128K tokens (nKb = 1024), block_rows = 32: 12 + 128 + 8192 B ~ 8.1 KiB; nKb may reach ~32K.

VMEM (bytes, dtype size d, head dim H, blk = 128; the lse output block is double-buffered by the pipeline):

    q, k, v, out slots      4 * 2 * blk * H * d                  = 256 KiB (H = 128, bf16)
    m_i, l_i scratch        2 * blk * 128 * 4 (lane-replicated)  = 128 KiB
    acc scratch             blk * max(H, 128) * 4                = 64 KiB
    lse output block        2 * block_rows * 128 * 4             = 32 KiB (block_rows = 32)
    logits / probabilities  ~3 * blk * blk * 4 (compiler temps)  = 192 KiB
    => ~0.7 MiB, independent of T and S; asserted below 16 MiB (v5e's default scoped VMEM limit).

Numerics: logits and the softmax state are float32; for bf16 inputs P is rounded to bf16 before P @ V (the MXU's
native input), for float32 inputs both products use Precision.HIGHEST (TPU f32 matmuls are otherwise one bf16 pass).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xattn_jax.pallas_kernels.common import NT, SUPPORTED_HEAD_DIMS, check_budget, pad_tokens
from xattn_jax.pallas_kernels.row_pipeline_tpu import RowPipeline, load_counts, program_items, when_masked
from xattn_jax.geometry import Geometry, cdiv
from xattn_jax.layout import BlockLayout

BLOCK = 128  # layout block size the kernel takes: one MXU tile of queries and of keys
NUM_LANES = 128
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)
SMEM_BUDGET_BYTES = 256 * 1024
VMEM_BUDGET_BYTES = 16 * 2**20
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardConfig:
  """Static kernel settings.

  Attributes:
    block_rows: query blocks (layout rows) per grid step; a multiple of 8 (it is the sublane dim of the lse block).
      Larger amortizes the ~0.35 us grid-step overhead and the step's first, unhidden DMAs.
    skip_unselected: True (production) visits only the selected blocks. False visits every allowed block and masks
      the unselected ones to -inf: same arithmetic on the selected blocks, so the results must agree bit for bit
      (the "skipping must not change the answer" check).
  """

  block_rows: int = 32
  skip_unselected: bool = True

  def __post_init__(self):
    if not isinstance(self.block_rows, int) or self.block_rows <= 0 or self.block_rows % 8:
      raise ValueError(f"block_rows={self.block_rows!r} must be a positive multiple of 8")


def smem_bytes(*, batch: int, num_kv_blocks: int, block_rows: int) -> int:
  """SMEM the kernel holds (see the module docstring)."""
  return 3 * batch * 4 + block_rows * 4 + 2 * num_kv_blocks * 4


def vmem_bytes(*, head_dim: int, dtype, block_rows: int) -> int:
  """VMEM the kernel holds, scratch + pipelined blocks + an estimate of the compiler's temporaries."""
  d = jnp.dtype(dtype).itemsize
  lanes_h = max(head_dim, NUM_LANES)  # a 64-wide f32 row still occupies a 128-lane vreg row
  slots = 4 * 2 * BLOCK * head_dim * d
  softmax = 2 * BLOCK * NUM_LANES * 4 + BLOCK * lanes_h * 4
  lse = 2 * block_rows * NUM_LANES * 4
  temps = 3 * BLOCK * BLOCK * 4
  return slots + softmax + lse + temps


def _row_bounds(r, q_len, kv_len, q_pos, *, causal: bool):
  """(last allowed key block or -1, keys visible to every query of block r) -- scalar math on the scalar core."""
  first = r * BLOCK
  has_query = first < q_len
  if causal:
    p_last = q_pos + jnp.minimum(first + BLOCK, q_len) - 1
    last_allowed = jnp.where(has_query, lax.div(jnp.maximum(p_last, 0), BLOCK), -1)
    visible = jnp.minimum(kv_len, q_pos + first + 1)
  else:
    last_allowed = jnp.where(has_query & (kv_len > 0), lax.div(jnp.maximum(kv_len - 1, 0), BLOCK), -1)
    visible = kv_len
  return last_allowed, visible


def _kernel(
  q_len_ref,
  kv_len_ref,
  q_pos_ref,  # scalar prefetch (SMEM) [B]
  q_hbm,
  k_hbm,
  v_hbm,
  counts_hbm,
  indices_hbm,  # inputs (HBM)
  out_hbm,
  lse_ref,  # outputs: [B, Tp, N, H] in HBM, (block_rows, 128) lse block in VMEM
  q_vmem,
  k_vmem,
  v_vmem,
  o_vmem,
  m_scratch,
  l_scratch,
  acc_scratch,  # VMEM scratch
  cnt_smem,
  idx_smem,  # SMEM scratch
  q_sems,
  k_sems,
  v_sems,
  o_sems,
  idx_sems,
  cnt_sem,  # DMA semaphores
  *,
  causal: bool,
  scale: float,
  group: int,
  num_q_blocks: int,
  rows: int,
  config: ForwardConfig,
):
  b, n, r0, n_rows = program_items(rows=rows, num_items=num_q_blocks)
  kv_head = lax.div(n, group)
  q_len, kv_len, q_pos = q_len_ref[b], kv_len_ref[b], q_pos_ref[b]
  head_dim = q_vmem.shape[-1]
  f32_inputs = q_vmem.dtype == jnp.float32
  precision = lax.Precision.HIGHEST if f32_inputs else lax.Precision.DEFAULT

  load_counts(counts_hbm.at[b, n, pl.ds(r0, rows)], cnt_smem, cnt_sem.at[0])

  def q_copy(i):
    src = q_hbm.at[b, pl.ds((r0 + i) * BLOCK, BLOCK), n]
    return pltpu.make_async_copy(src, q_vmem.at[i % 2], q_sems.at[i % 2])

  def o_copy(i):
    dst = out_hbm.at[b, pl.ds((r0 + i) * BLOCK, BLOCK), n]
    return pltpu.make_async_copy(o_vmem.at[i % 2], dst, o_sems.at[i % 2])

  def idx_copy(i):
    return pltpu.make_async_copy(indices_hbm.at[b, n, r0 + i], idx_smem.at[i % 2], idx_sems.at[i % 2])

  def kv_copies(slot, block):
    keys = pl.ds(block * BLOCK, BLOCK)
    return (
      pltpu.make_async_copy(k_hbm.at[b, keys, kv_head], k_vmem.at[slot], k_sems.at[slot]),
      pltpu.make_async_copy(v_hbm.at[b, keys, kv_head], v_vmem.at[slot], v_sems.at[slot]),
    )

  def num_steps(i):  # key blocks visited by local row i
    if config.skip_unselected:
      return cnt_smem[i]
    last_allowed, _ = _row_bounds(r0 + i, q_len, kv_len, q_pos, causal=causal)
    return last_allowed + 1

  def block_of(i, j):  # key block visited at step j of local row i (its index row must be in SMEM)
    return idx_smem[i % 2, j] if config.skip_unselected else j

  pipe = RowPipeline(
    n_rows, idx_copy, lambda i: (q_copy(i),), num_steps, lambda i, slot: kv_copies(slot, block_of(i, 0))
  )
  pipe.prologue()  # row 0's index row, q and first K/V block

  def row_body(i, slot0):
    r = r0 + i
    pipe.advance(i)

    steps = num_steps(i)
    count = cnt_smem[i]
    _, visible = _row_bounds(r, q_len, kv_len, q_pos, causal=causal)
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    def update(block, selected, slot, *, masked: bool):
      q = q_vmem[i % 2]
      k = k_vmem[slot]
      s = lax.dot_general(q, k, NT, precision=precision, preferred_element_type=jnp.float32) * scale
      if masked:
        keys = block * BLOCK + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        ok = keys < kv_len
        if causal:
          ok &= keys <= q_pos + r * BLOCK + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        if not config.skip_unselected:
          ok &= selected
        s = jnp.where(ok, s, -jnp.inf)
      m_prev = m_scratch[...]  # [blk, 128], every lane holds the row's value
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows masked so far: exp(-inf - 0) = 0, no NaN
      p = jnp.exp(s - m_use)  # BLOCK == NUM_LANES: m_use already has the logits' shape
      alpha = jnp.exp(m_prev - m_use)
      l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
      m_scratch[...] = m_next
      v = v_vmem[slot]
      pv = lax.dot_general(
        p if f32_inputs else p.astype(v.dtype), v, _NN, precision=precision, preferred_element_type=jnp.float32
      )
      acc_scratch[...] = alpha[:, :head_dim] * acc_scratch[...] + pv

    def block_body(j, slot, ptr):
      block = block_of(i, j)
      if config.skip_unselected:
        selected = True
      else:  # walk the ascending index row alongside the dense sweep
        at = jnp.minimum(ptr, idx_smem.shape[1] - 1)
        selected = (ptr < count) & (idx_smem[i % 2, at] == block)
        ptr = ptr + selected.astype(jnp.int32)
      needs_mask = (block + 1) * BLOCK > visible
      if not config.skip_unselected:
        needs_mask |= jnp.logical_not(selected)
      when_masked(needs_mask, functools.partial(update, block, selected, slot))
      return ptr

    copies = lambda slot, j: kv_copies(slot, 0 if j is None else block_of(i, j))
    pipe.visit_loop(i, slot0, steps, copies, block_body, jnp.int32(0))

    # Finalize the row: zero output and lse = -inf for padding queries and queries that saw no key.
    l = l_scratch[...]
    query = r * BLOCK + lax.broadcasted_iota(jnp.int32, l.shape, 0)
    live = (l > 0) & (query < q_len)
    inv_l = jnp.where(live, 1.0 / jnp.where(live, l, 1.0), 0.0)
    lse = jnp.where(live, m_scratch[...] + jnp.log(jnp.where(live, l, 1.0)), -jnp.inf)

    @pl.when(i >= 2)
    def _():
      o_copy(i - 2).wait()  # its slot is ours now

    o_vmem[i % 2] = (acc_scratch[...] * inv_l[:, :head_dim]).astype(o_vmem.dtype)
    o_copy(i).start()
    lse_ref[pl.ds(i, 1), :] = lse.T[0:1, :]  # [blk, 128] lane-replicated -> one lane-dense row of blk queries
    return slot0 + steps

  lax.fori_loop(0, n_rows, row_body, jnp.int32(0))

  @pl.when(n_rows >= 2)
  def _():
    o_copy(n_rows - 2).wait()

  o_copy(n_rows - 1).wait()


def supports(q, k, layout: BlockLayout) -> str | None:
  """Why this kernel cannot run the call (None if it can)."""
  if q.dtype not in _SUPPORTED_DTYPES:
    return f"q.dtype={q.dtype} (the kernel takes bfloat16 or float32)"
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    return f"head dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS})"
  if layout.block_size != BLOCK:
    return f"layout.block_size={layout.block_size} (the kernel takes {BLOCK})"
  return None


@functools.partial(jax.jit, static_argnames=("causal", "scale", "config", "interpret"))
def block_sparse_attention(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  layout: BlockLayout,  # (B, N, ceil(T/128), ceil(S/128))
  geometry: Geometry,
  *,
  causal: bool,
  scale: float,
  config: ForwardConfig = ForwardConfig(),
  interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:  # out [B, T, N, H] (q.dtype), lse f32 [B, N, T]
  """SPEC §4 on validated inputs (see `xattn_jax.block_sparse_attention`).

  Args:
    q, k, v: queries [B, T, N, H], keys and values [B, S, K, H]; bfloat16 or float32, H in (64, 128).
    layout: validated BlockLayout with block_size 128.
    geometry: per-sequence lengths and positions.
    causal: token-exact causal mask (bottom-right aligned).
    scale: logit scale.
    config: static kernel settings.
    interpret: False on a TPU; True or `pltpu.InterpretParams` runs the Pallas TPU interpreter.

  Returns:
    out [B, T, N, H] in q.dtype (0 for padding queries) and lse float32 [B, N, T] (natural log, -inf where a query
    sees no key).

  Raises:
    NotImplementedError: dtype, head dim or block size the kernel does not cover, or a layout too wide for SMEM.
  """
  reason = supports(q, k, layout)
  if reason is not None:
    raise NotImplementedError(f"pallas_tpu block_sparse_attention does not support {reason}")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  nqb, nkb = cdiv(T, BLOCK), cdiv(S, BLOCK)
  rows = min(config.block_rows, nqb)
  n_chunks = cdiv(nqb, rows)
  smem = smem_bytes(batch=B, num_kv_blocks=nkb, block_rows=rows)
  if smem > SMEM_BUDGET_BYTES:
    raise NotImplementedError(f"pallas_tpu block_sparse_attention needs {smem} B of SMEM > {SMEM_BUDGET_BYTES}")
  vmem = vmem_bytes(head_dim=H, dtype=q.dtype, block_rows=rows)
  check_budget("pallas_tpu block_sparse_attention", "VMEM", vmem, VMEM_BUDGET_BYTES)
  # DMAs move whole 128-token blocks: pad ragged ends (the padding is masked: it lies past q_len / kv_len).
  q, k, v = pad_tokens(q, nqb * BLOCK), pad_tokens(k, nkb * BLOCK), pad_tokens(v, nkb * BLOCK)
  counts = layout.counts
  if n_chunks * rows != nqb:  # the last step's counts DMA reads a whole chunk
    counts = jnp.pad(counts, ((0, 0), (0, 0), (0, n_chunks * rows - nqb)))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  kernel = functools.partial(
    _kernel, causal=causal, scale=scale, group=N // K, num_q_blocks=nqb, rows=rows, config=config
  )
  out, lse = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, N, n_chunks),
      in_specs=[any_spec] * 5,
      out_specs=[any_spec, pl.BlockSpec((None, None, rows, BLOCK), lambda b, n, c, *_: (b, n, c, 0))],
      scratch_shapes=[
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # q slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # k slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # v slots
        pltpu.VMEM((2, BLOCK, H), q.dtype),  # out slots
        pltpu.VMEM((BLOCK, NUM_LANES), jnp.float32),  # m_i
        pltpu.VMEM((BLOCK, NUM_LANES), jnp.float32),  # l_i
        pltpu.VMEM((BLOCK, H), jnp.float32),  # acc
        pltpu.SMEM((rows,), jnp.int32),  # counts of the step's rows
        pltpu.SMEM((2, nkb), jnp.int32),  # index rows
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((1,)),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((B, nqb * BLOCK, N, H), q.dtype),
      jax.ShapeDtypeStruct((B, N, n_chunks * rows, BLOCK), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel"), vmem_limit_bytes=VMEM_BUDGET_BYTES
    ),
    interpret=interpret,
    name="xattn_block_sparse_attention",
  )(geometry.q_lengths, geometry.kv_lengths, geometry.q_positions, q, k, v, counts, layout.indices)
  lse = lse.reshape(B, N, n_chunks * rows * BLOCK)
  return out[:, :T], lse[:, :, :T]
