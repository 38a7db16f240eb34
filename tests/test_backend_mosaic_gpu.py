"""The pallas_mosaic_gpu backend on a CPU: its kernels in the Mosaic GPU interpreter against the oracle, and the
real Mosaic GPU lowering ("cuda") at production shapes. The GPU itself: tests/test_mosaic_gpu_device.py."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as attention_kernel
from tests import oracle, suites
from tests.conftest import random_qkv, run_checked
from tests.hlo_checks import large_ops
from xattn_jax.geometry import Geometry
from xattn_jax.layout import BlockLayout


def _races_found() -> bool:
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  races = gpu_callbacks.get_races()
  return bool(races is not None and races.races_found)


class TestAttentionMosaicGpuInterpret(suites.KernelAttentionSuite):
  implementation = "pallas_mosaic_gpu"
  interpret = True

  def after_run(self):
    assert not _races_found(), "the Mosaic GPU interpreter recorded a race"


class TestScoresMosaicGpuInterpret(suites.KernelScoresSuite):
  implementation = "pallas_mosaic_gpu"
  interpret = True
  input_dtypes = (jnp.bfloat16, jnp.float16)
  atol = {jnp.bfloat16: 5e-4, jnp.float16: 5e-4}  # P is rounded to f16 for the block-sum wgmma

  def after_run(self):
    assert not _races_found(), "the Mosaic GPU interpreter recorded a race"


def test_unsupported_inputs_fall_through_to_xla():
  q, k, v = random_qkv(61, B=1, T=64, S=64, N=2, K=2, H=16)  # float32, head dim 16: not for this kernel
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  with pytest.raises(NotImplementedError, match="pallas_mosaic_gpu"):
    xa.block_sparse_attention(q, k, v, layout, implementation="pallas_mosaic_gpu", interpret=True)
  out = run_checked(
    xa.block_sparse_attention, q, k, v, layout, implementation=("pallas_mosaic_gpu", "xla"), interpret=True
  )
  np.testing.assert_allclose(
    np.asarray(out), np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True)), atol=2e-5
  )


def test_needs_a_gpu_unless_interpreted():
  if jax.default_backend() == "gpu":
    pytest.skip("has a GPU")
  q, k, v = random_qkv(62, B=1, T=128, S=128, N=2, K=2, H=64, dtype=jnp.bfloat16)
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
    xa.block_sparse_attention(q, k, v, layout, implementation="pallas_mosaic_gpu")


def test_xattention_with_the_kernel_matches_xla():
  B, T, N, K, H = 1, 300, 2, 1, 64
  q, k, v = random_qkv(63, B=B, T=T, S=T, N=N, K=K, H=H, dtype=jnp.bfloat16)
  kw = dict(is_causal=True, threshold=0.8, stride=8, return_block_layout=True)
  got, layout = run_checked(xa.xattention, q, k, v, implementation=("pallas_mosaic_gpu", "xla"), interpret=True, **kw)
  want, want_layout = run_checked(xa.xattention, q, k, v, implementation="xla", **kw)
  np.testing.assert_array_equal(np.asarray(layout.indices), np.asarray(want_layout.indices))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("estimator", list(xa.Estimator), ids=[e.value for e in xa.Estimator])
@pytest.mark.parametrize("length,stride", [(32768, 8), (131072, 8), (131072, 16)])
def test_scores_kernel_lowers_for_cuda_at_production_shapes(length, stride, estimator):
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel

  sds = jax.ShapeDtypeStruct
  geometry = Geometry(*(sds((1,), jnp.int32),) * 3)
  f = functools.partial(
    scores_kernel.antidiagonal_scores, stride=stride, block_size=128, causal=True, scale=128**-0.5, estimator=estimator
  )
  lowered = (
    jax.jit(f)
    .trace(sds((1, length, 32, 128), jnp.bfloat16), sds((1, length, 8, 128), jnp.bfloat16), geometry)
    .lower(lowering_platforms=("cuda",))
  )
  assert "mosaic_gpu" in lowered.as_text()[:200000]


@pytest.mark.parametrize("heads,kv_heads,cluster", [(32, 8, 2), (28, 4, 1), (6, 6, 1)])
def test_scores_default_clusters_query_heads_only_where_the_gqa_group_is_even(heads, kv_heads, cluster):
  """The GPU default (2-CTA clusters sharing K, 2 key splits) must not turn an odd GQA group away from the kernel
  (the backend would fall back to XLA): there it runs without clusters."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel

  config = scores_kernel.ScoresConfig().for_group(heads // kv_heads)
  assert (config.cluster_heads, config.key_splits) == (cluster, 2)
  sds = jax.ShapeDtypeStruct
  q, k = sds((1, 2048, heads, 128), jnp.bfloat16), sds((1, 2048, kv_heads, 128), jnp.bfloat16)
  assert scores_kernel.supports(q, k, stride=8, block_size=128) is None
  f = functools.partial(scores_kernel.antidiagonal_scores, stride=8, block_size=128, causal=True, scale=128**-0.5)
  lowered = jax.jit(f).trace(q, k, Geometry(*(sds((1,), jnp.int32),) * 3)).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()[:200000]
  if cluster == 1:  # asked for explicitly, a cluster is still refused with the reason
    reason = scores_kernel.supports(q, k, stride=8, block_size=128, config=scores_kernel.ScoresConfig(cluster_heads=2))
    assert "cluster_heads=2" in reason


@pytest.mark.parametrize("stride", [8, 16])
def test_scores_kernel_reads_a_bucketed_prompt_without_copying_it(stride):
  """A real prompt is bucketed to a multiple of 128 tokens, not of the scorer's CTA rows (1024 / 2048 tokens) or key
  tiles (2048 / 4096): the last boxes run past the end of q and K (TMA zero fill) instead of a padded copy of both
  per call (~1.9 GB per layer of a 128K prefill, in three query chunks). T = 130944 = 1023 x 128."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel

  sds = jax.ShapeDtypeStruct
  T, N, K, H = 130944, 32, 8, 128
  f = functools.partial(scores_kernel.antidiagonal_scores, stride=stride, block_size=128, causal=True, scale=H**-0.5)
  geometry = Geometry(*(sds((1,), jnp.int32),) * 3)
  lowered = jax.jit(f).trace(sds((1, T, N, H), jnp.bfloat16), sds((1, T, K, H), jnp.bfloat16), geometry)
  text = lowered.lower(lowering_platforms=("cuda",)).as_text()
  big = large_ops(text, T * K * H)  # the selects: the conditional zeroing of straddling tokens (lengths % s != 0)
  assert "mosaic_gpu" in text[:200000] and not big["pad"] and not big["concatenate"], dict(big)


ALTERNATING_CASES = [  # B, T, S, N, K, H, stride, causal, config options
  (2, 1100, 1300, 4, 2, 64, 8, True, {"cluster_heads": 1, "key_splits": 1}),  # two CTA row blocks (1024 tokens)
  (2, 1100, 1300, 4, 2, 64, 8, False, {"cluster_heads": 1, "key_splits": 2}),
  (1, 2100, 2300, 2, 1, 64, 16, True, {"cluster_heads": 2, "key_splits": 1}),  # two row blocks, two key tiles
  (2, 700, 900, 2, 2, 64, 16, False, {}),  # the GPU default: an odd group (1), so no cluster; 2 key splits
]


@pytest.mark.parametrize(
  "case",
  ALTERNATING_CASES,
  ids=[
    f"T{c[1]}S{c[2]}s{c[6]}{'c' if c[7] else 'nc'}" + "".join(f"-{k}{v}" for k, v in c[8].items())
    for c in ALTERNATING_CASES
  ],
)
def test_alternating_scores_kernel_matches_oracle(case):
  """SPEC §1.7 in the kernel: the two row parities are two TMA boxes, one per consumer warpgroup, and the combine
  regroups the warpgroups' rows. Ragged lengths (the second sequence off every multiple of s), row blocks past the
  first (odd rows of a later CTA), split key ranges and 2-CTA clusters, against the float64 oracle."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel

  B, T, S, N, K, H, stride, causal, options = case
  q, k, _ = random_qkv(hash((T, S, stride, causal)) % 2**31, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  q_lens = jnp.array([T, T - 37][:B], jnp.int32)
  kv_lens = jnp.array([S, S - 101][:B], jnp.int32)
  config = scores_kernel.ScoresConfig(p_operand="smem", num_stages=2, **options)
  kw = dict(stride=stride, block_size=128, causal=causal, scale=H**-0.5)
  geometry = Geometry.from_lengths(q_lens, kv_lens)
  got = scores_kernel.antidiagonal_scores(
    q, k, geometry, config=config, interpret=True, estimator=xa.Estimator.ALTERNATING, **kw
  )
  assert not _races_found(), "the Mosaic GPU interpreter recorded a race"
  want = oracle.scores(q, k, q_lens=q_lens, kv_lens=kv_lens, estimator="alternating", **kw)
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-4, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("stride", [8, 16])
def test_alternating_scores_read_q_where_it_lies(stride, causal):
  """Issue #18: the alternating estimator (SPEC §1.7) costs no XLA copy of q. Its cuda-lowered program has no op
  producing a q-sized tensor that the paper's program lacks (reshapes aside: free views). The earlier build reordered
  q before the kernel (reverse, roll = slices + concatenate, select of all of q) and fails this. A ragged length
  (off every multiple of s and of the CTA's rows) and dynamic per-sequence lengths, so the zero-padding path
  (pad, select) is in both programs and must be shared, not duplicated."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel

  sds = jax.ShapeDtypeStruct
  T, N, K, H = 3001, 4, 2, 128
  geometry = Geometry(*(sds((2,), jnp.int32),) * 3)

  def program(estimator):
    f = functools.partial(
      scores_kernel.antidiagonal_scores,
      stride=stride,
      block_size=128,
      causal=causal,
      scale=H**-0.5,
      estimator=estimator,
    )
    q, k = sds((2, T, N, H), jnp.bfloat16), sds((2, T, K, H), jnp.bfloat16)
    return jax.jit(f).trace(q, k, geometry).lower(lowering_platforms=("cuda",)).as_text()

  q_size = 2 * T * N * H
  texts = {e: program(e) for e in xa.Estimator}
  assert all("mosaic_gpu" in text for text in texts.values())
  paper = large_ops(texts[xa.Estimator.ANTIDIAGONAL], q_size)
  alternating = large_ops(texts[xa.Estimator.ALTERNATING], q_size)
  assert paper["pad"] and paper["select"], paper  # the check sees q's padding
  extra = alternating - paper
  del extra["reshape"]
  assert not extra, f"q-sized XLA ops only the alternating program has: {dict(extra)}"


def _abstract_forward(length, heads, kv_heads, head_dim, config):
  """The forward kernel's call on abstract inputs (causal, one sequence): (function, arguments)."""
  nb = -(-length // 128)
  sds = jax.ShapeDtypeStruct
  layout = BlockLayout(
    counts=sds((1, heads, nb), jnp.int32),
    indices=sds((1, heads, nb, nb), jnp.int32),
    num_allowed=sds((1, heads, nb), jnp.int32),
    block_size=128,
  )
  geometry = Geometry(*(sds((1,), jnp.int32),) * 3)
  f = functools.partial(attention_kernel.block_sparse_attention, causal=True, scale=head_dim**-0.5, config=config)
  qkv = [sds((1, length, n, head_dim), jnp.bfloat16) for n in (heads, kv_heads, kv_heads)]
  return f, (*qkv, layout, geometry)


def _cuda_lowering(length, heads, kv_heads, head_dim, config=attention_kernel.ForwardConfig()) -> str:
  """The forward kernel's call lowered for cuda from this host: its text."""
  f, args = _abstract_forward(length, heads, kv_heads, head_dim, config)
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
  "length,kv_heads,head_dim,pv_operand",
  [(32768, 8, 128, "registers"), (131072, 8, 128, "registers"), (32768, 32, 128, "smem"), (32768, 8, 64, "registers")],
)
def test_lowers_for_cuda_at_production_shapes(length, kv_heads, head_dim, pv_operand):
  """The real Mosaic GPU lowering (layouts, wgmma shapes, the 227 KiB shared-memory budget), no GPU needed."""
  config = attention_kernel.ForwardConfig(pv_operand=pv_operand)
  assert "mosaic_gpu" in _cuda_lowering(length, 32, kv_heads, head_dim, config)[:200000]


@pytest.mark.parametrize("scheduler", ["counter", "snake"])
def test_tile_counter_is_a_fresh_zero_aliased_to_an_output(scheduler):
  """With the counter, the kernel's module holds the atomic add, and the call takes an int32[1] zero that XLA
  aliases to an extra output (so every call starts from 0, also when a jit chains calls); the snake has neither."""
  text = _cuda_lowering(8192, 32, 8, 128, attention_kernel.ForwardConfig(tile_scheduler=scheduler))
  (call,) = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
  assert ("llvm.atomicrmw" in call) == (scheduler == "counter")
  assert ("output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [2]" in call) == (
    scheduler == "counter"
  )
  counter = re.search(r"custom_call @mosaic_gpu\w*\(([^)]*)\)", call).group(1).split(", ")[-1]  # the last operand
  zero = re.search(
    rf"{counter} = stablehlo.broadcast_in_dim (%\w+), dims = \[\] : \(tensor<i32>\) -> tensor<1xi32>", text
  )
  assert zero and re.search(rf"{zero.group(1)} = stablehlo.constant dense<0> : tensor<i32>", text), counter


def test_attention_kernel_reads_a_ragged_prompt_without_copying_it():
  """T = 8000 (not a multiple of the 128-token block): the boxes past the end of q, k and v read zeros (TMA), so the
  cuda-lowered call pads none of them (before: a padded copy of each). The output has q's rows (its tiled stores past
  the end are dropped), so it is not sliced out of a whole-block one (before: an output-sized copy). The lse is: its
  contiguous stores are clamped only at the end of the array (see the launcher), so it must keep whole blocks."""
  T, N, K, H = 8000, 32, 8, 128
  text = _cuda_lowering(T, N, K, H)
  big = large_ops(text, T * K * H)
  assert "mosaic_gpu" in text[:200000] and not big["pad"], dict(big)
  assert not large_ops(text, T * N * H)["slice"], dict(large_ops(text, T * N * H))
  lse_slices = re.findall(r"stablehlo\.slice.*tensor<1x32x8064xf32>.*tensor<1x32x8000xf32>", text)
  assert len(lse_slices) == 1, "the kernel's lse must have whole blocks (8064 rows), sliced to T"


@pytest.mark.parametrize(
  "num_ctas,tile_order",
  [(1, "rows"), (3, "rows"), (None, "rows"), (3, "head"), (4, "head"), (1, "kv_head"), (3, "kv_head")],
)
def test_persistent_grid_runs_several_tiles_per_cta(num_ctas, tile_order):
  """Rows of different lengths (and empty padding rows) walked by few CTAs in each tile order: the K/V ring crosses
  tiles, and the producer publishes each claimed tile through the ring of tile slots (the interpreter claims by the
  static snake; the counter's atomic runs on the GPU only)."""
  from xattn_jax import attention_xla

  B, T, S, N, K, H = 2, 300, 400, 2, 1, 64
  q, k, v = random_qkv(64, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = (jnp.array([300, 100], jnp.int32), jnp.array([400, 150], jnp.int32))
  geometry = Geometry.from_lengths(*lens)
  layout, _ = suites.random_layout(65, B=B, N=N, T=T, S=S, blk=128, causal=True, lens=lens, density=0.7)
  assert int(jnp.min(layout.counts)) == 0 and int(jnp.max(layout.counts)) >= 3
  config = attention_kernel.ForwardConfig(pv_operand="smem", num_ctas=num_ctas, tile_order=tile_order)
  out, lse = run_checked(
    attention_kernel.block_sparse_attention,
    q,
    k,
    v,
    layout,
    geometry,
    causal=True,
    scale=H**-0.5,
    config=config,
    interpret=True,
  )
  assert not _races_found()
  want, want_lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, causal=True, scale=H**-0.5)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(want_lse)))
  live = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[live], np.asarray(want_lse)[live], atol=1e-3)


