"""Sequence (context) parallelism on 8 CPU devices (tests/conftest.py forces them): `sharded_xattention` and
`sharded_dense_attention` with `seq_axis` against the unsharded ops, on 1-D and multi-axis meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from tests.conftest import random_qkv, run_checked
from xattn_jax.context_parallel import chunk_tokens, zigzag_order
from xattn_jax.sharding import sharded_dense_attention, sharded_xattention

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

MESHES = {  # name: (shape, axis names, sharded_xattention axes)
  "seq8": ((8,), ("seq",), dict(batch_axis=None, head_axis=None)),
  "seq4xtensor2": ((4, 2), ("seq", "tensor"), dict(batch_axis=None)),
  "data2xseq2xtensor2": ((2, 2, 2), ("data", "seq", "tensor"), {}),
}


def _mesh(name, explicit=False):
  shape, names, axes = MESHES[name]
  kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape)), axes


def test_zigzag_balances_causal_work():
  order = zigzag_order(4)
  assert order.tolist() == [0, 7, 1, 6, 2, 5, 3, 4]
  work = [sum(c + 1 for c in order[2 * i : 2 * i + 2]) for i in range(4)]  # chunk c has c + 1 units of causal work
  assert len(set(work)) == 1
  assert chunk_tokens(1000, 4, 128) == 128 and chunk_tokens(1025, 4, 128) == 256


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("causal", [True, False])
def test_equals_unsharded(mesh_name, causal):
  mesh, axes = _mesh(mesh_name)
  q, k, v = random_qkv(11, B=2, T=700, S=900, N=8, K=4, H=16)
  kw = dict(
    is_causal=causal,
    threshold=jnp.linspace(0.5, 0.95, 8),
    block_size=32,
    stride=8,
    query_seq_lengths=jnp.array([700, 433], jnp.int32),
    key_value_seq_lengths=jnp.array([900, 610], jnp.int32),
    return_block_layout=True,
    estimator="alternating" if causal else "antidiagonal",  # row parity survives the sequence split (SPEC §1.7)
  )
  want, want_layout = run_checked(xa.xattention, q, k, v, **kw)
  got, layout = jax.jit(lambda q, k, v: sharded_xattention(q, k, v, mesh=mesh, seq_axis="seq", **axes, **kw))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  for field in ("counts", "indices", "num_allowed"):
    np.testing.assert_array_equal(np.asarray(getattr(layout, field)), np.asarray(getattr(want_layout, field)))
  if mesh_name == sorted(MESHES)[0]:  # the counts alone come back in the same order
    kw["return_block_layout"] = "counts"
    _, counts = jax.jit(lambda q, k, v: sharded_xattention(q, k, v, mesh=mesh, seq_axis="seq", **axes, **kw))(q, k, v)
    assert isinstance(counts, xa.BlockCounts), type(counts)
    for field in ("counts", "num_allowed"):
      np.testing.assert_array_equal(np.asarray(getattr(counts, field)), np.asarray(getattr(want_layout, field)))


def test_bf16_self_attention_explicit_axes_and_dense():
  mesh, axes = _mesh("seq4xtensor2", explicit=True)
  q, k, v = random_qkv(12, B=1, T=1000, S=1000, N=4, K=2, H=32, dtype=jnp.bfloat16)
  kw = dict(is_causal=True, threshold=0.9, block_size=64, stride=16)
  want = xa.xattention(q, k, v, **kw)
  got = sharded_xattention(q, k, v, mesh=mesh, seq_axis="seq", **axes, **kw)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-2, rtol=1e-2)
  mesh, axes = _mesh("data2xseq2xtensor2")
  q, k, v = random_qkv(13, B=2, T=300, S=520, N=4, K=2, H=16)
  lens = dict(
    query_seq_lengths=jnp.array([300, 120], jnp.int32), key_value_seq_lengths=jnp.array([520, 333], jnp.int32)
  )
  want = xa.dense_attention(q, k, v, is_causal=True, implementation="xla", **lens)
  got = sharded_dense_attention(q, k, v, mesh=mesh, seq_axis="seq", is_causal=True, **lens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)


def test_bad_axes():
  mesh, _ = _mesh("seq4xtensor2")
  q, k, v = random_qkv(14, B=1, T=64, S=64, N=2, K=2, H=8)
  with pytest.raises(ValueError, match="must name different mesh axes"):
    sharded_xattention(q, k, v, mesh=mesh, batch_axis=None, head_axis="seq", seq_axis="seq")
  with pytest.raises(ValueError, match="mesh axis 'sequence' is not one of"):
    sharded_xattention(q, k, v, mesh=mesh, batch_axis=None, seq_axis="sequence")
  with pytest.raises(ValueError, match="not 'cudnn'"):
    sharded_dense_attention(q, k, v, mesh=mesh, batch_axis=None, seq_axis="seq", implementation="cudnn")


@pytest.mark.parametrize(
  "data,seq,tensor",
  [pytest.param(1, 8, 1, marks=pytest.mark.slow), pytest.param(1, 4, 2, marks=pytest.mark.slow), (2, 2, 2)],
)
def test_model_prefill_and_decode_on_a_seq_mesh(data, seq, tensor):
  """A Generator on a mesh with a "seq" axis: prompts split over the devices, the KV cache split by positions; the
  logits and the greedy tokens equal the unsharded model's."""
  from flax import nnx

  from xattn_jax.models.config import AttentionConfig, ModelConfig
  from xattn_jax.models.generate import Generator
  from xattn_jax.models.sharding import make_mesh
  from xattn_jax.models.transformer import Transformer

  config = ModelConfig(
    vocab_size=97,
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    attention=AttentionConfig(
      kind="xattention", dense_layers=1, xattention=xa.XAttentionConfig(threshold=0.8, block_size=16, stride=4)
    ),
  )
  model = Transformer(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(1, 97, size=n)) for n in (300, 170)]
  mesh = make_mesh(data, tensor, seq=seq)
  for chunk in (512, 128):  # one shot, then chunked
    plain = Generator(model, max_len=512, chunk_size=chunk, bucket=16)
    sharded = Generator(model, max_len=512, chunk_size=chunk, bucket=16, mesh=mesh)
    a, _, dens_a = plain.prefill(prompts)
    b, cache_b, dens_b = sharded.prefill(prompts)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(dens_b), np.asarray(dens_a), atol=1e-6)
    shard = cache_b.layers[0].k.addressable_shards[0].data
    assert shard.shape == (2 // data, 512 // seq, 2 // tensor, 16), shard.shape
  assert plain.generate(prompts, max_new_tokens=5).tokens == sharded.generate(prompts, max_new_tokens=5).tokens


def test_benchmark_script_runs_at_toy_size(tmp_path):
  """benchmarks/context_parallel.py end to end on 1, 2 and 4 CPU devices (its numbers mean nothing here)."""
  import json

  from benchmarks import context_parallel

  with xa.traced_checks(True):  # the script's main turns them off inside its own block
    assert (
      context_parallel.main(
        [
          "--lengths",
          "1024",
          "--devices",
          "1,2,4",
          "--heads",
          "4",
          "--kv-heads",
          "2",
          "--head-dim",
          "16",
          "--dtype",
          "float32",
          "--repeats",
          "1",
          "--out-dir",
          str(tmp_path),
        ]
      )
      == 0
    )
  (result,) = (tmp_path / "context_parallel").glob("*/*.json")
  rows = json.loads(result.read_text())["rows"]
  assert [r["P"] for r in rows] == [1, 1, 2, 4] and all(r.get("max_abs_diff", 0) < 1e-5 for r in rows)
  assert rows[-1]["kv_gather_gib"] > 0


def test_two_processes_on_the_distributed_runtime():
  """tests/multihost_check.py in two local processes (one per "host", two CPU devices each)."""
  import os
  import pathlib
  import socket
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [sys.executable, str(root / "tests" / "multihost_check.py"), str(i), port],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f"process {i}: sharded == unsharded" in out, out[-3000:]
