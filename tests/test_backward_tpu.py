"""The pallas_tpu backward (dQ and dK/dV kernels) on a CPU: the strict Pallas TPU interpreter (races detected,
out-of-bounds reads raise, scratch starts as NaN) against the XLA backward and `jax.grad` of dense masked attention,
the backend dispatch of the custom_vjp, and the real Mosaic TPU lowering at production shapes with the budgets."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from xattn_jax.pallas_kernels import block_sparse_attention_bwd_tpu as bwd_kernels
from xattn_jax.pallas_kernels import block_sparse_attention_tpu as attention_kernel
from xattn_jax.pallas_kernels import tpu as tpu_backend
from tests.conftest import assert_max_normalized_close, random_cotangents, random_qkv, run_checked
from tests import suites
from tests.suites import random_layout
from tests.test_backend_tpu import _no_race, tpu_generation  # noqa: F401 (fixture)
from tests.test_gradients import dense_masked, token_mask
from xattn_jax import attention_xla, backends
from xattn_jax.geometry import Geometry
from xattn_jax.layout import BlockLayout, allowed_blocks, transposed_layout

SCALE = 0.125
# Max-normalized error allowed per input dtype: float32 gradients agree to rounding; bf16 kernels round P and dS to
# bf16 before their matmuls while the XLA backward stays in float32.
GRAD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _close(got, want, dtype, what):
  assert_max_normalized_close(got, want, GRAD_TOL[dtype], what)


_cotangents = random_cotangents


# B, T, S, N, K, H, dtype, causal, q_lens, kv_lens, empty rows, config (dq / dkv rows per grid step)
KERNEL_CASES = [
  (2, 300, 420, 4, 2, 64, jnp.bfloat16, True, (300, 190), (420, 250), (), dict(dq_block_rows=2, dkv_block_rows=2)),
  (1, 256, 384, 2, 1, 128, jnp.float32, True, (256,), (384,), ((0, 1, 1),), dict(dq_block_rows=32, dkv_block_rows=32)),
  (2, 200, 330, 2, 2, 64, jnp.float32, False, (200, 77), (330, 140), (), dict(dq_block_rows=1, dkv_block_rows=2)),
  (
    2,
    250,
    250,
    4,
    1,
    128,
    jnp.bfloat16,
    False,
    (250, 130),
    (250, 250),
    (),  # G = 4
    dict(dq_block_rows=2, dkv_block_rows=1),
  ),
]


backward_case = suites.backward_case_fixture(KERNEL_CASES)


class TestBackwardTpu(suites.KernelBackwardSuite):
  grad_tol = GRAD_TOL

  def run_kernels(self, args, *, causal, scale, options):
    return run_checked(
      bwd_kernels.block_sparse_attention_bwd,
      *args,
      causal=causal,
      scale=scale,
      config=bwd_kernels.BackwardConfig(**options),
      interpret=tpu_backend.interpret_params(),
    )

  def after_run(self):
    _no_race()


def _dense_grads(q, k, v, mask, *, causal, lens):
  B, T, N, H = q.shape
  tm = token_mask(mask, T=T, S=k.shape[1], blk=128, causal=causal, q_lens=lens[0], kv_lens=lens[1])
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  return jax.grad(lambda q, k, v: suites.gradient_loss(*dense_masked(q, k, v, tm, scale=SCALE)), argnums=(0, 1, 2))(
    *f32
  )


# B, T, S, N, K, H, dtype, causal, q_lens, kv_lens
OP_CASES = [
  (2, 200, 300, 4, 2, 64, jnp.float32, True, (200, 120), (300, 170)),
  (2, 130, 260, 4, 2, 128, jnp.bfloat16, False, (130, 60), (260, 200)),
]


@pytest.mark.parametrize(
  "case", OP_CASES, ids=[f"H{c[5]}{jnp.dtype(c[6]).name}{'c' if c[7] else 'nc'}" for c in OP_CASES]
)
def test_block_sparse_attention_gradients(case):
  """jax.grad through the public op: pallas_tpu (kernel forward + kernel backward) == xla == dense masked."""
  B, T, S, N, K, H, dtype, causal, q_lens, kv_lens = case
  q, k, v = random_qkv(T * S, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = (jnp.asarray(q_lens, jnp.int32), jnp.asarray(kv_lens, jnp.int32))
  layout, mask = random_layout(S - T, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.6)
  grad = lambda impl: jax.grad(
    functools.partial(suites.sparse_gradient_loss, causal=causal, lens=lens, scale=SCALE, implementation=impl),
    argnums=(0, 1, 2),
  )
  got = run_checked(grad("pallas_tpu"), q, k, v, layout)
  _no_race()
  xla = run_checked(grad("xla"), q, k, v, layout)
  dense = _dense_grads(q, k, v, mask, causal=causal, lens=lens)
  for name, a, b, c in zip("qkv", got, xla, dense):
    _close(a, b, dtype, f"d{name} vs xla")
    _close(a, c, dtype, f"d{name} vs dense")


def test_queries_that_attend_to_nothing_contribute_nothing():
  """Rows whose only selected block lies past some queries' causal positions (lse = -inf), an empty sequence,
  padding rows: finite gradients, zero where nothing was attended, equal to XLA and to dense attention."""
  B, T, S, N, K, H = 3, 256, 300, 2, 1, 64
  q, k, v = random_qkv(31, B=B, T=T, S=S, N=N, K=K, H=H)
  lens = (jnp.array([256, 0, 100], jnp.int32), jnp.array([300, 0, 290], jnp.int32))
  allowed = np.asarray(
    allowed_blocks(
      q_len=T, kv_len=S, block_size=128, causal=True, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1]
    )
  )
  mask = np.zeros((B, N, 2, 3), bool)
  mask[:, :, :, 1] = True  # block 1 only: queries at positions < 128 see nothing (positions start at k_b - q_b)
  mask[:, 1, 1, 0] = True  # head 1, row 1 also keeps the sink
  mask &= allowed
  layout = BlockLayout.from_dense(jnp.asarray(mask), allowed=jnp.asarray(allowed))
  loss = lambda impl: (
    lambda q, k, v: suites.sparse_gradient_loss(
      q, k, v, layout, causal=True, lens=lens, scale=SCALE, implementation=impl
    )
  )
  got = run_checked(jax.grad(loss("pallas_tpu"), argnums=(0, 1, 2)), q, k, v)
  _no_race()
  _, lse = xa.block_sparse_attention(
    q, k, v, layout, scale=SCALE, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1], return_lse=True
  )
  dead = np.isneginf(np.asarray(lse))  # [B, N, T]
  assert dead[0, 0, :84].all() and not dead[0, 0, 84:].any() and dead[1].all() and dead[2, :, 100:].all()
  dq = np.asarray(got[0])
  assert np.isfinite(dq).all() and np.isfinite(np.asarray(got[1])).all() and np.isfinite(np.asarray(got[2])).all()
  assert np.all(dq.transpose(0, 2, 1, 3)[dead] == 0)
  assert np.all(np.asarray(got[1])[1] == 0) and np.all(np.asarray(got[2])[1] == 0)
  xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  dense = _dense_grads(q, k, v, mask, causal=True, lens=lens)
  for name, a, b, c in zip("qkv", got, xla, dense):
    _close(a, b, jnp.float32, f"d{name} vs xla")
    _close(a, c, jnp.float32, f"d{name} vs dense")


def test_xattention_gradients_with_the_kernels_match_xla():
  """The whole pipeline under jax.grad: the kernels' scores select XLA's layout, the kernels' backward matches.
  Two query chunks of 256: the second chunk's geometry starts at query 256 (its q_positions are shifted)."""
  B, T, S, N, K, H = 2, 300, 400, 4, 2, 64
  q, k, v = random_qkv(41, B=B, T=T, S=S, N=N, K=K, H=H)
  lens = (jnp.array([300, 210], jnp.int32), jnp.array([400, 260], jnp.int32))
  kw = dict(
    is_causal=True,
    threshold=0.6,
    stride=8,
    query_seq_lengths=lens[0],
    key_value_seq_lengths=lens[1],
    query_chunk_size=256,
  )
  loss = lambda impl: (
    lambda q, k, v: suites.gradient_loss(
      xa.xattention(q, k, v, implementation=impl, interpret=True, **kw), jnp.zeros(())
    )
  )
  got = run_checked(jax.grad(loss("pallas_tpu"), argnums=(0, 1, 2)), q, k, v)
  _no_race()
  want = run_checked(jax.grad(loss("xla"), argnums=(0, 1, 2)), q, k, v)
  for name, a, b in zip("qkv", got, want):
    _close(a, b, jnp.float32, f"d{name}")
    assert np.abs(np.asarray(a)).sum() > 0