@pytest.mark.parametrize("order", ["rows", "head", "kv_head"])
def test_each_tile_order_visits_every_tile_once(order):
  """Positions 0 .. B*N*nQb - 1 of the order map one to one onto (b, r, n), last query blocks first; "kv_head" keeps
  the G query heads of one kv head together, row by row."""
  B, N, nqb, group = 2, 6, 5, 3
  t = jnp.arange(B * N * nqb, dtype=jnp.int32)
  b, r, n = (
    np.asarray(x) for x in attention_kernel.tile_coords(t, order, batch=B, num_heads=N, num_q_blocks=nqb, group=group)
  )
  assert sorted(zip(b, r, n)) == [(i, j, k) for i in range(B) for j in range(nqb) for k in range(N)]
  assert r[0] == nqb - 1
  if order == "kv_head":
    assert list(zip(b[:7], r[:7], n[:7])) == [
      (0, 4, 0),
      (0, 4, 1),
      (0, 4, 2),
      (0, 3, 0),
      (0, 3, 1),
      (0, 3, 2),
      (0, 2, 0),
    ]
    assert (n[: group * nqb] < group).all() and (b[: N * nqb] == 0).all()


def test_profiler_is_off_unless_a_directory_is_given():
  """ForwardConfig.profile_dir turns on Mosaic GPU's profiler (its trace dump needs a GPU backend to lower, so the
  traced run is a device step: benchmarks/profile_attention_tiles.py --phases); room for 5 ranges per tile."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  assert attention_kernel._profiler_params(attention_kernel.ForwardConfig(), tiles_per_cta=16, smem_free=9999) == {}
  params = attention_kernel._profiler_params(
    attention_kernel.ForwardConfig(profile_dir="/tmp/p"), tiles_per_cta=16, smem_free=20 * 1024
  )
  assert params == dict(profile_space=10 * 16 + 16, profile_dir="/tmp/p", profile_bounds_check=True)
  plgpu.CompilerParams(**params)  # fields this jax version has


def test_profiler_buffer_fits_beside_the_kernel():
  """The counter's bound at 32K (126 tiles per CTA, twice the mean) did not fit beside the kernel on an H100
  (237,896 > 232,448 bytes): the buffer is cut to the SMEM left, by Mosaic GPU's own accounting of it. The
  counter's bound at 8K (32 tiles per CTA) fits whole: five ranges of two events per tile."""
  from jax.experimental.mosaic.gpu import profiler

  config = attention_kernel.ForwardConfig(profile_dir="/tmp/p")
  free = 227 * 1024 - attention_kernel.smem_bytes(config, 128, jnp.bfloat16, q_buffers=2)
  assert attention_kernel._profiler_params(config, tiles_per_cta=32, smem_free=free)["profile_space"] == 10 * 32 + 16
  params = attention_kernel._profiler_params(config, tiles_per_cta=126, smem_free=free)
  assert 10 * 32 + 16 < params["profile_space"] < 10 * 126 + 16
  spec = profiler.ProfilerSpec(params["profile_space"] * 2 * 2)  # Pallas's entries per trace
  assert spec.smem_bytes(block=(3 * 128,)) <= free


