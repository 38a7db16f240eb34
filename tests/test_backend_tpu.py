"""The pallas_tpu backend on a CPU: both kernels in the strict Pallas TPU interpreter (races detected, out-of-bounds
reads raise, scratch starts as NaN) against the oracle and the XLA reference, and the real Mosaic TPU lowering
(`jax.export(..., platforms=["tpu"])`) at production shapes with the kernels' SMEM/VMEM budgets."""

from __future__ import annotations

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import xattn_jax as xa
from xattn_jax.pallas_kernels import antidiagonal_tpu as scoring_kernel
from xattn_jax.pallas_kernels import block_sparse_attention_tpu as attention_kernel
from xattn_jax.pallas_kernels import tpu as tpu_backend
from tests import oracle, suites
from tests.conftest import OUT_TOL, lengths_pair, random_qkv, run_checked
from xattn_jax import attention_xla, scoring_xla
from xattn_jax.geometry import Geometry
from xattn_jax.layout import BlockLayout


def _races_found() -> bool:
  """Whether the last kernel run by the TPU interpreter recorded a race (same module path in jax 0.11 and 0.12)."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call

  races = interpret_pallas_call.races
  return bool(races is not None and races.races_found)


def _no_race():
  assert not _races_found(), "the Pallas TPU interpreter recorded a race"


@pytest.fixture
def tpu_generation(monkeypatch):
  """Lets the Mosaic TPU lowering run on a CPU host: it asks for the chip's parameters (here a v5e)."""
  from jax._src import tpu_info

  monkeypatch.setitem(tpu_info.registry, "cpu", lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))


class TestScoresTpu(suites.KernelScoresSuite):
  implementation = "pallas_tpu"
  interpret = True

  def after_run(self):
    _no_race()


# KERNEL_CASES of the shared suite, with the float16 case (no TPU kernel: it falls through) replaced by float32.
TPU_ATTENTION_CASES = [  # B, T, S, N, K, H, dtype, causal, with_lengths
  (2, 200, 300, 4, 2, 64, jnp.bfloat16, True, True),
  (1, 256, 384, 2, 1, 128, jnp.float32, True, False),
  (2, 130, 260, 2, 2, 64, jnp.float32, False, True),
]


class TestAttentionTpu(suites.KernelAttentionSuite):
  implementation = "pallas_tpu"
  interpret = True

  def after_run(self):
    _no_race()

  @pytest.mark.parametrize(
    "case",
    TPU_ATTENTION_CASES,
    ids=[
      f"B{c[0]}T{c[1]}S{c[2]}N{c[3]}K{c[4]}H{c[5]}{jnp.dtype(c[6]).name}{'c' if c[7] else 'nc'}"
      for c in TPU_ATTENTION_CASES
    ],
  )
  def test_matches_oracle(self, case):
    super().test_matches_oracle(case)


def _geometry(B, T, S, seed):
  return Geometry.from_lengths(*lengths_pair(seed, B=B, T=T, S=S))


