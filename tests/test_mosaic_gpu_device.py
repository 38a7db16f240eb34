"""Hopper-only checks of the pallas_mosaic_gpu kernels against the XLA reference, on fresh random inputs.

Skipped without a CUDA GPU (CI has none); run on the device machine with
    python -m pytest -q tests/test_mosaic_gpu_device.py
Every variant of each kernel (P @ V from registers or from SMEM), bf16 and fp16, causal and not, GQA, T not a
multiple of 128, T < S, batch 2 with different lengths. The backward: the dQ and dK/dV kernels (P and dS from
registers or from SMEM) against the XLA backward (also T = 4096), and jax.grad end to end (`-k backward or gradients`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from tests import suites
from tests.conftest import random_qkv
from tests.suites import random_layout
from xattn_jax import attention_xla
from xattn_jax.geometry import Geometry

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")

SHAPES = [  # B, T, S, N, K, H, with_lengths
  (2, 1000, 1300, 8, 2, 128, True),
  (1, 2048, 2048, 4, 4, 64, False),
  (1, 384, 1024, 4, 1, 128, False),
  (2, 640, 640, 6, 3, 64, True),
]


def _lengths(B: int, T: int, S: int, with_lengths: bool):
  """(q_lengths, kv_lengths): the second sequence shorter (177 queries, 100 keys) where `with_lengths`, else full."""
  if with_lengths:
    return jnp.array([T, T - 177], jnp.int32), jnp.array([S, S - 100], jnp.int32)
  return jnp.full((B,), T, jnp.int32), jnp.full((B,), S, jnp.int32)


@pytest.mark.parametrize(
  "pv_operand,num_ctas,tile_order,tile_scheduler",
  [
    ("registers", 132, "kv_head", "counter"),
    ("smem", 132, "kv_head", "counter"),
    ("registers", None, "kv_head", "counter"),
    ("registers", 5, "kv_head", "counter"),
    ("registers", 5, "head", "snake"),
    ("registers", 5, "rows", "counter"),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}T{s[1]}S{s[2]}N{s[3]}K{s[4]}H{s[5]}" for s in SHAPES])
def test_attention_kernel_matches_xla(shape, causal, dtype, pv_operand, num_ctas, tile_order, tile_scheduler):
  from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as kernel

  B, T, S, N, K, H, with_lengths = shape
  seed = hash((shape, causal, str(dtype), pv_operand, num_ctas, tile_order, tile_scheduler)) % 2**31
  q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = _lengths(B, T, S, with_lengths)
  geometry = Geometry.from_lengths(*lens)
  layout, _ = random_layout(seed + 1, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.4)
  scale = H**-0.5
  got, got_lse = kernel.block_sparse_attention(
    q,
    k,
    v,
    layout,
    geometry,
    causal=causal,
    scale=scale,
    config=kernel.ForwardConfig(
      pv_operand=pv_operand, num_ctas=num_ctas, tile_order=tile_order, tile_scheduler=tile_scheduler
    ),
  )
  want, want_lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, causal=causal, scale=scale)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert not np.isnan(got).any()
  tol = 3e-2 if dtype == jnp.bfloat16 else 5e-3
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < (1e-2 if dtype == jnp.bfloat16 else 2e-3), rel
  got_lse, want_lse = np.asarray(got_lse), np.asarray(want_lse)
  np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
  live = np.isfinite(want_lse)
  np.testing.assert_allclose(got_lse[live], want_lse[live], atol=2e-2, rtol=1e-3)


def test_tile_counter_starts_from_zero_in_every_call():
  """Calls chained in one jit and a compiled call run again: each must claim every tile (a counter left at the
  previous call's count would skip them all, leaving the output unwritten). Several tiles per CTA (num_ctas=7),
  empty padding rows, two sequences of different lengths."""
  from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as kernel

  B, T, N, K, H = 2, 1900, 8, 2, 128
  q, k, v = random_qkv(91, B=B, T=T, S=T, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = (jnp.array([1900, 1000], jnp.int32), jnp.array([1900, 1000], jnp.int32))
  geometry = Geometry.from_lengths(*lens)
  layout, _ = random_layout(92, B=B, N=N, T=T, S=T, blk=128, causal=True, lens=lens, density=0.5)
  call = functools.partial(
    kernel.block_sparse_attention,
    layout=layout,
    geometry=geometry,
    causal=True,
    scale=H**-0.5,
    config=kernel.ForwardConfig(num_ctas=7),
  )

  @jax.jit
  def chained(q, k, v):
    first, _ = call(q, k, v)
    second, _ = call(first, k, v)  # depends on the first: the two calls cannot merge
    return first, second

  want_first, _ = attention_xla.block_sparse_attention(q, k, v, layout, geometry, causal=True, scale=H**-0.5)
  want_second, _ = attention_xla.block_sparse_attention(want_first, k, v, layout, geometry, causal=True, scale=H**-0.5)
  for _ in range(2):  # the compiled program twice
    first, second = chained(q, k, v)
    for got, want in ((first, want_first), (second, want_second)):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_public_op_end_to_end(causal):
  B, T, N, K, H = 2, 1500, 8, 2, 128
  q, k, v = random_qkv(7, B=B, T=T, S=T, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = jnp.array([1500, 1111], jnp.int32)
  kw = dict(
    is_causal=causal, threshold=0.9, query_seq_lengths=lens, key_value_seq_lengths=lens, return_block_layout=True
  )
  got, lay_got = xa.xattention(q, k, v, implementation=("pallas_mosaic_gpu", "xla"), **kw)
  want = xa.block_sparse_attention(
    q, k, v, lay_got, causal=causal, query_seq_lengths=lens, key_value_seq_lengths=lens, implementation="xla"
  )
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2)
  assert 0 < float(lay_got.density()) <= 1


SCORE_CASES = [  # B, T, S, N, K, H, stride, causal, with_lengths
  (2, 1000, 1300, 8, 2, 128, 8, True, True),
  (1, 2048, 2048, 4, 4, 64, 16, True, False),
  (1, 700, 1500, 4, 1, 128, 4, False, False),
  (2, 640, 640, 6, 3, 64, 8, False, True),
  (1, 3968, 3968, 4, 2, 128, 16, True, False),  # bucketed (31 x 128): the last row block's q box runs past the end
]


@pytest.mark.parametrize(
  "options",
  [
    {},
    {"cluster_heads": 1, "key_splits": 1},
    {"cluster_heads": 2, "key_splits": 1},
    {"cluster_heads": 1, "key_splits": 2},
    {"p_operand": "smem", "num_stages": 2},
  ],
  ids=["default", "single", "cluster2", "split2", "smemP"],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "case", SCORE_CASES, ids=[f"B{c[0]}T{c[1]}S{c[2]}N{c[3]}K{c[4]}H{c[5]}s{c[6]}" for c in SCORE_CASES]
)
def test_scores_kernel_matches_xla(case, dtype, options):
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as kernel
  from xattn_jax import scoring_xla

  B, T, S, N, K, H, stride, causal, with_lengths = case
  if options.get("cluster_heads") == 2 and (N // K) % 2:
    pytest.skip("cluster_heads=2 needs an even GQA group")
  q, k, _ = random_qkv(hash((case, str(dtype), str(options))) % 2**31, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = _lengths(B, T, S, with_lengths)
  geometry = Geometry.from_lengths(*lens)
  kw = dict(stride=stride, block_size=128, causal=causal, scale=H**-0.5)
  got = kernel.antidiagonal_scores(q, k, geometry, config=kernel.ScoresConfig(**options), **kw)
  want = scoring_xla.antidiagonal_scores(q, k, geometry, **kw)
  got, want = np.asarray(got), np.asarray(want)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize(
  "options",
  [{}, {"cluster_heads": 1, "key_splits": 1}, {"cluster_heads": 2, "key_splits": 1}],
  ids=["default", "single", "cluster2"],
)
@pytest.mark.parametrize(
  "case", SCORE_CASES, ids=[f"B{c[0]}T{c[1]}S{c[2]}N{c[3]}K{c[4]}H{c[5]}s{c[6]}" for c in SCORE_CASES]
)
def test_alternating_estimator_matches_xla(case, options):
  """SPEC §1.7 on the GPU: the alternating estimator (the kernel reads the two row parities of q as two TMA boxes,
  one per consumer warpgroup) vs the reference."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as kernel
  from xattn_jax import scoring_xla

  B, T, S, N, K, H, stride, causal, with_lengths = case
  if options.get("cluster_heads") == 2 and (N // K) % 2:
    pytest.skip("cluster_heads=2 needs an even GQA group")
  q, k, _ = random_qkv(hash(case) % 2**31, B=B, T=T, S=S, N=N, K=K, H=H, dtype=jnp.bfloat16)
  geometry = Geometry.from_lengths(*_lengths(B, T, S, with_lengths))
  kw = dict(stride=stride, block_size=128, causal=causal, scale=H**-0.5, estimator=xa.Estimator.ALTERNATING)
  got = np.asarray(kernel.antidiagonal_scores(q, k, geometry, config=kernel.ScoresConfig(**options), **kw))
  want = np.asarray(scoring_xla.antidiagonal_scores(q, k, geometry, **kw))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-3)


BWD_SHAPES = [  # B, T, S, N, K, H, with_lengths
  (2, 1000, 1300, 8, 2, 128, True),
  (1, 4096, 4096, 8, 2, 128, False),
  (1, 384, 1024, 4, 1, 64, False),
  (2, 640, 640, 6, 3, 64, True),
]
# Max-normalized error of each gradient vs the float32 XLA backward, and its relative Frobenius error.
BWD_TOL = {jnp.bfloat16: (2e-2, 1e-2), jnp.float16: (4e-3, 2e-3)}


@pytest.mark.parametrize("operand", ["registers", "smem"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=[f"B{s[0]}T{s[1]}S{s[2]}N{s[3]}K{s[4]}H{s[5]}" for s in BWD_SHAPES])
def test_backward_kernels_match_xla(shape, causal, dtype, operand):
  """The dQ and dK/dV kernels vs the XLA backward, given the same forward (out, lse) and random cotangents."""
  from xattn_jax.pallas_kernels import block_sparse_attention_bwd_mosaic_gpu as bwd_kernels
  from xattn_jax import attention_xla_bwd

  B, T, S, N, K, H, with_lengths = shape
  seed = (sum(shape) * 31 + 7 * causal + 3 * (dtype == jnp.float16) + (operand == "smem")) % 2**31
  q, k, v = random_qkv(seed, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
  lens = _lengths(B, T, S, with_lengths)
  geometry = Geometry.from_lengths(*lens)
  layout, _ = random_layout(seed + 1, B=B, N=N, T=T, S=S, blk=128, causal=causal, lens=lens, density=0.4)
  kw = dict(causal=causal, scale=H**-0.5)
  out, lse = attention_xla.block_sparse_attention(q, k, v, layout, geometry, **kw)
  rng = np.random.default_rng(seed + 2)
  d_out = jnp.asarray(rng.standard_normal(out.shape), dtype)
  d_lse = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)
  args = (q, k, v, out, lse, d_out, d_lse, layout, geometry)
  got = bwd_kernels.block_sparse_attention_bwd(*args, **kw, config=bwd_kernels.BackwardConfig(operand=operand))
  want = attention_xla_bwd.block_sparse_attention_bwd(*args, **kw)
  max_tol, rel_tol = BWD_TOL[dtype]
  for name, a, b, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
    assert a.dtype == x.dtype and a.shape == x.shape, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), f"{name}: not finite"
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= max_tol, f"{name}: max error {err:.2e} of the largest entry"
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel <= rel_tol, f"{name}: relative error {rel:.2e}"
  dq, dk = np.asarray(got[0], np.float32), np.asarray(got[1], np.float32)
  for b in range(B):  # padding queries and keys get exactly zero
    assert np.all(dq[b, int(lens[0][b]) :] == 0) and np.all(dk[b, int(lens[1][b]) :] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_end_to_end(causal):
  """jax.grad through xattention: the Mosaic GPU forward and backward vs the XLA ones on the same layout."""
  B, T, N, K, H = 2, 1500, 8, 2, 128
  q, k, v = random_qkv(17, B=B, T=T, S=T, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = jnp.array([1500, 1111], jnp.int32)
  _, layout = xa.xattention(
    q,
    k,
    v,
    is_causal=causal,
    threshold=0.9,
    query_seq_lengths=lens,
    key_value_seq_lengths=lens,
    return_block_layout=True,
    implementation="xla",
  )
  weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

  def loss(q, k, v, implementation):
    out = xa.block_sparse_attention(
      q, k, v, layout, causal=causal, query_seq_lengths=lens, key_value_seq_lengths=lens, implementation=implementation
    )
    return jnp.sum(out.astype(jnp.float32) * weights)

  got = jax.jit(jax.grad(functools.partial(loss, implementation="pallas_mosaic_gpu"), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(functools.partial(loss, implementation="xla"), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= 2e-2, f"d{name}: max error {err:.2e} of the largest entry"


def test_default_dispatch_runs_the_mosaic_gpu_kernels():
  """implementation=None is chosen when the program is lowered (`lax.platform_dependent`): on a CUDA device the
  lowered program carries the Mosaic GPU kernels and equals the explicit choice bit for bit, forward and gradient."""
  B, T, N, K, H = 2, 1500, 8, 2, 128
  q, k, v = random_qkv(23, B=B, T=T, S=T, N=N, K=K, H=H, dtype=jnp.bfloat16)
  lens = jnp.array([1500, 1111], jnp.int32)

  def loss(q, k, v, implementation):
    out = xa.xattention(
      q,
      k,
      v,
      is_causal=True,
      threshold=0.9,
      query_seq_lengths=lens,
      key_value_seq_lengths=lens,
      implementation=implementation,
    )
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape)))

  default = jax.jit(jax.value_and_grad(functools.partial(loss, implementation=None), argnums=(0, 1, 2)))
  assert default.lower(q, k, v).as_text().count("mosaic_gpu") > 0
  got = default(q, k, v)
  want = jax.jit(jax.value_and_grad(functools.partial(loss, implementation="pallas_mosaic_gpu"), argnums=(0, 1, 2)))(
    q, k, v
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("estimator", ["antidiagonal", "alternating"])
def test_padding_values_do_not_matter(estimator):
  """NaN padding with ragged lengths through the real kernels (the default dispatch on this GPU)."""
  suites.assert_padding_values_do_not_matter(
    seed=19, T=4096, N=8, K=2, H=128, lengths=[4000, 2901], estimator=estimator, min_density=0.05
  )