def _equations(jaxpr, loops: int = 0):
  """(equation, how many while loops enclose it) for every equation of the jaxpr, kernel bodies included."""
  from jax.extend import core as jex_core

  for eqn in jaxpr.eqns:
    yield eqn, loops
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
          yield from _equations(getattr(sub, "jaxpr", sub), loops + (eqn.primitive.name == "while"))


def _copy_loop_depths(jaxpr, source_shape) -> list[int]:
  """For each GMEM -> SMEM copy in the jaxpr whose source has `source_shape`: how many while loops enclose it."""
  return sorted(
    loops
    for eqn, loops in _equations(jaxpr.jaxpr)
    if eqn.primitive.name == "copy_gmem_to_smem" and tuple(eqn.invars[0].aval.shape) == source_shape
  )


def _forward_jaxpr(config):
  """The forward kernel's call traced at 1024 tokens, 4 query / 2 kv heads of 128."""
  f, args = _abstract_forward(1024, 4, 2, 128, config)
  return jax.make_jaxpr(f)(*args)


def test_epilogue_divides_once_per_row():
  """Issue #19: the output is normalized by one division per query row and multiplies. Mosaic GPU lowers a float
  division to an IEEE `arith.divf` per element (no fast-math flag), so `acc / l` cost 64 divisions per thread in
  every tile's epilogue."""
  jaxpr = _forward_jaxpr(attention_kernel.ForwardConfig())
  float_divisions = [
    eqn.outvars[0].aval.shape
    for eqn, _ in _equations(jaxpr.jaxpr)
    if eqn.primitive.name == "div" and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)
  ]
  assert float_divisions and all(len(shape) <= 1 for shape in float_divisions), float_divisions


