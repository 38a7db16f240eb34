"""Multi-device: sharded == unsharded for the op and a tiny model's prefill + decode on 4 CPU devices, per mesh.

The meshes run tests/multidevice_check.py in one fresh process, because the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import random_qkv
from xattn_jax.sharding import sharded_dense_attention, sharded_xattention

ROOT = pathlib.Path(__file__).parent.parent


MESHES = [(1, 4), (2, 2), (4, 1)]  # data x tensor


def test_sharded_equals_unsharded_on_four_devices():
  env = dict(
    os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"
  )
  proc = subprocess.run(
    [sys.executable, str(ROOT / "tests" / "multidevice_check.py"), *(f"{d}x{t}" for d, t in MESHES)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for data, tensor in MESHES:
    assert f"mesh ({data}, {tensor}): sharded == unsharded" in proc.stdout


def test_needs_a_mesh_and_known_axes():
  q, k, v = random_qkv(0, B=1, T=32, S=32, N=2, K=1, H=8)
  with pytest.raises(ValueError, match="needs a mesh"):
    sharded_xattention(q, k, v)
  with pytest.raises(ValueError, match="needs a mesh"):
    sharded_dense_attention(q, k, v)
  mesh = jax.make_mesh((1,), ("x",))
  with pytest.raises(ValueError, match="mesh axis 'data' is not one of"):
    sharded_xattention(q, k, v, mesh=mesh)
  out = sharded_xattention(
    q, k, v, mesh=mesh, batch_axis=None, head_axis="x", is_causal=True, threshold=1.0, block_size=16, stride=4
  )
  assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))
