"""Helpers every kernel file shares: token padding to whole blocks, the on-chip memory budgets and their check."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

SM90_SMEM_BYTES = 227 * 1024  # shared memory per CTA on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SUPPORTED_HEAD_DIMS = (64, 128)  # what every kernel takes; others fall through to the next backend
NT = (((1,), (1,)), ((), ()))  # dot_general dimension numbers of a @ b^T (contract the last dims)
# Rows of a TMA swizzle tile: a gmem array that TMA reads through a swizzled box needs a row count that is a multiple
# of it (the cuda lowering refuses others). Boxes that run past the last row read zeros (Mosaic GPU's default
# OOBFillMode.ZEROS in jax 0.11.2 and 0.12; the interpreter does the same).
TMA_TILE_ROWS = 8


class Operand(str, enum.Enum):
  """Where a wgmma's register-side operand (P, dS) comes from: registers (the GPU's fast path) or staged through
  SMEM (what the CPU interpreter's wgmma takes). A str enum: "smem" and Operand.SMEM are equal."""

  REGISTERS = "registers"
  SMEM = "smem"


class TileOrder(str, enum.Enum):
  """The persistent grid's walk over the forward kernel's tiles (see block_sparse_attention_mosaic_gpu)."""

  ROWS = "rows"
  HEAD = "head"
  KV_HEAD = "kv_head"


class TileScheduler(str, enum.Enum):
  """How a persistent kernel's CTA gets its next tile: a GMEM atomic counter (dynamic) or a static snake."""

  COUNTER = "counter"
  SNAKE = "snake"


def as_enum(cls: type[enum.Enum], value, name: str):
  """value (a member or its string) as a member of cls; ValueError naming the field and the choices."""
  try:
    return cls(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} must be one of {[m.value for m in cls]}") from None


def pad_tokens(x: jax.Array, length: int) -> jax.Array:
  """x [B, T, heads, H] padded with zeros to `length` tokens (DMAs and TMAs move whole blocks; the padding lies past
  every length, so the kernels mask it)."""
  return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def pad_tokens_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
  """x [B, T, heads, H] padded with zeros to the next multiple of `multiple` tokens (no copy when T is one)."""
  return pad_tokens(x, -(-x.shape[1] // multiple) * multiple)


def check_budget(kernel: str, memory: str, needed: int, budget: int) -> None:
  """NotImplementedError (the dispatcher then tries the next backend) when a kernel's on-chip memory does not fit.
  A raise, not an assert: asserts vanish under `python -O`."""
  if needed > budget:
    raise NotImplementedError(f"{kernel} needs {needed} B of {memory} > the budget of {budget} B")