@pytest.mark.parametrize("pv_operand,q_buffers", [("registers", 2), ("smem", 1)])
def test_next_tiles_q_is_requested_before_the_tile_opens(pv_operand, q_buffers):
  """Issue #19 (producer Q): with two Q buffers (the GPU's config at head dim 128) the producer loads both consumers'
  Q rows of a tile as soon as it claims the tile (two copies: the first tile's before its tile loop, depth 0, every
  next one's in that loop, depth 1), a tile or more ahead of its open; with one buffer (P through SMEM) each consumer
  loads its Q as its tile opens (depth 1 only). v4 had each consumer request the next tile's Q in its epilogue (one
  copy at each depth) and fails here; the ordering (the previous output's stores must have read the buffer) is the
  interpreter tests' (their race detector fails a build without the wait)."""
  jaxpr = _forward_jaxpr(attention_kernel.ForwardConfig(pv_operand=pv_operand, num_ctas=4))
  assert _copy_loop_depths(jaxpr, (1, 1024, 4, 128)) == ([0, 0, 1, 1] if q_buffers == 2 else [1])


def _schedule_barrier_ops(jaxpr) -> collections.Counter:
  """(primitive, while-loop depth) counts of the consumers' ping-pong barrier, the kernel's only unindexed one."""
  return collections.Counter(
    (eqn.primitive.name, loops)
    for eqn, loops in _equations(jaxpr.jaxpr)
    if eqn.primitive.name in ("barrier_arrive", "barrier_wait") and str(eqn.invars[0].aval).endswith("barrier[]}")
  )