@pytest.mark.parametrize("stride,causal,heads_per_step", [(8, True, 2), (4, False, 1)])
def test_scores_small_tiles_and_skipping_do_not_change_the_answer(stride, causal, heads_per_step):
  """Several query and key tiles per head: matches the reference, and skipping tiles changes no bit."""
  B, T, S, N, K, H = 2, 600, 700, 4, 2, 64
  q, k, _ = random_qkv(81, B=B, T=T, S=S, N=N, K=K, H=H)
  geometry = _geometry(B, T, S, 82)
  kw = dict(stride=stride, block_size=128, causal=causal, scale=0.125)
  rows = 256 // stride  # 256-token tiles: 3 query tiles, 3 key tiles
  tiles = dict(q_rows=rows, kv_rows=rows, max_lanes=heads_per_step * rows)
  assert (
    scoring_kernel.tiles_for(
      scoring_kernel.ScoresConfig(**tiles), stride=stride, group=N // K, q_len=T, kv_len=S
    ).heads_per_step
    == heads_per_step
  )
  skipped = run_checked(
    scoring_kernel.antidiagonal_scores,
    q,
    k,
    geometry,
    config=scoring_kernel.ScoresConfig(**tiles),
    interpret=tpu_backend.interpret_params(),
    **kw,
  )
  _no_race()
  full = run_checked(
    scoring_kernel.antidiagonal_scores,
    q,
    k,
    geometry,
    config=scoring_kernel.ScoresConfig(**tiles, skip_masked_tiles=False),
    interpret=tpu_backend.interpret_params(),
    **kw,
  )
  np.testing.assert_array_equal(np.asarray(skipped), np.asarray(full))
  want = run_checked(scoring_xla.antidiagonal_scores, q, k, geometry, **kw)
  np.testing.assert_allclose(np.asarray(skipped), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_attention_skipping_does_not_change_the_answer():
  """The selected blocks alone, and a sweep over every allowed block with the others masked: the same bits."""
  B, T, S, N, K, H = 2, 1100, 1300, 2, 1, 64  # 9 query blocks: two grid steps of 8 rows, the second ragged
  q, k, v = random_qkv(83, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = lengths_pair(84, B=B, T=T, S=S)
  layout, _ = suites.random_layout(85, B=B, N=N, T=T, S=S, blk=128, causal=True, lens=lens, density=0.3)
  geometry = Geometry.from_lengths(*lens)
  kw = dict(causal=True, scale=0.125, interpret=tpu_backend.interpret_params())
  skipped = run_checked(
    attention_kernel.block_sparse_attention,
    q,
    k,
    v,
    layout,
    geometry,
    config=attention_kernel.ForwardConfig(block_rows=8),
    **kw,
  )
  _no_race()
  swept = run_checked(
    attention_kernel.block_sparse_attention,
    q,
    k,
    v,
    layout,
    geometry,
    config=attention_kernel.ForwardConfig(block_rows=8, skip_unselected=False),
    **kw,
  )
  _no_race()
  for a, b in zip(skipped, swept):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want, want_lse = run_checked(
    attention_xla.block_sparse_attention, q, k, v, layout, geometry, causal=True, scale=0.125
  )
  np.testing.assert_allclose(
    np.asarray(skipped[0], np.float32),
    np.asarray(want, np.float32),
    atol=3 * OUT_TOL[jnp.bfloat16],
    rtol=3 * OUT_TOL[jnp.bfloat16],
  )
  np.testing.assert_array_equal(np.isneginf(np.asarray(skipped[1])), np.isneginf(np.asarray(want_lse)))


def test_attention_schedule_is_dma_timing_independent():
  """DMAs executed at start ("eager") instead of at wait: a slot overwritten while still in use would show here."""
  B, T, S, N, K, H = 1, 700, 900, 2, 1, 128
  q, k, v = random_qkv(91, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = lengths_pair(92, B=B, T=T, S=S)
  layout, _ = suites.random_layout(93, B=B, N=N, T=T, S=S, blk=128, causal=True, lens=lens, density=0.4)
  geometry = Geometry.from_lengths(*lens)
  kw = dict(causal=True, scale=0.125, config=attention_kernel.ForwardConfig(block_rows=8))
  on_wait = run_checked(
    attention_kernel.block_sparse_attention, q, k, v, layout, geometry, interpret=tpu_backend.interpret_params(), **kw
  )
  eager = run_checked(
    attention_kernel.block_sparse_attention,
    q,
    k,
    v,
    layout,
    geometry,
    interpret=dataclasses.replace(tpu_backend.interpret_params(), dma_execution_mode="eager"),
    **kw,
  )
  _no_race()
  for a, b in zip(on_wait, eager):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_attention_padding_and_empty_sequences():
  B, T, S, N, H = 3, 256, 384, 2, 64
  q, k, v = random_qkv(94, B=B, T=T, S=S, N=N, K=1, H=H, dtype=jnp.bfloat16)
  lens = (jnp.array([0, 150, 256], jnp.int32), jnp.array([0, 200, 384], jnp.int32))
  layout, mask = suites.random_layout(95, B=B, N=N, T=T, S=S, blk=128, causal=True, lens=lens)
  out, lse = run_checked(
    xa.block_sparse_attention,
    q,
    k,
    v,
    layout,
    query_seq_lengths=lens[0],
    key_value_seq_lengths=lens[1],
    return_lse=True,
    implementation="pallas_tpu",
    interpret=True,
  )
  _no_race()
  out, lse = np.asarray(out, np.float32), np.asarray(lse)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
  assert np.all(out[1, 150:] == 0) and np.all(np.isneginf(lse[1, :, 150:]))
  assert np.all(np.isfinite(lse[1, :, :150])) and np.all(np.isfinite(lse[2]))
  want, want_lse = oracle.attention(q, k, v, mask, block_size=128, causal=True, q_lens=lens[0], kv_lens=lens[1])
  np.testing.assert_allclose(out, want, atol=3 * OUT_TOL[jnp.bfloat16], rtol=3 * OUT_TOL[jnp.bfloat16])
  np.testing.assert_allclose(lse[np.isfinite(want_lse)], want_lse[np.isfinite(want_lse)], atol=1e-3, rtol=1e-4)


@hypothesis.settings(max_examples=max(1, hypothesis.settings().max_examples // 2))  # the interpreter is slow
@hypothesis.given(
  B=st.integers(1, 2),
  T=st.integers(1, 300),
  extra=st.integers(0, 200),
  K=st.integers(1, 2),
  G=st.integers(1, 2),
  stride=st.sampled_from([4, 8, 16]),
  causal=st.booleans(),
  density=st.floats(0.0, 1.0),
  seed=st.integers(0, 2**16),
)
def test_property_both_kernels_match_the_reference(B, T, extra, K, G, stride, causal, density, seed):
  S, N, H = T + extra, K * G, 64
  q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=H)
  lens = lengths_pair(seed, B=B, T=T, S=S)
  geometry = Geometry.from_lengths(*lens)
  scores = run_checked(
    scoring_kernel.antidiagonal_scores,
    q,
    k,
    geometry,
    stride=stride,
    block_size=128,
    causal=causal,
    scale=0.125,
    interpret=tpu_backend.interpret_params(),
  )
  _no_race()
  want = oracle.scores(q, k, stride=stride, block_size=128, causal=causal, scale=0.125, q_lens=lens[0], kv_lens=lens[1])
  np.testing.assert_allclose(np.asarray(scores), want, atol=2e-5, rtol=1e-5)
  layout, mask = suites.random_layout(seed, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=density)
  out, lse = run_checked(
    attention_kernel.block_sparse_attention,
    q,
    k,
    v,
    layout,
    geometry,
    causal=causal,
    scale=0.125,
    interpret=tpu_backend.interpret_params(),
  )
  _no_race()
  want, want_lse = oracle.attention(
    q, k, v, mask, block_size=128, causal=causal, scale=0.125, q_lens=lens[0], kv_lens=lens[1]
  )
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.6, 1.0])
def test_xattention_with_the_kernels_matches_xla(threshold):
  """The whole pipeline: the kernels' scores select the reference's layout; tau = 1 is dense attention."""
  B, T, S, N, K, H = 2, 300, 400, 4, 2, 64
  q, k, v = random_qkv(86, B=B, T=T, S=S, N=N, K=K, H=H)
  lens = lengths_pair(87, B=B, T=T, S=S)
  kw = dict(
    is_causal=True,
    threshold=threshold,
    stride=8,
    return_block_layout=True,
    query_seq_lengths=lens[0],
    key_value_seq_lengths=lens[1],
  )
  got, layout = run_checked(xa.xattention, q, k, v, implementation="pallas_tpu", interpret=True, **kw)
  _no_race()
  want, want_layout = run_checked(xa.xattention, q, k, v, implementation="xla", **kw)
  np.testing.assert_array_equal(np.asarray(layout.counts), np.asarray(want_layout.counts))
  np.testing.assert_array_equal(np.asarray(layout.indices), np.asarray(want_layout.indices))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  if threshold >= 1:
    assert float(layout.density()) == 1.0
    q_lens, kv_lens = (np.asarray(x)[:, None, None] for x in lens)
    t, j = np.arange(T)[None, :, None], np.arange(S)[None, None, :]
    visible = (j < kv_lens) & (j <= kv_lens - q_lens + t) & (t < q_lens)  # bottom-right causal, per sequence
    dense = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(visible[:, None]))
    real = (np.arange(T)[None, :] < np.asarray(lens[0])[:, None])[..., None, None]
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(dense) * real, atol=2e-5, rtol=1e-5)


