"""Helpers every kernel file shares: token padding to whole blocks, the on-chip memory budgets and their check."""

from __future__ import annotations

import jax
import jax.numpy as jnp

SM90_SMEM_BYTES = 227 * 1024  # shared memory per CTA on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)


def pad_tokens(x: jax.Array, length: int) -> jax.Array:
  """x [B, T, heads, H] padded with zeros to `length` tokens (DMAs and TMAs move whole blocks; the padding lies past
  every length, so the kernels mask it)."""
  return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def check_budget(kernel: str, memory: str, needed: int, budget: int) -> None:
  """NotImplementedError (the dispatcher then tries the next backend) when a kernel's on-chip memory does not fit.
  A raise, not an assert: asserts vanish under `python -O`."""
  if needed > budget:
    raise NotImplementedError(f"{kernel} needs {needed} B of {memory} > the budget of {budget} B")
