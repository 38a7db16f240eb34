"""Shared test helpers: every op under test runs through `run_checked` (checkify with all checks)."""

from __future__ import annotations

import os

# The Mosaic GPU interpreter simulates warpgroups and TMA engines as threads that block on each other; with XLA's
# default CPU thread pool on a 2-core machine a kernel with several pipeline stages can deadlock (seen with the
# scoring kernel: 0% CPU, no progress). More host devices give XLA more threads. Set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import hypothesis  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import checkify  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=12, deadline=None, print_blob=True, derandomize=True)
hypothesis.settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerances per input dtype, for outputs computed in float32 and cast back to the input dtype.
OUT_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _is_array_tree(x) -> bool:
  leaves = jax.tree_util.tree_leaves(x)
  return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


def run_checked(fn, *args, **kwargs):
  """Runs fn(*args, **kwargs) jitted under checkify.all_checks and raises any error it finds.

  Array arguments (and pytrees of arrays such as a BlockLayout) are traced, so value checks on them run as
  checkify checks inside the computation; everything else is static.
  """
  static = {name: value for name, value in kwargs.items() if not _is_array_tree(value)}
  dynamic = {name: value for name, value in kwargs.items() if _is_array_tree(value)}

  def call(args, dynamic):
    return fn(*args, **dynamic, **static)

  err, out = jax.jit(checkify.checkify(call, errors=checkify.all_checks))(args, dynamic)
  err.throw()
  return out


def checked_jit(fn):
  """fn jitted once under checkify.all_checks (all arguments traced); each call raises any error found."""
  jitted = jax.jit(checkify.checkify(fn, errors=checkify.all_checks))

  def call(*args):
    err, out = jitted(*args)
    err.throw()
    return out

  return call


def random_qkv(seed, *, B, T, S, N, K, H, dtype=jnp.float32, scale_q=1.0):
  """Fresh random q [B,T,N,H], k/v [B,S,K,H] (never zeros)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)) * scale_q, dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  return q, k, v


def lengths_pair(seed, *, B, T, S, causal=True):
  """Random (q_lens, kv_lens) int32 [B] with q_b <= k_b, q_b <= T, k_b <= S."""
  rng = np.random.default_rng(seed)
  kv = rng.integers(1, S + 1, size=B)
  q = np.minimum(rng.integers(1, T + 1, size=B), kv)
  return jnp.asarray(q, jnp.int32), jnp.asarray(kv, jnp.int32)


@pytest.fixture
def checked():
  return run_checked


def assert_max_normalized_close(got, want, tol: float, what: str) -> None:
  """max |got - want| / max |want| <= tol, and no NaN (gradient checks: errors relative to the largest entry)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert not np.isnan(got).any(), f"{what}: NaN"
  err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
  assert err <= tol, f"{what}: max error {err:.2e} of the largest entry > {tol:.0e}"


def random_cotangents(seed, out, lse):
  """Fresh random (d_out, d_lse) cotangents shaped like the forward's (out, lse)."""
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal(out.shape), out.dtype),
    jnp.asarray(rng.standard_normal(lse.shape), jnp.float32),
  )