def test_unsupported_inputs_fall_through_to_xla():
  q, k, v = random_qkv(88, B=1, T=64, S=64, N=2, K=2, H=16)  # head dim 16: not for these kernels
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  with pytest.raises(NotImplementedError, match="pallas_tpu"):
    xa.block_sparse_attention(q, k, v, layout, implementation="pallas_tpu", interpret=True)
  with pytest.raises(NotImplementedError, match="pallas_tpu"):
    xa.antidiagonal_scores(q, k, implementation="pallas_tpu", interpret=True)
  out = run_checked(xa.block_sparse_attention, q, k, v, layout, implementation=("pallas_tpu", "xla"), interpret=True)
  np.testing.assert_allclose(
    np.asarray(out), np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True)), atol=2e-5
  )
  q16, k16, v16 = (x.astype(jnp.float16) for x in random_qkv(89, B=1, T=128, S=128, N=2, K=2, H=64))
  with pytest.raises(NotImplementedError, match="float16"):
    xa.block_sparse_attention(q16, k16, v16, layout, implementation="pallas_tpu", interpret=True)
  with pytest.raises(NotImplementedError, match="stride=2"):
    xa.antidiagonal_scores(
      q16.astype(jnp.bfloat16), k16.astype(jnp.bfloat16), stride=2, implementation="pallas_tpu", interpret=True
    )