@pytest.mark.parametrize("pv_operand", ["registers", "smem"])
def test_tile_boundary_turn_is_split_into_arrival_and_wait(pv_operand):
  """Issue #19 (split handoff): inside the steps (depth 2) every turn is an arrival and its wait; at the tile
  boundary (depth 1) each consumer arrives in the epilogue and waits at the next open, so the tile loop holds two
  arrivals (WG0's and WG1's, under pl.when) and one wait. v4 took the whole turn at the boundary (two arrivals, two
  waits: WG0's epilogue waited for WG1's last softmax) and fails here. The protocol's correctness (every phase
  observed before the next arrival) is the interpreter's check in the persistent-grid tests."""
  ops = _schedule_barrier_ops(_forward_jaxpr(attention_kernel.ForwardConfig(pv_operand=pv_operand, num_ctas=4)))
  assert ops[("barrier_arrive", 1)] == 2 and ops[("barrier_wait", 1)] == 1, ops
  assert ops[("barrier_arrive", 2)] == ops[("barrier_wait", 2)] > 0, ops
  assert ops[("barrier_arrive", 0)] == ops[("barrier_wait", 0)] == 1, ops  # WG1 before the first tile, WG0 after


def test_tuning_config_validation():
  with pytest.raises(ValueError, match="tile_order='work'"):
    attention_kernel.ForwardConfig(tile_order="work")


