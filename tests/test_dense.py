"""`xattn_jax.dense_attention`: the route each platform takes, every CPU route against the oracle, memory that stays
O(T) in the model's compiled prefill programs, and chunked prefill equal to one-shot prefill."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xattn_jax as xa
from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.generate import Generator
from xattn_jax.models.transformer import Transformer
from tests import suites
from tests.conftest import random_qkv, run_checked
from tests.hlo_checks import zero_filled_loop_buffers

R = xa.DenseRoute


class TestDenseDefaultRoute(suites.DenseAttentionSuite):
  implementation = None  # logits or decode on these small shapes


class TestDenseBlockRouteXla(suites.DenseAttentionSuite):
  implementation = "xla"  # the blockwise reference, what a CPU runs at long context


def _route(
  platform, *, dtype=jnp.bfloat16, B=1, T=32768, S=32768, N=32, H=128, causal=True, aligned=True, implementation=None
):
  return xa.dense_route(
    platform=platform,
    dtype=dtype,
    batch=B,
    q_len=T,
    kv_len=S,
    num_heads=N,
    head_dim=H,
    causal=causal,
    aligned=aligned,
    implementation=implementation,
  )


def test_route_per_platform():
  # GPU: cuDNN where its top-left causal mask is ours; the Mosaic GPU block route for chunks after the first.
  assert _route("gpu") is R.CUDNN
  assert _route("gpu", T=4096, aligned=False) is R.BLOCKS
  assert _route("gpu", T=4096, aligned=False, causal=False) is R.CUDNN
  assert _route("gpu", dtype=jnp.float32) is R.BLOCKS
  assert _route("gpu", H=160) is R.BLOCKS
  assert _route("gpu", T=1, aligned=False) is R.DECODE
  # TPU and CPU: the block route (Mosaic TPU kernels / blockwise XLA) unless the logits are small.
  for platform in ("tpu", "cpu"):
    assert _route(platform) is R.BLOCKS
    assert _route(platform, T=1, aligned=False) is R.DECODE
    assert _route(platform, T=256, S=256, N=4) is R.LOGITS
  # Explicit choices.
  assert _route("cpu", T=256, S=256, N=4, implementation=("xla",)) is R.BLOCKS
  assert _route("cpu", implementation="cudnn") is R.CUDNN
  with pytest.raises(ValueError, match="implementation='cudnn' cannot compute causal"):
    _route("gpu", T=4096, aligned=False, implementation="cudnn")


def test_routes_chosen_on_this_host_need_no_gpu():
  q, k, v = random_qkv(3, B=1, T=256, S=512, N=2, K=1, H=16)
  with pytest.raises(ValueError, match="implementation='cudnn' cannot"):
    xa.dense_attention(q, k, v, is_causal=True, implementation="cudnn")
  with pytest.raises(ValueError, match="is not one of the available backends"):
    xa.dense_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="query_chunk_size=100 must be a multiple of 128"):
    xa.dense_attention(q, k, v, query_chunk_size=100)
  with pytest.raises(ValueError, match=r"key.shape\[3\]=8 must equal the head dim query.shape\[3\]=16"):
    xa.dense_attention(q, k[..., :8], v[..., :8])
  # Query chunks of the block route change nothing.
  whole = xa.dense_attention(q, k, v, is_causal=True, implementation="xla")
  chunked = xa.dense_attention(q, k, v, is_causal=True, implementation="xla", query_chunk_size=128)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-6, rtol=1e-6)


def test_a_cudnn_fallback_is_silent_only_where_there_is_no_gpu(monkeypatch):
  """Lowering for cuda from this host, cuDNN's attention refuses (not installed) and the block route runs: fine for an
  export from a CPU; on a GPU host the same fallback would hide a slower kernel, so there it warns."""
  sds = jax.ShapeDtypeStruct

  def lower(T):  # a new function and shape each time: no cached trace may skip the fallback
    q, kv, n = sds((1, T, 8, 128), jnp.bfloat16), sds((1, T, 2, 128), jnp.bfloat16), sds((1,), jnp.int32)
    call = lambda q, k, v, n: xa.dense_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n)
    return jax.jit(call).trace(q, kv, kv, n).lower(lowering_platforms=("cuda",)).as_text()

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert "mosaic_gpu" in lower(4096)
  monkeypatch.setattr(xa.dense.jax, "default_backend", lambda: "gpu")
  with pytest.warns(UserWarning, match="cuDNN refused a call it should take"):
    assert "mosaic_gpu" in lower(4224)


def test_the_cudnn_route_returns_cudnns_output(monkeypatch):
  """Lowered for cuda with a stand-in for cuDNN's attention (this host has none): the program returns what cuDNN
  returned and holds no block kernel. (The block route's branch once also caught route CUDNN, overwrote cuDNN's output
  and XLA dropped the cuDNN call: the dense model ran the block kernel on the GPU.)"""
  real = jax.nn.dot_product_attention

  def stand_in(q, k, v, *, implementation=None, **kw):
    out = real(q, k, v, implementation="xla" if implementation == "cudnn" else implementation, **kw)
    return out + 3 if implementation == "cudnn" else out  # marks cuDNN's output

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  q, k, v = random_qkv(2, B=1, T=256, S=256, N=4, K=2, H=128, dtype=jnp.bfloat16)
  n = jnp.array([200], jnp.int32)
  call = lambda q, k, v, n: xa.dense_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n)
  text = jax.jit(call).trace(q, k, v, n).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" not in text
  route = xa.dense.dense_route  # run here too as on a GPU: the route CUDNN, with the stand-in
  monkeypatch.setattr(xa.dense, "dense_route", lambda **kw: route(**{**kw, "platform": "gpu"}))
  got = run_checked(lambda *a: call(*a), q, k, v, n)  # a new function: not the cached trace of the lowering above
  want = run_checked(
    lambda q, k, v, n: xa.dense_attention(
      q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n, implementation="xla"
    ),
    q,
    k,
    v,
    n,
  )
  np.testing.assert_allclose(np.asarray(got[:, :200], np.float32), np.asarray(want[:, :200], np.float32) + 3, atol=0.1)


@pytest.mark.parametrize("B", [1, 4])
def test_decode_dots_batch_over_one_stride_of_the_cache(B):
  # A dot whose batch dimensions are two non-adjacent dims of the [B, S, K, H] cache makes XLA's GPU compiler
  # transpose the cache, and in the model's decode loop it did so once for the whole loop: a second cache (32 GiB at
  # 32K tokens and B = 8 for an 8B model). Each dot over K or V batches over at most one non-trivial cache dim.
  # At B > 1 each also contracts a single dim: with the cache's (K, H) as two contracting dims the GPU compiler kept
  # K as [B, K, H, S] for the whole loop (half a cache of temporaries; benchmarks/probe_decode_attention.py --in-loop).
  q = jax.ShapeDtypeStruct((B, 1, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, 256, 2, 64), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
  attend = lambda q, k, v, n: xa.dense_attention(
    q, k, v, is_causal=True, query_seq_lengths=n * 0 + 1, key_value_seq_lengths=n
  )
  text = jax.jit(attend).lower(q, kv, kv, lengths).as_text()
  dots = re.findall(
    r"batching_dims = \[([\d, ]*)\] x \[([\d, ]*)\], contracting_dims = \[([\d, ]*)\].*?: "
    r"\(tensor<[^>]*>, tensor<([\dx]+)x",
    text,
  )
  assert len(dots) == 2, text
  for _, rhs_batch, lhs_contracting, rhs_shape in dots:
    shape = [int(d) for d in rhs_shape.split("x")]
    assert shape[1] == 256, rhs_shape  # the cache itself, not a relaid-out copy
    assert sum(shape[int(d)] > 1 for d in rhs_batch.split(", ")) <= 1, (B, rhs_batch)
    assert B == 1 or "," not in lhs_contracting, (B, lhs_contracting)


def test_gradient_of_the_block_route_matches_the_logits_route():
  q, k, v = random_qkv(4, B=1, T=96, S=200, N=4, K=2, H=16)
  grads = lambda impl: jax.grad(
    lambda q, k, v: jnp.sum(xa.dense_attention(q, k, v, is_causal=True, implementation=impl) ** 2), argnums=(0, 1, 2)
  )(q, k, v)
  for got, want in zip(grads("xla"), grads(None)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-4)


# The tiny Llama: 2 layers, 4 query / 2 kv heads of 64.
TINY_LONG = ModelConfig(
  vocab_size=256, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=512, max_seq_len=32768
)


def _temps_gib(attention: AttentionConfig, T: int, S: int) -> float:
  """XLA temporaries of the compiled prefill (T == S) or of a chunk of T tokens into a cache of S."""
  config = TINY_LONG.with_attention(attention)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  cache = jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(1, S))
  method = "prefill" if T == S else "extend"
  fn = lambda state, tokens, lengths, cache: getattr(nnx.merge(graphdef, state), method)(tokens, lengths, cache)
  compiled = (
    jax.jit(fn, donate_argnums=3)
    .lower(state, jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32), cache)
    .compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes / 2**30


@pytest.mark.parametrize("attention", [AttentionConfig(), AttentionConfig(kind="xattention")], ids=["dense", "xattn"])
def test_long_prefill_memory_is_linear(attention):
  """32K one-shot and a 4K chunk into a 32K cache: under 1 GiB of temporaries (dense was 48 / 6 GiB with XLA's
  materialized logits)."""
  assert _temps_gib(attention, 32768, 32768) < 1.0
  assert _temps_gib(attention, 4096, 32768) < 1.0


def test_query_chunk_loop_fills_no_query_sized_buffer():
  """The op's query-chunk loop (also dense_attention's block route) writes its output over its copy of q: no
  zero-filled [B, T, N, H] buffer, which XLA's GPU compiler would hold from the program's start, one per layer of a
  model (hlo_checks). The XLA reference's own accumulators are one query chunk's size."""
  q, k, v = random_qkv(6, B=1, T=1024, S=1024, N=4, K=2, H=16)
  fn = lambda q, k, v: xa.xattention(q, k, v, is_causal=True, threshold=0.9, query_chunk_size=256)
  text = jax.jit(fn).lower(q, k, v).as_text(dialect="hlo")
  assert " while(" in text and zero_filled_loop_buffers(text, q.size) == []


def test_dense_chunked_prefill_equals_one_shot_on_the_block_route():
  config = ModelConfig(
    vocab_size=97,
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=96,
    attention=AttentionConfig(dense_implementation="xla"),
  )
  model = Transformer(config, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, 97, n).tolist() for n in (700, 389)]
  one_shot, _, _ = Generator(model, max_len=1024, chunk_size=1024).prefill(prompts)
  chunked, _, _ = Generator(model, max_len=1024, chunk_size=256).prefill(prompts)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(one_shot), atol=2e-4, rtol=2e-4)
