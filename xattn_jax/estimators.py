"""Which query token meets which key token inside each s x s cell of the strided estimator (SPEC §1.1, §1.7).

Every estimator computes Z[i, j] = sum_u <q[i*s + o_i(u)], k[j*s + u]> with one permutation o_i of the cell's s query
offsets per strided query row i, so Z is still one matmul of strided views (Qr [i] = q[i*s + o_i(0)] | ... |
q[i*s + o_i(s-1)], Kr a free reshape of k). The cell pairs query offset o_i(u) with key offset u, i.e. the token
distance (i - j) * s + o_i(u) - u.

- ANTIDIAGONAL (the paper's): o(u) = s-1-u for every row, the cell's antidiagonal. Its in-cell distances s-1-2u are
  all odd when s is even, so attention at an even distance (512, 2, ...) is never sampled.
- ALTERNATING: even rows as the paper; odd rows o(u) = (s - u) mod s, the cell's next antidiagonal (offset pairs
  summing to s, wrapped at u = 0), whose in-cell distances 0, s-2, s-4, ..., 2-s are all even. Between them the
  two phases sample every distance, at the same cost (a different fixed gather of the same query tokens).

Why two phases are needed: one permutation o samples all s residues of the distance modulo s only if u -> o(u) - u
is a bijection of Z_s (an orthomorphism), and cyclic groups of even order have none (Hall and Paige), so with an
even stride some distance residue is always missed by a single per-row pattern.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from jax import lax


class Estimator(str, enum.Enum):
  ANTIDIAGONAL = "antidiagonal"
  ALTERNATING = "alternating"


def check_estimator(estimator, *, stride: int, block_size: int) -> Estimator:
  """An `Estimator` (or its string value), else ValueError naming the argument.

  ALTERNATING needs an even number of strided rows per block (block_size / stride), so that the row parity is the
  same whether rows are counted from the query's start or from any block-aligned chunk of it (SPEC §1.6).
  """
  try:
    estimator = Estimator(estimator)
  except ValueError:
    raise ValueError(f"estimator={estimator!r} must be one of {[e.value for e in Estimator]}") from None
  if estimator is Estimator.ALTERNATING and (block_size // stride) % 2:
    raise ValueError(f"estimator='alternating' needs an even block_size / stride, got {block_size=}, {stride=}")
  return estimator


def arrange_query_groups(x: jax.Array, estimator: Estimator, *, row_axis: int, slot_axis: int) -> jax.Array:
  """x holds the s tokens of each strided query row i along `slot_axis` in token order (x[..., i, t, ...] =
  q[i*s + t]); returns them in Qr order (slot u holds q[i*s + o_i(u)]). `row_axis` counts strided rows from the
  query chunk's first token (the parity of i selects the phase). One elementwise select: XLA fuses it into the copy
  that builds the strided view."""
  reversed_ = jnp.flip(x, slot_axis)  # slot u = offset s-1-u
  if estimator is Estimator.ANTIDIAGONAL:
    return reversed_
  shifted = jnp.roll(reversed_, 1, axis=slot_axis)  # slot u = offset (s-u) mod s
  odd = lax.broadcasted_iota(jnp.int32, x.shape, row_axis % x.ndim) % 2 == 1
  return jnp.where(odd, shifted, reversed_)