def test_smem_budget():
  """The SMEM arithmetic of the docstring, and the fallback to one Q buffer when P goes through SMEM."""
  fast = attention_kernel.ForwardConfig()
  assert attention_kernel.smem_bytes(fast, 128, jnp.bfloat16, q_buffers=2) <= 227 * 1024
  interp = attention_kernel.ForwardConfig(pv_operand="smem")
  assert attention_kernel.smem_bytes(interp, 128, jnp.bfloat16, q_buffers=2) > 227 * 1024
  assert attention_kernel.smem_bytes(interp, 128, jnp.bfloat16, q_buffers=1) <= 227 * 1024


def test_persistent_grid_has_one_cta_per_multiprocessor(monkeypatch):
  """The backend sizes the persistent grid from the GPU's multiprocessor count (an H100 PCIe has 114, not 132)."""
  from xattn_jax.pallas_kernels import mosaic_gpu

  class FakeGPU:
    platform = "gpu"
    core_count = 114

  monkeypatch.setattr(mosaic_gpu.jax, "devices", lambda *a: [FakeGPU()])
  assert mosaic_gpu._persistent_grid(interpret=False) == {"num_ctas": 114}
  assert mosaic_gpu._persistent_grid(interpret=True) == {}  # the interpreter keeps the config's default
  FakeGPU.core_count = None  # a device that does not say
  assert mosaic_gpu._persistent_grid(interpret=False) == {}


