"""Exporting the default-dispatch ops for another platform from this CPU host (`backends._per_platform`): the kernel
is chosen when the program is lowered, so a TPU or CUDA artifact carries its Pallas kernels and a CPU one the XLA
reference."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import xattn_jax as xa
from tests.conftest import run_checked


def _inputs():
  q = jax.random.normal(jax.random.key(0), (1, 512, 4, 64), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (1, 512, 2, 64), jnp.bfloat16)
  v = jax.random.normal(jax.random.key(2), (1, 512, 2, 64), jnp.bfloat16)
  return q, k, v


def _tpu_target():
  """The scope in which a CPU host lowers for a TPU: Pallas's TPU lowering reads the chip from the abstract mesh."""
  device = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device))


_XATTENTION = jax.jit(functools.partial(xa.xattention, is_causal=True, threshold=0.9))


def test_cpu_export_runs_the_reference_and_matches_jit():
  q, k, v = _inputs()
  exported = jax.export.export(_XATTENTION, platforms=["cpu"])(q, k, v)
  text = exported.mlir_module()
  assert "tpu_custom_call" not in text and "mosaic_gpu" not in text.lower()
  with jax.default_device(jax.devices("cpu")[0]):  # on an accelerator host too
    q, k, v = jax.device_put((q, k, v), jax.devices("cpu")[0])
    want = run_checked(functools.partial(xa.xattention, is_causal=True, threshold=0.9), q, k, v)
    np.testing.assert_array_equal(np.asarray(exported.call(q, k, v), np.float32), np.asarray(want, np.float32))


def test_tpu_export_from_a_cpu_host_carries_the_tpu_kernels():
  q, k, v = _inputs()
  with _tpu_target():  # Pallas TPU lowering needs the chip it targets
    exported = jax.export.export(_XATTENTION, platforms=["tpu"])(q, k, v)
  assert exported.platforms == ("tpu",)
  assert exported.mlir_module().count("tpu_custom_call") == 2  # the scoring and the attention kernel


@pytest.mark.parametrize("op", ["xattention", "gradient"])
def test_cuda_export_from_a_cpu_host_carries_the_mosaic_gpu_kernels(op):
  q, k, v = _inputs()
  fn = (
    _XATTENTION
    if op == "xattention"
    else jax.jit(jax.grad(lambda q, k, v: _XATTENTION(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  )
  exported = jax.export.export(fn, platforms=["cuda"])(q, k, v)
  assert exported.platforms == ("cuda",)
  assert "mosaic_gpu" in exported.mlir_module().lower()


def test_multi_platform_artifacts():
  """One artifact for the CPU and CUDA: jax 0.12.1 lowers it (the CPU branch runs here exactly as the jitted op, the
  CUDA branch carries the Mosaic GPU kernels); earlier versions refuse it in Pallas's lowering (the TPU kernel's CPU
  rule, Mosaic GPU's mpmd_map), where the documented way is one export per platform."""
  q, k, v = _inputs()
  try:
    exported = jax.export.export(_XATTENTION, platforms=["cpu", "cuda"])(q, k, v)
  except Exception as e:  # jax < 0.12.1
    assert re.search("interpret mode|multi-platform", str(e)), e
    return
  assert exported.platforms == ("cpu", "cuda") and "mosaic_gpu" in exported.mlir_module().lower()
  np.testing.assert_array_equal(
    np.asarray(exported.call(q, k, v), np.float32), np.asarray(_XATTENTION(q, k, v), np.float32)
  )


_DENSE = jax.jit(functools.partial(xa.dense_attention, is_causal=True))


def test_dense_attention_exports_per_platform_from_a_cpu_host():
  """dense_attention's route is chosen when lowering too: the CPU artifact equals the jitted op, a TPU one carries
  the Pallas TPU kernel, a CUDA one (no cuDNN on this host to trace) the Mosaic GPU kernel with every block."""
  q = jax.random.normal(jax.random.key(3), (1, 2048, 8, 64), jnp.bfloat16)  # over the logits budget: block route
  k = jax.random.normal(jax.random.key(4), (1, 4608, 2, 64), jnp.bfloat16)
  v = jax.random.normal(jax.random.key(5), (1, 4608, 2, 64), jnp.bfloat16)
  cpu = jax.export.export(_DENSE, platforms=["cpu"])(q, k, v)
  with jax.default_device(jax.devices("cpu")[0]):
    args = jax.device_put((q, k, v), jax.devices("cpu")[0])
    np.testing.assert_array_equal(np.asarray(cpu.call(*args), np.float32), np.asarray(_DENSE(*args), np.float32))
  with _tpu_target():
    tpu = jax.export.export(_DENSE, platforms=["tpu"])(q, k, v)
  assert tpu.mlir_module().count("tpu_custom_call") == 1
  cuda = jax.export.export(_DENSE, platforms=["cuda"])(q, k, v)
  assert "mosaic_gpu" in cuda.mlir_module().lower()


def _tiny_prefill_for_a_tpu(attention: str) -> str:
  """A tiny Llama's jitted prefill (16K tokens) exported for a TPU from this host: its module text."""
  from flax import nnx

  from xattn_jax.models import AttentionConfig, ModelConfig, Transformer

  config = ModelConfig(
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=128,
    max_seq_len=16384,
    attention=AttentionConfig(kind=attention, dense_layers=1 if attention == "xattention" else 0),
  )
  model = nnx.eval_shape(lambda: Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  T = 16384

  def prefill(state, tokens, lengths):
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, lengths, model.init_cache(1, T))[0]

  args = (state, jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
  with _tpu_target():
    return jax.export.export(jax.jit(prefill), platforms=["tpu"])(*args).mlir_module()


@pytest.mark.parametrize("attention,kernels", [("dense", 1), ("xattention", 2)])
def test_a_model_prefill_exports_for_a_tpu_from_a_cpu_host(attention, kernels):
  """A tiny Llama's jitted prefill lowered for a TPU on this CPU host, what a TPU VM user compiles ahead of time: the
  dense model runs the TPU attention kernel with every block (the prompt is over the logits budget); with a dense
  first layer and an XAttention second one, the scoring kernel joins it (both layers call the one attention
  kernel, lowered once)."""
  assert _tiny_prefill_for_a_tpu(attention).count("tpu_custom_call") == kernels


def test_a_tpu_export_from_a_host_with_cudnn_leaves_cudnn_out(monkeypatch):
  """On a GPU host the cuda branch of the dense prefill traces cuDNN's attention, a primitive that needs devices to
  lower, and lowering for an abstract TPU mesh refused the whole program ("AbstractMesh cannot be used ...", seen on
  an H100). Here a stand-in cuDNN carries such a primitive (a pure_callback): the export succeeds without it."""
  real = jax.nn.dot_product_attention

  def stand_in(q, k, v, *, implementation=None, **kw):
    if implementation != "cudnn":
      return real(q, k, v, implementation=implementation, **kw)
    out = real(q, k, v, implementation="xla", **kw)
    return jax.pure_callback(lambda x: x, jax.ShapeDtypeStruct(out.shape, out.dtype), out)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  text = _tiny_prefill_for_a_tpu("dense")
  assert text.count("tpu_custom_call") == 1 and "callback" not in text
