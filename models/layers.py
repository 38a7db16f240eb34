"""Layers: RMSNorm, rotary embeddings (plain and llama3-scaled), the SwiGLU MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xattn_jax.models.config import RopeScaling


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as Llama and Qwen2 do)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """inv_freq [H/2] (float64 NumPy, a constant of the model), with Llama 3.1's "llama3" scaling if given."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv_freq
  old = scaling.original_max_position_embeddings
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE (Hugging Face layout). x [B, T, heads, H], positions int [B, T]."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def over_token_chunks(fn, x: jax.Array, chunk_tokens: int | None) -> jax.Array:
  """fn(x) for a position-wise fn ([rows, D] -> [rows, D']), run on `chunk_tokens` rows (tokens) at a time so that
  fn's intermediates stay one chunk's size; rows are independent, so chunking changes no value.

  The loop's buffer is the input itself, not a zero-filled output: XLA's GPU compiler fuses the zero fills of every
  layer into one kernel at the start of the program and so held one [T, D] buffer per layer to the end (8 KB per
  token per layer in an 8B model). Each step reads its rows with a dynamic slice and writes fn's rows over them; a
  fn that starts with an elementwise op or a row reduction (a norm) can read the slice inside its fusion. Under
  reverse mode each step keeps one chunk's residuals. When chunking, fn's rows are written over its input's."""
  rows, D = math.prod(x.shape[:-1]), x.shape[-1]
  c = chunk_tokens
  if c is None or rows <= c:
    return fn(x)
  n = rows // c
  out_dtype = jax.eval_shape(fn, jax.ShapeDtypeStruct((c, D), x.dtype)).dtype

  def chunk(i, buf):  # rows [i c, (i + 1) c) still hold the input: read them, then write fn's rows over them
    start = i * c
    return jax.lax.dynamic_update_slice_in_dim(buf, fn(jax.lax.dynamic_slice_in_dim(buf, start, c)), start, axis=0)

  out = jax.lax.fori_loop(0, n, chunk, x.reshape(rows, D).astype(out_dtype))
  if rows % c:
    out = jax.lax.dynamic_update_slice_in_dim(out, fn(out[n * c :]), n * c, axis=0)
  return out.reshape(x.shape[:-1] + (out.shape[-1],))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), over chunks of `chunk_tokens` tokens so that the [tokens, F]
  intermediates of a long prompt stay one chunk's size (`over_token_chunks`)."""

  def __init__(
    self, d_model: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, chunk_tokens: int | None = None
  ):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = linear(d_model, mlp_dim)
    self.up = linear(d_model, mlp_dim)
    self.down = linear(mlp_dim, d_model)
    self.chunk_tokens = chunk_tokens

  def _mlp(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
    return over_token_chunks(self._mlp, x, self.chunk_tokens)