class TestDenseMosaicGpuInterpret(suites.DenseAttentionSuite):
  """The dense block route on this backend's kernel (what dense_attention runs there at long context)."""

  implementation = "pallas_mosaic_gpu"
  interpret = True

  def after_run(self):
    assert not _races_found(), "the Mosaic GPU interpreter recorded a race"

  @pytest.mark.parametrize("case", [(2, 200, 328, 2, 1, 64, jnp.bfloat16, True, True)], ids=["chunk-after-cache"])
  def test_matches_oracle(self, case):
    self.check(case)


_INTERPRET_ALONE = """
import jax, jax.numpy as jnp, xattn_jax as xa
q = jax.random.normal(jax.random.key(0), (1, 256, 2, 64), jnp.bfloat16)
try:
  xa.antidiagonal_scores(q, q, implementation="pallas_mosaic_gpu", interpret=True).block_until_ready()
  print("ran")
except RuntimeError as e:
  print(e)
"""


def test_the_interpreter_refuses_rather_than_hangs_with_too_few_xla_threads():
  """Without tests/conftest.py's XLA_FLAGS, as a user runs it: on a 2-core host the interpreter used to sit at 0% CPU
  forever; now it raises and names the flag (or, with enough cores, just runs)."""
  import os
  import subprocess
  import sys

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", _INTERPRET_ALONE], env=env, capture_output=True, text=True, timeout=300)
  out = done.stdout.strip()
  assert done.returncode == 0 and (out == "ran" or "--xla_force_host_platform_device_count" in out), done.stderr[-2000:]


def test_the_interpreter_thread_check(monkeypatch):
  from xattn_jax.pallas_kernels import mosaic_gpu

  q = jax.random.normal(jax.random.key(0), (1, 128, 2, 64), jnp.bfloat16)
  monkeypatch.setattr(mosaic_gpu, "_xla_cpu_threads", lambda: 2)
  with pytest.raises(RuntimeError, match="runs 2 at a time.*xla_force_host_platform_device_count=8"):
    xa.antidiagonal_scores(q, q, implementation="pallas_mosaic_gpu", interpret=True)


def test_a_configured_backend_carries_its_tuning_to_the_kernels(monkeypatch):
  """implementation=MosaicGpu(...) reaches the kernels through the public op (forward and backward) and computes the
  same as the default configuration."""
  from xattn_jax.pallas_kernels import block_sparse_attention_bwd_mosaic_gpu as bwd_kernel
  from xattn_jax.pallas_kernels.mosaic_gpu import MosaicGpu

  q, k, v = random_qkv(71, B=1, T=256, S=256, N=2, K=1, H=64, dtype=jnp.bfloat16)
  seen = []
  for module, name in ((attention_kernel, "block_sparse_attention"), (bwd_kernel, "block_sparse_attention_bwd")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _f=original, **kw: (seen.append(kw["config"]), _f(*a, **kw))[1])
  tuned = MosaicGpu(
    forward=attention_kernel.ForwardConfig(num_stages=1, tile_order="rows"),
    backward=bwd_kernel.BackwardConfig(num_stages=1),
  )
  run = lambda impl: run_checked(
    jax.value_and_grad(
      lambda q, k, v: jnp.sum(
        xa.xattention(q, k, v, is_causal=True, threshold=0.9, implementation=impl, interpret=True).astype(jnp.float32)
        ** 2
      )
    ),
    q,
    k,
    v,
  )
  (want, want_grad), (got, got_grad) = run("pallas_mosaic_gpu"), run((tuned, "xla"))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32), atol=1e-2)
  stages = [(type(c).__name__, c.num_stages) for c in seen]
  assert ("ForwardConfig", 1) in stages and ("BackwardConfig", 1) in stages, stages
  assert all(getattr(c, "pv_operand", getattr(c, "operand", "smem")) == "smem" for c in seen)  # the interpreter's


