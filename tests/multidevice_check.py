"""Sharded == unsharded on 4 CPU devices; run by tests/test_sharding.py in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before JAX starts). Each DATAxTENSOR mesh
is checked against one unsharded run (one process for all: JAX's start and the references are paid once).

    python tests/multidevice_check.py 1x4 2x2 4x1
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xattn_jax as xa
from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.generate import Generator
from xattn_jax.models.sharding import make_mesh
from xattn_jax.models.transformer import Transformer
from tests.conftest import random_qkv, run_checked
from xattn_jax.sharding import sharded_dense_attention, sharded_xattention


def check_op(meshes):
  q, k, v = random_qkv(0, B=4, T=200, S=260, N=8, K=4, H=16)
  lens = (jnp.array([200, 150, 90, 200], jnp.int32), jnp.array([260, 200, 260, 230], jnp.int32))
  kw = dict(
    is_causal=True,
    threshold=jnp.linspace(0.4, 1.0, 8),
    block_size=32,
    stride=8,
    query_seq_lengths=lens[0],
    key_value_seq_lengths=lens[1],
    return_block_layout=True,
  )
  want, want_layout = run_checked(xa.xattention, q, k, v, **kw)
  dense_kw = dict(is_causal=True, query_seq_lengths=lens[0], key_value_seq_lengths=lens[1], implementation="xla")
  want_dense = run_checked(xa.dense_attention, q, k, v, **dense_kw)
  for mesh in meshes:
    check_op_on(mesh, q, k, v, kw, want, want_layout, dense_kw, want_dense)


def check_op_on(mesh, q, k, v, kw, want, want_layout, dense_kw, want_dense):
  # mesh= explicitly: checkify of a shard_map under jax.set_mesh fails in jax 0.11/0.12 (context vs manual mesh).
  got, layout = run_checked(sharded_xattention, q, k, v, mesh=mesh, **kw)
  with jax.set_mesh(mesh):  # the ambient-mesh path, unchecked
    ambient = jax.jit(lambda q, k, v: sharded_xattention(q, k, v, **kw)[0])(q, k, v)
  np.testing.assert_allclose(np.asarray(ambient), np.asarray(want), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(layout.indices), np.asarray(want_layout.indices))
  _, counts = run_checked(sharded_xattention, q, k, v, mesh=mesh, **dict(kw, return_block_layout="counts"))
  assert isinstance(counts, xa.BlockCounts), type(counts)
  for field in ("counts", "num_allowed"):
    np.testing.assert_array_equal(np.asarray(getattr(counts, field)), np.asarray(getattr(want_layout, field)))
  np.testing.assert_allclose(
    np.asarray(run_checked(sharded_dense_attention, q, k, v, mesh=mesh, **dense_kw)),
    np.asarray(want_dense),
    atol=1e-6,
    rtol=1e-6,
  )
  try:
    sharded_xattention(q[:, :, :2], k[:, :, :1], v[:, :, :1], mesh=mesh, is_causal=True)
    assert mesh.shape["tensor"] == 1, "K=1 over a tensor axis > 1 must fail"
  except ValueError as e:
    assert "must be divisible by the size" in str(e), e


def check_model(meshes):
  config = ModelConfig(
    vocab_size=97,
    d_model=64,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=16,
    mlp_dim=128,
    qkv_bias=True,
    attention=AttentionConfig(
      kind="xattention", xattention=xa.XAttentionConfig(threshold=0.8, block_size=16, stride=4)
    ),
  )
  model = Transformer(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(1, 97, size=n)) for n in (70, 41, 100, 64)]
  plain = Generator(model, max_len=256, chunk_size=64, bucket=16)
  a, _, _ = plain.prefill(prompts)
  tokens = plain.generate(prompts, max_new_tokens=4).tokens
  # A dense model on the block route (what a TPU or a CPU runs at long context), chunked, per device.
  dense = model.with_attention(AttentionConfig(dense_implementation="xla"))
  a_dense, _, _ = Generator(dense, max_len=256, chunk_size=64, bucket=16).prefill(prompts)
  for mesh in meshes:
    sharded = Generator(model, max_len=256, chunk_size=64, bucket=16, mesh=mesh)
    b, cache_b, _ = sharded.prefill(prompts)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=2e-4)
    shard = cache_b.layers[0].k.addressable_shards[0].data  # the KV cache is split by batch and kv heads
    assert shard.shape == (4 // mesh.shape["data"], 256, 4 // mesh.shape["tensor"], 16), shard.shape
    assert sharded.generate(prompts, max_new_tokens=4).tokens == tokens
    b, _, _ = Generator(dense, max_len=256, chunk_size=64, bucket=16, mesh=mesh).prefill(prompts)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a_dense), atol=2e-4, rtol=2e-4)


def main():
  assert jax.device_count() == 4, jax.devices()
  shapes = [tuple(int(n) for n in arg.split("x")) for arg in sys.argv[1:]]
  meshes = [make_mesh(data, tensor) for data, tensor in shapes]
  check_op(meshes)
  check_model(meshes)
  for data, tensor in shapes:
    print(f"mesh ({data}, {tensor}): sharded == unsharded")


if __name__ == "__main__":
  main()
