"""What the Mosaic GPU forward and backward kernels do alike to a score tile in registers."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def mask_scores(s, *, first_key, first_query_position, kv_len, causal: bool):
  """A [rows, keys] f32 tile in the WGMMA layout with -inf where the key is padding (at or past kv_len) or, causal,
  after the query: row i is the query at position first_query_position + i, column j the key first_key + j."""
  rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
  keys = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA) + first_key
  ok = keys < kv_len
  if causal:
    ok &= keys <= rows + first_query_position
  return jnp.where(ok, s, -jnp.inf)