def test_needs_a_tpu_unless_interpreted():
  if jax.default_backend() == "tpu":
    pytest.skip("has a TPU")
  q, k, v = random_qkv(90, B=1, T=128, S=128, N=2, K=2, H=64, dtype=jnp.bfloat16)
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  with pytest.raises(NotImplementedError, match="needs a TPU"):
    xa.block_sparse_attention(q, k, v, layout, implementation="pallas_tpu")
  with pytest.raises(NotImplementedError, match="needs a TPU"):
    xa.antidiagonal_scores(q, k, implementation="pallas_tpu")


def test_configs_validate_themselves():
  with pytest.raises(ValueError, match="block_rows=12"):
    attention_kernel.ForwardConfig(block_rows=12)
  with pytest.raises(ValueError, match="q_rows=0"):
    scoring_kernel.ScoresConfig(q_rows=0)
  with pytest.raises(ValueError, match="kv_rows=260"):
    scoring_kernel.ScoresConfig(kv_rows=260)
  with pytest.raises(ValueError, match="multiples of 128/stride=4"):  # tiles hold whole blocks: 32 rows at s = 4
    scoring_kernel.tiles_for(scoring_kernel.ScoresConfig(q_rows=16, kv_rows=32), stride=4, group=1, q_len=1, kv_len=1)


def test_scores_refuse_keys_beyond_the_vmem_budget():
  sds = jax.ShapeDtypeStruct
  length = 2**21  # 2M keys: the [nKb, 1024] f32 accumulator alone would take 64 MiB of VMEM
  f = functools.partial(scoring_kernel.antidiagonal_scores, stride=8, block_size=128, causal=True, scale=0.1)
  with pytest.raises(NotImplementedError, match="VMEM"):
    jax.eval_shape(
      f,
      sds((1, 8192, 32, 128), jnp.bfloat16),
      sds((1, length, 8, 128), jnp.bfloat16),
      Geometry(*(sds((1,), jnp.int32),) * 3),
    )


def test_race_detector_is_live():
  """A kernel that reads a DMA's destination before waiting is reported (raised in jax >= 0.12, flagged in 0.11)."""

  def racy(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem.at[0])
    copy.start()
    o_ref[...] = buf[...]
    copy.wait()

  x = jnp.ones((8, 128), jnp.float32)
  call = pl.pallas_call(
    racy,
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
    scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA((1,))],
    interpret=tpu_backend.interpret_params(),
  )
  try:
    jax.block_until_ready(call(x))
  except jax.errors.JaxRuntimeError:  # jax >= 0.12 raises on the first race (on_race="raise")
    pltpu.reset_tpu_interpret_mode_state()
    return
  assert _races_found()


# Production shapes of the issue: B = 1, 32 query heads, 8 kv heads, head dim 128, bf16.
_PRODUCTION = dict(B=1, N=32, K=8, H=128)


