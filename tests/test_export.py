"""Exporting the default-dispatch ops for another platform from this CPU host (`backends._per_platform`): the kernel
is chosen when the program is lowered, so a TPU or CUDA artifact carries its Pallas kernels and a CPU one the XLA
reference."""

from __future__ import annotations

import functools

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
  mesh = AbstractMesh(
    (1,), ("x",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  )
  with use_abstract_mesh(mesh):  # Pallas TPU lowering needs the chip it targets
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


def test_multi_platform_artifacts_are_refused_by_jax_pallas():
  """Documented limit: one artifact for several platforms fails in JAX's Pallas lowering (the TPU kernel's CPU rule,
  Mosaic GPU's mpmd_map); export once per platform instead."""
  q, k, v = _inputs()
  with pytest.raises(Exception, match="interpret mode|multi-platform"):
    jax.export.export(_XATTENTION, platforms=["cpu", "cuda"])(q, k, v)
