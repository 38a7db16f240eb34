"""Antidiagonal block scoring (SPEC §1) for TPU (Pallas, Mosaic TPU lowering): one pass, scores never in HBM.

Strided views (built by one fused XLA copy per operand, see `strided_rows`): Qr [B, N, Tp/s, s*H] (each group of s
query tokens reversed, or in the order of another estimator of SPEC §1.7) and Kr [B, K, Sp/s, s*H], padding tokens
zeroed. Z = Qr Kr^T * scale / s is the antidiagonal sum of every s x s cell. The kernel computes the TRANSPOSED
logits tile, keys in sublanes and query rows in lanes,

    z[j, i] = <Kr[j], Qr[i]>        z: [kv_rows, L],  L = heads_per_step * q_rows  (lanes: head-major query rows)

so that everything per query row (running max, running sum) is a cheap sublane reduction into a lane vector [1, L],
and the sum over the strided key rows of one key block is a sublane-group sum: [kv_rows, L] -> [kpt, blk/s, L] ->
[kpt, L] (kpt = key blocks per tile). The G query heads that share a kv head sit side by side in the lanes, so one
K tile feeds G*q_rows MXU columns (arithmetic intensity G*q_rows FLOP per K byte).

Grid (B, kv heads * G/heads_per_step, query tiles, key tiles); the key-tile axis is the reduction. One pass:

    per key tile t:  m_t = max(m, rowmax(z_t));  p = exp(z_t - m_t);  l = l * exp(m - m_t) + colsum(p)
                     acc[t-th kpt key blocks, :] = blocksum(p)        (relative to m_t, which goes to mhist[t])
    last key tile:   acc[tile t] *= exp(mhist[t] - m) / l             (deferred normalization, one sweep)
                     out[g] = E acc_g^T  (E [qbt, q_rows] sums the blk/s strided rows of each query block; one small
                                          f32 matmul per head that also transposes into lane-dense [qbt, nKb] tiles)

Two passes (max/sum, then probabilities) would recompute the GEMM; the deferred normalization keeps one GEMM and
one exponential per logit at the price of the [nKb, L] f32 accumulator in VMEM.

Causal / padding skip: a key tile whose first cell no valid query row of the tile may see is skipped: no compute,
and its index map repeats the last needed tile, so the pipeline issues no DMA for it. Tiles that every valid row
sees in full run without the iota mask; only tiles crossing the diagonal or the key padding build it. Query rows
past q_len are zeroed in the final sweep.

VMEM (bytes; d = input dtype size, q_rows = kv_rows = 256, L = 1024 (G = 4), s*H = 1024 at s = 8, H = 128, bf16):

    Qr block (x2 pipeline)    2 * L * sH * d              = 4 MiB
    Kr block (x2 pipeline)    2 * kv_rows * sH * d        = 1 MiB
    out block (x2 pipeline)   2 * hps * qbt * nKb_p * 4   = 512 KiB at 128K (nKb_p = 1024, qbt = 16)
    acc scratch               nKb_p * L * 4               = 4 MiB at 128K
    mhist scratch             nkt * L * 4                 = 256 KiB at 128K (64 key tiles)
    m, l scratch              2 * 8 * L * 4               = 64 KiB
    z, p temporaries          2 * kv_rows * L * 4         = 2 MiB
    => ~12 MiB at 128K, asserted <= 48 MiB (fits v5e/v6e's 128 MiB and v7x's 64 MiB VMEM); the scoped-VMEM limit
    of the call is raised to the budget. acc and the out block grow with S (~36 KiB per 1K keys at s = 8,
    G = 4): S beyond ~1.1M tokens (bf16; ~0.95M for f32) raises NotImplementedError, and the dispatcher falls
    back to "xla".

SMEM: only the scalar-prefetched geometry, 3 * B * 4 bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xattn_jax.pallas_kernels.common import NT, SUPPORTED_HEAD_DIMS, check_budget
from xattn_jax.estimators import Estimator, arrange_query_groups
from xattn_jax.geometry import Geometry, cdiv

BLOCK = 128
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)
_SUPPORTED_STRIDES = (4, 8, 16)
VMEM_BUDGET_BYTES = 48 * 2**20
SMEM_BUDGET_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoresConfig:
  """Static kernel tiles, in strided rows (one strided row = s tokens).

  Attributes:
    q_rows: strided query rows per head per tile (q_rows * s tokens, whole query blocks). 256 fills the MXU's
      columns together with the G heads of a kv group.
    kv_rows: strided key rows per tile (kv_rows * s tokens, whole key blocks). 256 keeps the causal waste on the
      diagonal tiles small (tiles of 2048 tokens at s = 8) while one step still runs a 256 x 1024 x 1024 GEMM.
    max_lanes: cap on heads_per_step * q_rows (the logits tile's lane width); with many query heads per kv head
      (MQA) the G heads are split over several grid steps.
    skip_masked_tiles: True skips key tiles no query of the tile may see (no compute, no DMA); False computes them
      fully masked -- the same numbers bit for bit (the "skipping must not change the answer" check).
  """

  q_rows: int = 256
  kv_rows: int = 256
  max_lanes: int = 1024
  skip_masked_tiles: bool = True

  def __post_init__(self):
    for name in ("q_rows", "kv_rows", "max_lanes"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(f"{name}={value!r} must be a positive multiple of 8")


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Tile sizes of one call (derived from the config and the shapes)."""

  stride: int
  per_block: int  # strided rows per 128-token block
  q_rows: int  # strided query rows per head per tile
  kv_rows: int  # strided key rows per tile
  heads_per_step: int
  num_q_tiles: int
  num_kv_tiles: int

  @property
  def lanes(self) -> int:
    return self.heads_per_step * self.q_rows

  @property
  def q_blocks_per_tile(self) -> int:
    return self.q_rows // self.per_block

  @property
  def kv_blocks_per_tile(self) -> int:
    return self.kv_rows // self.per_block

  @property
  def num_kv_blocks_padded(self) -> int:
    return self.num_kv_tiles * self.kv_blocks_per_tile


def tiles_for(config: ScoresConfig, *, stride: int, group: int, q_len: int, kv_len: int) -> _Tiles:
  """Tiles for a call; shrinks the configured tiles to short sequences (whole blocks)."""
  per = BLOCK // stride
  if config.q_rows % per or config.kv_rows % per:
    raise ValueError(f"q_rows={config.q_rows} and kv_rows={config.kv_rows} must be multiples of {BLOCK}/{stride=}")
  q_rows = min(config.q_rows, cdiv(q_len, BLOCK) * per)
  kv_rows = min(config.kv_rows, cdiv(kv_len, BLOCK) * per)
  hps = max(d for d in range(1, group + 1) if group % d == 0 and (d == 1 or d * q_rows <= config.max_lanes))
  return _Tiles(
    stride=stride,
    per_block=per,
    q_rows=q_rows,
    kv_rows=kv_rows,
    heads_per_step=hps,
    num_q_tiles=cdiv(q_len, q_rows * stride),
    num_kv_tiles=cdiv(kv_len, kv_rows * stride),
  )


def vmem_bytes(tiles: _Tiles, *, head_dim: int, dtype) -> int:
  """VMEM the kernel holds (module docstring): pipelined blocks, scratch, logits temporaries."""
  d = jnp.dtype(dtype).itemsize
  sh = tiles.stride * head_dim
  L = tiles.lanes
  lanes = lambda x: cdiv(x, 128) * 128
  subl = lambda x: cdiv(x, 8) * 8
  qr = 2 * L * sh * d
  kr = 2 * tiles.kv_rows * sh * d
  out = 2 * tiles.heads_per_step * subl(tiles.q_blocks_per_tile) * lanes(tiles.num_kv_blocks_padded) * 4
  acc = subl(tiles.num_kv_blocks_padded) * lanes(L) * 4
  mhist = subl(tiles.num_kv_tiles) * lanes(L) * 4
  ml = 2 * 8 * lanes(L) * 4
  temps = 2 * tiles.kv_rows * lanes(L) * 4
  return qr + kr + out + acc + mhist + ml + temps


def smem_bytes(*, batch: int) -> int:
  return 3 * batch * 4


def _key_limits(i, q_len, kv_len, q_pos, *, tiles: _Tiles, causal: bool):
  """Scalars for query tile i: (last key token some valid row may see, last key token all valid rows see).

  A strided cell (row, j) is allowed iff j*s <= p(min(row*s + s - 1, q_len - 1)) and j*s < kv_len (SPEC §1.3);
  both limits are -1 when the tile holds no valid query row.
  """
  s = tiles.stride
  first = i * tiles.q_rows * s  # first query token of the tile
  has_rows = first < q_len
  if causal:
    see_some = jnp.minimum(kv_len - 1, q_pos + jnp.minimum((i + 1) * tiles.q_rows * s - 1, q_len - 1))
    see_all = jnp.minimum(kv_len - 1, q_pos + jnp.minimum(first + s - 1, q_len - 1))
  else:
    see_some = see_all = kv_len - 1
  return jnp.where(has_rows, see_some, -1), jnp.where(has_rows, see_all, -1)


def _last_needed_tile(i, q_len, kv_len, q_pos, *, tiles: _Tiles, causal: bool):
  see_some, _ = _key_limits(i, q_len, kv_len, q_pos, tiles=tiles, causal=causal)
  return jnp.where(see_some >= 0, lax.div(jnp.maximum(see_some, 0), tiles.kv_rows * tiles.stride), -1)


def _kernel(
  q_len_ref,
  kv_len_ref,
  q_pos_ref,  # scalar prefetch (SMEM) [B]
  qr_ref,  # [hps, q_rows, s*H]
  kr_ref,  # [kv_rows, s*H]
  out_ref,  # [hps, qbt, nKb_p] f32
  acc_ref,
  mhist_ref,
  m_ref,
  l_ref,  # VMEM scratch: [nKb_p, L], [nkt, L], [1, L], [1, L]
  *,
  tiles: _Tiles,
  causal: bool,
  scale: float,
  skip: bool,
):
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len, q_pos = q_len_ref[b], kv_len_ref[b], q_pos_ref[b]
  s, per, L = tiles.stride, tiles.per_block, tiles.lanes
  kpt = tiles.kv_blocks_per_tile
  f32_inputs = qr_ref.dtype == jnp.float32
  see_some, see_all = _key_limits(i, q_len, kv_len, q_pos, tiles=tiles, causal=causal)
  last_needed = _last_needed_tile(i, q_len, kv_len, q_pos, tiles=tiles, causal=causal)

  def local_row():  # [1, L] int32: the strided query row (within the tile) of every lane; lanes are head-major
    lane = lax.broadcasted_iota(jnp.int32, (1, L), 1)
    row = lane
    for g in range(1, tiles.heads_per_step):
      row = jnp.where(lane >= g * tiles.q_rows, lane - g * tiles.q_rows, row)
    return row

  @pl.when(t == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  def step(*, masked: bool):
    qr = qr_ref[...].reshape(L, qr_ref.shape[-1])  # heads side by side: one GEMM for the whole kv group
    z = lax.dot_general(
      kr_ref[...],
      qr,
      NT,
      preferred_element_type=jnp.float32,
      precision=lax.Precision.HIGHEST if f32_inputs else lax.Precision.DEFAULT,
    ) * (scale / s)  # [kv_rows, L]
    if masked:
      row = i * tiles.q_rows + local_row()
      limit = jnp.minimum(kv_len - 1, q_pos + jnp.minimum(row * s + s - 1, q_len - 1)) if causal else kv_len - 1
      key = (t * tiles.kv_rows + lax.broadcasted_iota(jnp.int32, z.shape, 0)) * s  # first token of each key cell
      z = jnp.where(key <= limit, z, -jnp.inf)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(z, axis=0, keepdims=True))
    m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows masked so far: exp(-inf - 0) = 0, no NaN
    p = jnp.exp(z - m_use)
    l_ref[...] = l_ref[...] * jnp.exp(m_prev - m_use) + jnp.sum(p, axis=0, keepdims=True)
    m_ref[...] = m_next
    mhist_ref[pl.ds(t, 1), :] = m_next
    # block sums, relative to m_next
    acc_ref[pl.ds(pl.multiple_of(t * kpt, kpt), kpt), :] = jnp.sum(p.reshape(kpt, per, L), axis=1)

  needed = (t <= last_needed) if skip else True
  full = ((t + 1) * tiles.kv_rows - 1) * s <= see_all  # the tile's last cell is visible to the first row
  pl.when(needed & full)(functools.partial(step, masked=False))
  pl.when(needed & jnp.logical_not(full))(functools.partial(step, masked=True))

  @pl.when(t == tiles.num_kv_tiles - 1)
  def _finalize():
    last_visited = last_needed if skip else tiles.num_kv_tiles - 1
    m, l = m_ref[...], l_ref[...]
    valid = ((i * tiles.q_rows + local_row()) * s < q_len) & (l > 0)  # padding rows have probability 0
    inv_l = jnp.where(valid, 1.0 / jnp.where(valid, l, 1.0), 0.0)
    m_fin = jnp.where(m == -jnp.inf, 0.0, m)

    def normalize(u, carry):
      rows = pl.ds(pl.multiple_of(u * kpt, kpt), kpt)
      factor = jnp.exp(mhist_ref[pl.ds(u, 1), :] - m_fin) * inv_l
      acc_ref[rows, :] = jnp.where(u <= last_visited, acc_ref[rows, :] * factor, 0.0)  # never-visited: 0
      return carry

    lax.fori_loop(0, tiles.num_kv_tiles, normalize, 0)
    qbt = tiles.q_blocks_per_tile
    qb = lax.broadcasted_iota(jnp.int32, (qbt, tiles.q_rows), 0)
    row = lax.broadcasted_iota(jnp.int32, (qbt, tiles.q_rows), 1)
    sum_rows = ((row >= qb * per) & (row < (qb + 1) * per)).astype(jnp.float32)  # [qbt, q_rows]
    for g in range(tiles.heads_per_step):
      acc_g = acc_ref[:, pl.ds(g * tiles.q_rows, tiles.q_rows)]  # [nKb_p, q_rows]
      out_ref[g] = lax.dot_general(
        sum_rows, acc_g, NT, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
      )


def supports(q, k, *, stride: int, block_size: int) -> str | None:
  """Why this kernel cannot run the call (None if it can)."""
  if q.dtype not in _SUPPORTED_DTYPES:
    return f"q.dtype={q.dtype} (the kernel takes bfloat16 or float32)"
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    return f"head dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS})"
  if block_size != BLOCK:
    return f"block_size={block_size} (the kernel takes {BLOCK})"
  if stride not in _SUPPORTED_STRIDES:
    return f"stride={stride} (the kernel takes {_SUPPORTED_STRIDES})"
  return None


def strided_rows(
  x: jax.Array, lengths: jax.Array, *, stride: int, padded_len: int, queries: Estimator | None
) -> jax.Array:
  """[B, L, h, H] -> [B, h, padded_len/s, s*H]: groups of s tokens concatenated, padding zeroed; in token order for
  keys (`queries` None), in the estimator's Qr order for queries (`xattn_jax.estimators.arrange_query_groups`).

  XLA fuses pad, mask, reorder and transpose into one copy (read + write of the operand).
  """
  B, length, heads, H = x.shape
  x = jnp.pad(x, ((0, 0), (0, padded_len - length), (0, 0), (0, 0)))
  token = jnp.arange(padded_len, dtype=jnp.int32)
  x = jnp.where((token[None, :] < lengths[:, None])[..., None, None], x, jnp.zeros((), x.dtype))
  x = x.reshape(B, padded_len // stride, stride, heads, H)
  if queries is not None:
    x = arrange_query_groups(x, queries, row_axis=1, slot_axis=2)
  return x.transpose(0, 3, 1, 2, 4).reshape(B, heads, padded_len // stride, stride * H)


@functools.partial(
  jax.jit, static_argnames=("stride", "block_size", "causal", "scale", "config", "interpret", "estimator")
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
  config: ScoresConfig = ScoresConfig(),
  interpret: bool | pltpu.InterpretParams = False,
  estimator: Estimator = Estimator.ANTIDIAGONAL,
) -> jax.Array:  # f32 [B, N, ceil(T/128), ceil(S/128)]
  """SPEC §1 block scores on validated inputs (see `xattn_jax.antidiagonal_scores`).

  Args:
    q: queries [B, T, N, H]; bfloat16 or float32, H in (64, 128).
    k: keys [B, S, K, H].
    geometry: per-sequence lengths and positions.
    stride: 4, 8 or 16.
    block_size: 128.
    causal: cell-granular causal mask (bottom-right aligned).
    scale: logit scale (the kernel applies scale / stride).
    config: static tiles.
    interpret: False on a TPU; True or `pltpu.InterpretParams` runs the Pallas TPU interpreter.
    estimator: the order of the query tokens in each strided row (SPEC §1.7); only the copy building Qr changes.

  Returns:
    float32 [B, N, ceil(T/128), ceil(S/128)].

  Raises:
    NotImplementedError: dtype, head dim, block size or stride the kernel does not cover, or an S too long for the
      VMEM accumulator.
  """
  reason = supports(q, k, stride=stride, block_size=block_size)
  if reason is not None:
    raise NotImplementedError(f"pallas_tpu antidiagonal_scores does not support {reason}")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  G = N // K
  tiles = tiles_for(config, stride=stride, group=G, q_len=T, kv_len=S)
  vmem = vmem_bytes(tiles, head_dim=H, dtype=q.dtype)
  if vmem > VMEM_BUDGET_BYTES:
    raise NotImplementedError(f"pallas_tpu antidiagonal_scores needs {vmem} B of VMEM > {VMEM_BUDGET_BYTES} (S={S})")
  check_budget("pallas_tpu antidiagonal_scores", "SMEM", smem_bytes(batch=B), SMEM_BUDGET_BYTES)
  s, hps = stride, tiles.heads_per_step
  tq, tk = tiles.q_rows * s, tiles.kv_rows * s
  qr = strided_rows(q, geometry.q_lengths, stride=s, padded_len=tiles.num_q_tiles * tq, queries=estimator)
  kr = strided_rows(k, geometry.kv_lengths, stride=s, padded_len=tiles.num_kv_tiles * tk, queries=None)
  qbt, nkb_p = tiles.q_blocks_per_tile, tiles.num_kv_blocks_padded
  steps_per_kv_head = G // hps

  def kv_index(b, h, i, t, q_len_ref, kv_len_ref, q_pos_ref):
    del h
    if not config.skip_masked_tiles:
      return t
    last = _last_needed_tile(i, q_len_ref[b], kv_len_ref[b], q_pos_ref[b], tiles=tiles, causal=causal)
    return jnp.minimum(t, jnp.maximum(last, 0))  # skipped tiles re-address the resident one: no DMA

  kernel = functools.partial(_kernel, tiles=tiles, causal=causal, scale=scale, skip=config.skip_masked_tiles)
  out = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, N // hps, tiles.num_q_tiles, tiles.num_kv_tiles),
      in_specs=[
        pl.BlockSpec((None, hps, tiles.q_rows, s * H), lambda b, h, i, t, *_: (b, h, i, 0)),
        pl.BlockSpec(
          (None, None, tiles.kv_rows, s * H),
          lambda b, h, i, t, *refs: (b, h // steps_per_kv_head, kv_index(b, h, i, t, *refs), 0),
        ),
      ],
      out_specs=pl.BlockSpec((None, hps, qbt, nkb_p), lambda b, h, i, t, *_: (b, h, i, 0)),
      scratch_shapes=[
        pltpu.VMEM((nkb_p, tiles.lanes), jnp.float32),  # acc: block sums per key block and query row
        pltpu.VMEM((tiles.num_kv_tiles, tiles.lanes), jnp.float32),  # mhist: running max after each tile
        pltpu.VMEM((1, tiles.lanes), jnp.float32),  # m
        pltpu.VMEM((1, tiles.lanes), jnp.float32),  # l
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((B, N, tiles.num_q_tiles * qbt, nkb_p), jnp.float32),
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"), vmem_limit_bytes=VMEM_BUDGET_BYTES
    ),
    interpret=interpret,
    name="xattn_antidiagonal_scores",
  )(geometry.q_lengths, geometry.kv_lengths, geometry.q_positions, qr, kr)
  return out[:, :, : cdiv(T, BLOCK), : cdiv(S, BLOCK)]