def test_schedule_is_dma_timing_independent():
  """DMAs executed at start ("eager") instead of at wait: a slot overwritten while in use would change bits."""
  B, T, S, N, K, H = 1, 400, 520, 4, 2, 64
  q, k, v = random_qkv(51, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = (jnp.array([400], jnp.int32), jnp.array([520], jnp.int32))
  layout, _ = random_layout(52, B=B, N=N, T=T, S=S, blk=128, causal=True, lens=lens, density=0.5)
  geometry = Geometry.from_lengths(*lens)
  out, lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, causal=True, scale=SCALE)
  d_out, d_lse = _cotangents(53, out, lse)
  kw = dict(causal=True, scale=SCALE, config=bwd_kernels.BackwardConfig(dq_block_rows=2, dkv_block_rows=3))
  args = (q, k, v, out, lse, d_out, d_lse, layout, geometry)
  on_wait = run_checked(bwd_kernels.block_sparse_attention_bwd, *args, interpret=tpu_backend.interpret_params(), **kw)
  eager = run_checked(
    bwd_kernels.block_sparse_attention_bwd,
    *args,
    **kw,
    interpret=dataclasses.replace(tpu_backend.interpret_params(), dma_execution_mode="eager"),
  )
  _no_race()
  for a, b in zip(on_wait, eager):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 9, 16), (1, 1, 3, 1)])