def test_xattention_zeroes_only_the_straddling_tokens_with_traced_lengths():
  """With traced lengths (a model's prompts) the scoring launcher's padding zeroing was a conditional over the whole
  q chunk and K per query chunk, whose identity branch XLA copies: a full pass per chunk either way. xattention
  zeroes the at most `stride` tokens per sequence that can mix with real ones and tells the launcher: the cuda
  lowering holds no conditional and no select as large as K (the launcher's own, with lengths it must zero itself,
  does)."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as scores_kernel

  sds = jax.ShapeDtypeStruct
  T, N, K, H = 4096, 8, 2, 128
  lengths = sds((2,), jnp.int32)
  q, kv = sds((2, T, N, H), jnp.bfloat16), sds((2, T, K, H), jnp.bfloat16)
  call = lambda q, k, v, n: xa.xattention(
    q, k, v, is_causal=True, threshold=0.9, query_seq_lengths=n, key_value_seq_lengths=n, query_chunk_size=1024
  )
  text = jax.jit(call).trace(q, kv, kv, lengths).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu_v2") == 2, "the scoring and attention kernels, once each in the loop"
  big = large_ops(text, 2 * T * K * H)
  assert not big["case"] and not big["select"], dict(big)
  # The windows are written into K (and q) only where the Mosaic GPU scorer runs and lengths are given: without
  # lengths every token is real, and the XLA scorer (on the CPU, or chosen on a GPU) zeroes inside its own copies;
  # elsewhere q and K, a program's arguments, would be copied for the write.
  k_writes = lambda text: sum(
    "dynamic_update_slice" in line and line.split("(")[-1].startswith(f"tensor<2x{T}x{K}x{H}xbf16>,")
    for line in text.splitlines()
  )
  assert k_writes(text) == 1
  lowered = lambda fn, platform, *args: jax.jit(fn).trace(q, kv, kv, *args).lower(lowering_platforms=(platform,))
  assert k_writes(lowered(lambda q, k, v: call(q, k, v, None), "cuda").as_text()) == 0
  assert k_writes(lowered(call, "cpu", lengths).as_text()) == 0
  as_xla = lambda q, k, v, n: xa.xattention(
    q, k, v, is_causal=True, threshold=0.9, query_seq_lengths=n, key_value_seq_lengths=n, implementation="xla"
  )
  assert k_writes(lowered(as_xla, "cuda", lengths).as_text()) == 0
  launcher = functools.partial(scores_kernel.antidiagonal_scores, stride=8, block_size=128, causal=True, scale=0.1)
  own = jax.jit(launcher).trace(q, kv, Geometry(lengths, lengths, lengths)).lower(lowering_platforms=("cuda",))
  assert large_ops(own.as_text(), 2 * T * K * H)["select"], "the launcher alone still zeroes what it is given"


@pytest.mark.parametrize("estimator", ["antidiagonal", "alternating"])
def test_xattention_ignores_padding_values_through_the_kernels(estimator):
  """NaN padding with ragged lengths through the kernels' interpreter (fails without xattention's zeroing)."""
  suites.assert_padding_values_do_not_matter(
    seed=73,
    T=768,
    N=2,
    K=1,
    H=64,
    lengths=[701, 517],  # both estimators select differently here without the zeroing
    estimator=estimator,
    min_density=0.2,
    implementation="pallas_mosaic_gpu",
    interpret=True,
  )
