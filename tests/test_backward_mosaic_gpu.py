"""The pallas_mosaic_gpu backward (dQ and dK/dV kernels) on a CPU: the Mosaic GPU interpreter (race detection,
out-of-bounds reads raise) against the XLA backward and dense masked gradients, the backend dispatch of the
custom_vjp, and the real Mosaic GPU lowering ("cuda") at production shapes. The GPU itself:
tests/test_mosaic_gpu_device.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from xattn_jax.pallas_kernels import block_sparse_attention_bwd_mosaic_gpu as bwd_kernels
from tests.conftest import assert_max_normalized_close, random_cotangents, random_qkv, run_checked
from tests import suites
from tests.suites import random_layout
from tests.test_backend_mosaic_gpu import _races_found
from tests.test_gradients import dense_masked, token_mask
from xattn_jax import attention_xla, attention_xla_bwd
from xattn_jax.geometry import Geometry
from xattn_jax.layout import BlockLayout, transposed_layout

SCALE = 0.125
# Max-normalized error per input dtype: the kernels round P and dS to the input dtype before their matmuls, the XLA
# backward stays in float32.
GRAD_TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
INTERPRET = bwd_kernels.BackwardConfig(operand="smem")


def _close(got, want, dtype, what):
  assert_max_normalized_close(got, want, GRAD_TOL[dtype], what)


_cotangents = random_cotangents


# B, T, S, N, K, H, dtype, causal, q_lens, kv_lens, empty rows (b, n, r) forced to select nothing, config
KERNEL_CASES = [
  (2, 300, 384, 4, 2, 64, jnp.bfloat16, True, (300, 190), (384, 250), (), {}),  # ragged, GQA 2, T < S, lengths
  (1, 256, 256, 4, 1, 128, jnp.float16, False, (256,), (256,), ((0, 1, 1),), {}),  # GQA 4, H 128 (1-stage ring)
  (1, 384, 384, 2, 2, 64, jnp.float16, True, (384,), (384,), ((0, 0, 2), (0, 1, 0)), {}),  # 3 blocks, empty rows
  (2, 256, 300, 2, 1, 64, jnp.bfloat16, False, (200, 130), (300, 140), (), {}),  # non-causal, padded keys
]


backward_case = suites.backward_case_fixture(KERNEL_CASES)


class TestBackwardMosaicGpuInterpret(suites.KernelBackwardSuite):
  grad_tol = GRAD_TOL

  def run_kernels(self, args, *, causal, scale, options):
    config = bwd_kernels.BackwardConfig(**{**dict(operand="smem"), **options})
    return run_checked(
      bwd_kernels.block_sparse_attention_bwd, *args, causal=causal, scale=scale, config=config, interpret=True
    )

  def after_run(self):
    assert not _races_found(), "the Mosaic GPU interpreter recorded a race"


@pytest.mark.slow  # ~12 s in the interpreter: run with -m slow
def test_ring_depth_and_query_tile():
  """The TMA ring depth does not change a bit (same arithmetic, other timing); 128-query dK/dV steps match XLA."""
  case = (1, 384, 384, 2, 1, 64, jnp.float16, True, (384,), (384,), (), {})
  q, k, v, lens, layout, _ = suites.backward_case_inputs(case, seed=101)
  geometry = Geometry.from_lengths(*lens)
  kw = dict(causal=True, scale=SCALE)
  out, lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, **kw)
  d_out, d_lse = _cotangents(102, out, lse)
  args = (q, k, v, out, lse, d_out, d_lse, layout, geometry)
  run = lambda **c: run_checked(
    bwd_kernels.block_sparse_attention_bwd,
    *args,
    **kw,
    interpret=True,
    config=bwd_kernels.BackwardConfig(operand="smem", dkv_block_q=128, **c),
  )
  one, three = run(num_stages=1), run(num_stages=3)
  assert not _races_found()
  for a, b in zip(one, three):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want = attention_xla_bwd.block_sparse_attention_bwd(*args, **kw)
  for name, a, b in zip(("dq", "dk", "dv"), three, want):
    _close(a, b, jnp.float16, name)


def test_block_sparse_attention_gradients():
  """jax.grad through the public op: pallas_mosaic_gpu (kernel forward + kernel backward) == xla == dense masked."""
  B, T, S, N, K, H, dtype, causal = 2, 200, 300, 2, 1, 64, jnp.float16, True
  q, k, v = random_qkv(81, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = (jnp.array([200, 120], jnp.int32), jnp.array([300, 170], jnp.int32))
  layout, mask = random_layout(82, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.6)

  loss = functools.partial(suites.sparse_gradient_loss, layout=layout, causal=causal, lens=lens, scale=SCALE)
  grad = lambda impl: jax.grad(functools.partial(loss, implementation=impl), argnums=(0, 1, 2))
  calls = []
  original = bwd_kernels.block_sparse_attention_bwd

  def counting(*args, **kwargs):
    calls.append(kwargs["config"])
    return original(*args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(bwd_kernels, "block_sparse_attention_bwd", counting)
    got = run_checked(grad("pallas_mosaic_gpu"), q, k, v)
  assert calls == [INTERPRET], "jax.grad did not reach the Mosaic GPU backward"
  assert not _races_found()
  xla = run_checked(grad("xla"), q, k, v)
  tm = token_mask(mask, T=T, S=S, blk=128, causal=causal, q_lens=lens[0], kv_lens=lens[1])
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  dense = jax.grad(lambda q, k, v: suites.gradient_loss(*dense_masked(q, k, v, tm, scale=SCALE)), argnums=(0, 1, 2))(
    *f32
  )
  for name, a, b, c in zip("qkv", got, xla, dense):
    assert a.dtype == dtype
    _close(a, b, dtype, f"d{name} vs xla")
    _close(a, c, dtype, f"d{name} vs dense")


def test_unsupported_calls_fall_back_to_the_xla_backward():
  q, k, v = random_qkv(91, B=1, T=64, S=64, N=2, K=1, H=16)  # float32, head dim 16: not for these kernels
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  out, lse = attention_xla.block_sparse_attention(
    q,
    k,
    v,
    layout,
    Geometry.from_lengths(jnp.array([64], jnp.int32), jnp.array([64], jnp.int32)),
    causal=True,
    scale=SCALE,
  )
  geometry = Geometry.from_lengths(jnp.array([64], jnp.int32), jnp.array([64], jnp.int32))
  with pytest.raises(NotImplementedError, match="pallas_mosaic_gpu"):
    bwd_kernels.block_sparse_attention_bwd(
      q, k, v, out, lse, out, lse, layout, geometry, causal=True, scale=SCALE, interpret=True
    )
  grad = lambda impl: jax.grad(
    lambda q, k, v: jnp.sum(xa.block_sparse_attention(q, k, v, layout, implementation=impl, interpret=True)),
    argnums=(0, 1, 2),
  )(q, k, v)
  for a, b in zip(grad(("pallas_mosaic_gpu", "xla")), grad("xla")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_needs_a_gpu_unless_interpreted():
  if jax.default_backend() == "gpu":
    pytest.skip("has a GPU")
  from xattn_jax.pallas_kernels import mosaic_gpu

  q, k, v = random_qkv(92, B=1, T=128, S=128, N=2, K=2, H=64, dtype=jnp.bfloat16)
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  geometry = Geometry.from_lengths(jnp.array([128], jnp.int32), jnp.array([128], jnp.int32))
  lse = jnp.zeros((1, 2, 128), jnp.float32)
  with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
    mosaic_gpu.backend().block_sparse_attention_bwd(
      q, k, v, q, lse, q, lse, layout, geometry, causal=True, scale=SCALE, interpret=False
    )


@pytest.mark.parametrize("causal", [True, False])
def test_masked_visits_are_the_pairs_that_need_the_token_mask(causal):
  """masked_visits == a brute-force count over the transposed rows, and those visits form a prefix of each row."""
  B, T, S, N = 2, 700, 900, 3
  lens = (jnp.array([700, 333], jnp.int32), jnp.array([900, 500], jnp.int32))
  layout, _ = random_layout(93, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.5)
  geometry = Geometry.from_lengths(*lens)
  t_counts, t_indices = transposed_layout(layout)
  got = np.asarray(bwd_kernels.masked_visits(t_counts, t_indices, geometry, causal=causal))
  t_counts, t_indices = np.asarray(t_counts), np.asarray(t_indices)
  kv, qp = np.asarray(geometry.kv_lengths), np.asarray(geometry.q_positions)
  for b in range(B):
    for n in range(N):
      for c in range(t_counts.shape[2]):
        needs = []
        for r in t_indices[b, n, c, : t_counts[b, n, c]]:
          keys = c * 128 + np.arange(128)
          first_query = qp[b] + r * 128
          needs.append(bool((keys >= kv[b]).any() or (causal and (keys > first_query).any())))
        assert needs == sorted(needs, reverse=True)  # a prefix
        assert got[b, n, c] == sum(needs), (b, n, c)


def test_config_validates_itself():
  with pytest.raises(ValueError, match="operand='tmem'"):
    bwd_kernels.BackwardConfig(operand="tmem")
  with pytest.raises(ValueError, match="num_stages=0"):
    bwd_kernels.BackwardConfig(num_stages=0)
  with pytest.raises(ValueError, match="dkv_block_q=32"):
    bwd_kernels.BackwardConfig(dkv_block_q=32)


def test_smem_budget():
  """The docstring's arithmetic: both kernels fit 227 KiB with a 2-stage ring at head dim 128, bf16, P/dS in
  registers; the SMEM-staged variant keeps 2 stages in the dK/dV kernel and drops to 1 in the dQ kernel."""
  budget = 227 * 1024
  fast = bwd_kernels.BackwardConfig()
  dq, dkv = bwd_kernels.smem_bytes(fast, 128, jnp.bfloat16)
  assert dq == dkv == 196 * 1024 and max(dq, dkv) <= budget
  staged = bwd_kernels.BackwardConfig(operand="smem")
  assert bwd_kernels._stages(staged, 128, jnp.bfloat16, 0) == 1
  assert bwd_kernels._stages(staged, 128, jnp.bfloat16, 1) == 2
  assert bwd_kernels._stages(staged, 64, jnp.float16, 0) == 2


@pytest.mark.parametrize("head_dim,operand", [(128, "registers"), (128, "smem"), (64, "registers")])
def test_lowers_for_cuda_at_production_shapes(head_dim, operand):
  """Both kernels through the real Mosaic GPU lowering (layouts, wgmma shapes, TMA boxes) at B=1, N=32, K=8,
  32K tokens, bf16, causal: no GPU needed."""
  B, N, K, length = 1, 32, 8, 32768
  nb = length // 128
  sds = jax.ShapeDtypeStruct
  layout = BlockLayout(
    counts=sds((B, N, nb), jnp.int32),
    indices=sds((B, N, nb, nb), jnp.int32),
    num_allowed=sds((B, N, nb), jnp.int32),
    block_size=128,
  )
  geometry = Geometry(*(sds((B,), jnp.int32),) * 3)
  f = functools.partial(
    bwd_kernels.block_sparse_attention_bwd,
    causal=True,
    scale=head_dim**-0.5,
    config=bwd_kernels.BackwardConfig(operand=operand),
  )
  q_like, kv_like = sds((B, length, N, head_dim), jnp.bfloat16), sds((B, length, K, head_dim), jnp.bfloat16)
  rows = sds((B, N, length), jnp.float32)
  lowered = (
    jax.jit(f)
    .trace(q_like, kv_like, kv_like, q_like, rows, q_like, rows, layout, geometry)
    .lower(lowering_platforms=("cuda",))
  )
  text = lowered.as_text()
  assert text.count("mosaic_gpu") >= 2 and "wgmma" in text
  assert [a.shape for a in lowered.out_info] == [
    (B, length, N, head_dim),
    (B, length, K, head_dim),
    (B, length, K, head_dim),
  ]


def test_benchmark_script_runs_on_cpu(tmp_path):
  """benchmarks/attention_bwd_speed.py end to end at a toy shape with XLA on both sides (the GPU run uses cuDNN)."""
  import json

  from benchmarks import attention_bwd_speed as script

  assert (
    script.main(
      [
        "--lengths",
        "256",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "64",
        "--densities",
        "50,100",
        "--repeats",
        "1",
        "--implementation",
        "xla",
        "--dense-implementation",
        "xla",
        "--out-dir",
        str(tmp_path),
      ]
    )
    == 0
  )
  (result_file,) = tmp_path.glob("attention_bwd_speed/*/*-run.json")
  rows = json.loads(result_file.read_text())["rows"]
  assert [r["what"] for r in rows] == ["dense xla fwd+bwd", "dense xla bwd"] + ["sparse fwd+bwd", "sparse bwd"] * 2
  assert rows[-2]["density"] == 1.0 and max(rows[-2]["rel_err_vs_dense"]) < 2e-2  # all blocks == dense
  assert result_file.with_suffix(".md").exists()