def test_transposed_layout_lists_the_query_blocks_of_each_key_block(shape):
  mask = np.random.default_rng(61).random(shape) < 0.4
  mask[0, 0, 0] = False  # an empty row
  layout = BlockLayout.from_dense(jnp.asarray(mask))
  counts, indices = (np.asarray(x) for x in run_checked(transposed_layout, layout))
  want = BlockLayout.from_dense(jnp.asarray(mask.swapaxes(-1, -2)))
  np.testing.assert_array_equal(counts, np.asarray(want.counts))
  np.testing.assert_array_equal(indices, np.asarray(want.indices))


def test_backward_dispatch(monkeypatch):
  """The custom_vjp takes the first backend with a backward that accepts the call, else the XLA backward."""
  calls = []

  def refusing(*args, **kwargs):
    calls.append("refusing")
    raise NotImplementedError("not this one")

  def accepting(q, k, v, *args, **kwargs):
    calls.append("accepting")
    return jnp.ones_like(q), jnp.ones_like(k), jnp.ones_like(v)

  xla = backends._load("xla")
  monkeypatch.setitem(
    backends._REGISTRY,
    "refusing",
    lambda: dataclasses.replace(xla, name="refusing", block_sparse_attention_bwd=refusing),
  )
  monkeypatch.setitem(
    backends._REGISTRY,
    "accepting",
    lambda: dataclasses.replace(xla, name="accepting", block_sparse_attention_bwd=accepting),
  )
  q, k, v = random_qkv(71, B=1, T=64, S=64, N=2, K=1, H=16)
  layout = BlockLayout.from_dense(jnp.ones((1, 2, 1, 1), bool))
  grad = lambda impl: jax.grad(
    lambda q, k, v: jnp.sum(xa.block_sparse_attention(q, k, v, layout, implementation=impl)), argnums=(0, 1, 2)
  )(q, k, v)
  assert all(np.all(np.asarray(g) == 1) for g in grad(("refusing", "accepting")))
  assert calls == ["refusing", "accepting"]
  for a, b in zip(grad(("refusing",)), grad("xla")):  # nobody accepts: the XLA backward
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The pallas_tpu backward refuses head dim 16 and, without interpret, a CPU: both fall back to XLA.
  for a, b in zip(grad(("pallas_tpu", "xla")), grad("xla")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With a supported call, jax.grad runs the two backward kernels.
  q, k, v = random_qkv(72, B=1, T=128, S=128, N=2, K=1, H=64, dtype=jnp.bfloat16)
  text = str(
    jax.make_jaxpr(
      jax.grad(
        lambda q, k, v: jnp.sum(
          xa.block_sparse_attention(q, k, v, layout, implementation="pallas_tpu", interpret=True).astype(jnp.float32)
        ),
        argnums=(0, 1, 2),
      )
    )(q, k, v)
  )
  assert "xattn_block_sparse_attention_bwd_dq" in text and "xattn_block_sparse_attention_bwd_dkv" in text


def test_config_validates_itself():
  with pytest.raises(ValueError, match="dq_block_rows=0"):
    bwd_kernels.BackwardConfig(dq_block_rows=0)
  with pytest.raises(ValueError, match="dkv_block_rows"):
    bwd_kernels.BackwardConfig(dkv_block_rows=2.0)


def test_backward_lowers_for_tpu_at_production_shapes(tpu_generation):  # noqa: F811
  """Both backward kernels through the real Pallas -> Mosaic TPU lowering at B=1, N=32, K=8, H=128, bf16, 32K."""
  B, N, K, H, length = 1, 32, 8, 128, 32768
  nb, G = length // 128, N // K
  config = bwd_kernels.BackwardConfig()
  smem_dq, smem_dkv = bwd_kernels.smem_bytes(
    batch=B, num_q_blocks=nb, num_kv_blocks=nb, group=G, dq_rows=config.dq_block_rows, dkv_rows=config.dkv_block_rows
  )
  # Rows of the tables, never the tables: a scalar-prefetched int32 [B, N, nKb, nQb] would take 8 MiB at 32K.
  assert smem_dq == 3 * 4 + config.dq_block_rows * 4 + 2 * nb * 4 <= 4 * 1024
  assert smem_dkv == 3 * 4 + config.dkv_block_rows * G * 4 + 2 * G * nb * 4 <= 16 * 1024
  assert max(smem_dq, smem_dkv) <= attention_kernel.SMEM_BUDGET_BYTES
  vmem_dq, vmem_dkv = bwd_kernels.vmem_bytes(head_dim=H, dtype=jnp.bfloat16)
  assert max(vmem_dq, vmem_dkv) <= 2**20 <= attention_kernel.VMEM_BUDGET_BYTES
  sds = jax.ShapeDtypeStruct
  layout = BlockLayout(
    counts=sds((B, N, nb), jnp.int32),
    indices=sds((B, N, nb, nb), jnp.int32),
    num_allowed=sds((B, N, nb), jnp.int32),
    block_size=128,
  )
  f = functools.partial(bwd_kernels.block_sparse_attention_bwd, causal=True, scale=H**-0.5, config=config)
  q_like, kv_like, rows = (
    sds((B, length, N, H), jnp.bfloat16),
    sds((B, length, K, H), jnp.bfloat16),
    sds((B, N, length), jnp.float32),
  )
  with jax.enable_checks(True):  # also runs the MLIR verifier on the Mosaic modules
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(
      q_like, kv_like, kv_like, q_like, rows, q_like, rows, layout, Geometry(*(sds((B,), jnp.int32),) * 3)
    )
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") == 2
  assert "xattn_block_sparse_attention_bwd_dq" in text and "xattn_block_sparse_attention_bwd_dkv" in text
  assert [a.shape for a in exported.out_avals] == [(B, length, N, H), (B, length, K, H), (B, length, K, H)]
  assert all(a.dtype == jnp.bfloat16 for a in exported.out_avals)
  # Layout rows too long for SMEM are refused (NotImplementedError: the XLA backward takes over).
  long = 2**23  # nQb = 64K: two regrouped rows of G * nQb int32 = 2 MiB
  big = BlockLayout(
    counts=sds((B, N, long // 128), jnp.int32),
    indices=sds((B, N, long // 128, 1), jnp.int32),
    num_allowed=sds((B, N, long // 128), jnp.int32),
    block_size=128,
  )
  with pytest.raises(NotImplementedError, match="SMEM"):
    q_long, kv_short = sds((B, long, N, H), jnp.bfloat16), sds((B, 128, K, H), jnp.bfloat16)
    rows_long = sds((B, N, long), jnp.float32)
    jax.eval_shape(
      f, q_long, kv_short, kv_short, q_long, rows_long, q_long, rows_long, big, Geometry(*(sds((B,), jnp.int32),) * 3)
    )