@pytest.mark.parametrize("length", [32768, 131072])
def test_scores_lower_for_tpu_at_production_shapes(length, tpu_generation):
  """The real Pallas -> Mosaic TPU lowering (block-shape rules, supported ops, scalar prefetch), no TPU needed."""
  B, N, K, H = (_PRODUCTION[x] for x in "BNKH")
  sds = jax.ShapeDtypeStruct
  vmem = {}
  for stride in (8, 16):
    tiles = scoring_kernel.tiles_for(
      scoring_kernel.ScoresConfig(), stride=stride, group=N // K, q_len=length, kv_len=length
    )
    assert tiles.heads_per_step == 4 and tiles.lanes == 1024 and tiles.kv_rows == 256  # MXU-sized GEMM per step
    vmem[stride] = scoring_kernel.vmem_bytes(tiles, head_dim=H, dtype=jnp.bfloat16)
    assert vmem[stride] <= scoring_kernel.VMEM_BUDGET_BYTES, vmem
    assert scoring_kernel.smem_bytes(batch=B) <= 16  # the geometry only: nothing per block
    f = functools.partial(scoring_kernel.antidiagonal_scores, stride=stride, block_size=128, causal=True, scale=H**-0.5)
    with jax.enable_checks(True):  # also runs the MLIR verifier on the Mosaic module
      exported = jax.export.export(jax.jit(f), platforms=["tpu"])(
        sds((B, length, N, H), jnp.bfloat16),
        sds((B, length, K, H), jnp.bfloat16),
        Geometry(*(sds((B,), jnp.int32),) * 3),
      )
    text = exported.mlir_module()
    assert "tpu_custom_call" in text and "xattn_antidiagonal_scores" in text
    assert exported.out_avals[0].shape == (B, N, length // 128, length // 128)
  if length == 131072:  # ~12 MiB at s = 8, a third of it the [nKb, 1024] f32 accumulator
    assert vmem[8] <= 16 * 2**20


@pytest.mark.parametrize("length", [32768, 131072])
def test_attention_lowers_for_tpu_at_production_shapes(length, tpu_generation):
  B, N, K, H = (_PRODUCTION[x] for x in "BNKH")
  nb = length // 128
  sds = jax.ShapeDtypeStruct
  config = attention_kernel.ForwardConfig()
  # SMEM holds two index rows and one chunk of counts: it grows with nKb, never with B * N * nQb * nKb.
  smem = attention_kernel.smem_bytes(batch=B, num_kv_blocks=nb, block_rows=config.block_rows)
  assert smem == 3 * 4 + config.block_rows * 4 + 2 * nb * 4 <= attention_kernel.SMEM_BUDGET_BYTES
  assert smem <= 16 * 1024  # a scalar-prefetched int32 indices table would take B * N * nb * nb * 4 = 128 MiB at 128K
  vmem = attention_kernel.vmem_bytes(head_dim=H, dtype=jnp.bfloat16, block_rows=config.block_rows)
  assert vmem <= 2**20 <= attention_kernel.VMEM_BUDGET_BYTES
  layout = BlockLayout(
    counts=sds((B, N, nb), jnp.int32),
    indices=sds((B, N, nb, nb), jnp.int32),
    num_allowed=sds((B, N, nb), jnp.int32),
    block_size=128,
  )
  f = functools.partial(attention_kernel.block_sparse_attention, causal=True, scale=H**-0.5, config=config)
  qkv = [sds((B, length, n, H), jnp.bfloat16) for n in (N, K, K)]
  with jax.enable_checks(True):
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*qkv, layout, Geometry(*(sds((B,), jnp.int32),) * 3))
  text = exported.mlir_module()
  assert "tpu_custom_call" in text and "xattn_block_sparse_attention" in text
  assert [a.shape for a in exported.out_avals] == [(B, length, N, H), (B, N, length)]


class TestDenseTpu(suites.DenseAttentionSuite):
  """The dense block route on this backend's kernel (what dense_attention runs there at long context)."""

  implementation = "pallas_tpu"
  interpret = True

  def after_run(self):
    _no_race()

  @pytest.mark.parametrize("case", [(2, 200, 328, 2, 1, 64, jnp.bfloat16, True, True)], ids=["chunk-after-cache"])
  def test_matches_oracle(self, case):
    self.check(case)


def test_a_configured_backend_carries_its_tuning_to_the_kernels(monkeypatch):
  seen = []
  for module, name in ((scoring_kernel, "antidiagonal_scores"), (attention_kernel, "block_sparse_attention")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _f=original, **kw: (seen.append(kw.get("config")), _f(*a, **kw))[1])
  q, k, v = random_qkv(72, B=1, T=256, S=256, N=2, K=1, H=128, dtype=jnp.float32)
  attention = attention_kernel.ForwardConfig(block_rows=8, skip_unselected=False)
  tuned = tpu_backend.Tpu(forward=attention)
  want = xa.xattention(q, k, v, is_causal=True, threshold=0.9, implementation="xla")
  got = run_checked(xa.xattention, q, k, v, is_causal=True, threshold=0.9, implementation=tuned, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=OUT_TOL[jnp.float32], rtol=1e-4)
  assert seen[0] is None and seen[1] == attention  # default scoring config, the given attention config
