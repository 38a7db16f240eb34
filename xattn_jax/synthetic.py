"""LLM-like synthetic attention inputs, for demos and benchmarks when no model is at hand.

Real prefill attention has three visible structures (the XAttention paper's Fig. 1): attention sinks (the first
tokens take mass from every query), a local band (recent tokens), and vertical stripes (a few keys that many
queries read). This generator builds each from a known direction per kv head:

- band: q and k share a random direction d, rotated by RoPE at their positions; <R(t) d, R(j) d> is a sum of
  cos((t - j) theta_f), largest near t = j, so mass concentrates on a diagonal band;
- sink and stripes: after RoPE every query gets a component along a second direction w, the first `sink_tokens`
  keys and `num_stripes` random keys per head get a larger one; their logits rise for every query.
Everything else is Gaussian noise, so the selection has real work to do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotate-half RoPE. x [B, T, heads, H], positions [T]."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[:, None].astype(jnp.float32) * freqs  # [T, H/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llm_like_qkv(
  key: jax.Array,
  *,
  batch: int = 1,
  seq_len: int,
  num_heads: int,
  num_kv_heads: int,
  head_dim: int,
  dtype=jnp.bfloat16,
  sink_tokens: int = 4,
  num_stripes: int = 16,
  band_strength: float = 10.0,
  sink_strength: float = 14.0,
  stripe_strength: float = 10.0,
  noise: float = 0.5,
  band_pairs: int | None = None,
):
  """Returns q [B, T, N, H], k, v [B, T, K, H] with sinks, a local band and vertical stripes (see module doc).

  The strengths are logit offsets (after the 1/sqrt(H) scale) over Gaussian noise logits of std noise^2: at 4K-16K
  tokens the defaults give about a third of the causal blocks at tau = 0.9.
  """
  B, T, N, K, H = batch, seq_len, num_heads, num_kv_heads, head_dim
  G = N // K
  keys = jax.random.split(key, 7)
  # Directions of norm H^(1/4): a product of two of them is sqrt(H), i.e. 1 after the 1/sqrt(H) logit scale.
  unit = lambda k, shape: (x := jax.random.normal(k, shape)) / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # Band direction per kv head on the `band_pairs` fastest-rotating RoPE pairs (pair f holds dims f and f + H/2,
  # frequency theta^(-2f/H)); default all. Few pairs do not give a narrower band: a sum of few cosines does not
  # decay, it fluctuates (measured: 8 pairs -> 89% density at tau 0.9, all 64 -> 37-42%).
  fast = (jnp.arange(H) % (H // 2)) < (H // 2 if band_pairs is None else band_pairs)
  d = unit(keys[0], (K, H)) * fast
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True) * H**0.25
  w = unit(keys[1], (K, H)) * H**0.25  # sink / stripe direction per kv head
  pos = jnp.arange(T)
  qn = noise * jax.random.normal(keys[2], (B, T, N, H))  # noise logits have std noise^2
  kn = noise * jax.random.normal(keys[3], (B, T, K, H))
  q = rope(qn + band_strength**0.5 * jnp.repeat(d, G, axis=0), pos)
  k = rope(kn + band_strength**0.5 * d, pos)
  stripes = jax.random.randint(keys[4], (K, num_stripes), 0, T)
  marked = (pos[:, None, None] == stripes[None]).any(-1)  # [T, K]
  boost = jnp.where(pos[:, None] < sink_tokens, sink_strength, jnp.where(marked, stripe_strength, 0.0))
  k = k + boost[None, :, :, None] * w
  q = q + jnp.repeat(w, G, axis=0)
  v = jax.random.normal(keys[5], (B, T, K, H))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)
