"""Modules: the attention block (GQA, RoPE, optional q/k/v biases, dense or XAttention per layer, KV cache writes)
and the decoder block."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xattn_jax
from xattn_jax.sharding import current_mesh, sharded_dense_attention, sharded_xattention
from xattn_jax.models.config import ModelConfig
from xattn_jax.models.layers import MLP, RMSNorm, apply_rope, over_token_chunks, rope_frequencies


def threshold_vector(threshold, num_heads: int) -> jax.Array:
  """A threshold (float, or one value per query head) as float32 [num_heads]; ValueError names what is wrong."""
  if isinstance(threshold, jax.core.Tracer):
    value = threshold.astype(jnp.float32)
  else:
    value = np.asarray(threshold, np.float32)
    if not np.all(np.isfinite(value) & (value >= 0)):
      raise ValueError(f"thresholds must be finite and >= 0, got {threshold}")
  if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != num_heads):
    raise ValueError(f"threshold of shape {value.shape} must be a float or have one value per query head ({num_heads})")
  return jnp.broadcast_to(jnp.asarray(value), (num_heads,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's keys and values, fixed size."""

  k: jax.Array  # [B, S_max, K, H]
  v: jax.Array  # [B, S_max, K, H]


def _write(cache: jax.Array, new: jax.Array, offsets: jax.Array, *, scatter: bool) -> jax.Array:
  """cache [B, S, K, H] with new [B, T, K, H] written at rows [offsets[b], offsets[b] + T) of each batch element
  (in bounds: the Generator sizes the cache so).

  `scatter=False` (a prompt or a later chunk on one device): one dynamic_update_slice of T rows per sequence, in a
  loop over the batch, which XLA writes in place at copy speed. A scatter of the B * T rows took 1.27 ms per layer
  for K alone at 128K on an H100 (8B shape, 256 MiB: ~7x the copy), 80 ms of each 128K prefill for K and V
  (notes_model_prefill.md v12). `scatter=True` (decode steps, meshes): one scatter, B rows in one kernel where a loop
  would launch one per sequence, and XLA partitions it along the cache's batch and position splits."""
  B, T = new.shape[:2]
  new = new.astype(cache.dtype)
  if scatter:
    rows = offsets[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    return cache.at[jnp.arange(B)[:, None], rows].set(new, mode="promise_in_bounds")
  zero, offsets = jnp.zeros((), jnp.int32), offsets.astype(jnp.int32)

  def one(b, c):
    b = jnp.asarray(b, jnp.int32)
    return jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice_in_dim(new, b, 1), (b, offsets[b], zero, zero))

  return jax.lax.fori_loop(0, B, one, cache)


class XAttentionThreshold(nnx.Variable):
  """One layer's XAttention thresholds, float32 [query heads]. Model state, not a parameter: no gradient, optimizers
  skip it, and new values (`Transformer.set_thresholds`, a calibration) reuse the compiled prefill."""


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    D, N, K, H = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    linear = lambda i, o, bias: nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(D, N * H, config.qkv_bias)
    self.k_proj = linear(D, K * H, config.qkv_bias)
    self.v_proj = linear(D, K * H, config.qkv_bias)
    self.o_proj = linear(N * H, D, False)
    self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
    self.rope = (H, config.rope_theta, config.rope_scaling)  # static; frequencies are built at trace time
    xattention = config.attention.for_layer(layer)  # None: dense
    # The static part of the layer's config; its threshold lives in self.threshold (traced), so that models that
    # differ only in their thresholds share one graph definition and one compilation.
    self.xattention = None if xattention is None else dataclasses.replace(xattention, threshold=1.0)
    self.threshold = None if xattention is None else XAttentionThreshold(threshold_vector(xattention.threshold, N))
    self.mesh_axes = (config.attention.batch_axis, config.attention.head_axis, config.attention.seq_axis)
    self.dense_implementation = config.attention.dense_implementation

  def __call__(
    self,
    x: jax.Array,  # [B, T, D]
    *,
    positions: jax.Array,  # int32 [B, T]
    q_lengths: jax.Array,  # int32 [B]: real tokens of x
    cache: LayerCache | None = None,
    offsets: jax.Array | None = None,  # int32 [B]: where x's keys go in the cache (positions[:, 0])
    self_attention: bool = True,
  ) -> tuple[jax.Array, LayerCache | None, jax.Array]:
    """Attention of x to itself (a prompt from position 0) or to the cache (a later chunk, a decode step).

    Returns (out [B, T, D], the cache with x's keys and values written, density of the selected blocks, -1 when
    the layer attended densely).
    """
    B, T, _ = x.shape
    q, k, v = self.project(x, positions)
    if cache is not None:
      scatter = T == 1 or current_mesh() is not None
      cache = LayerCache(_write(cache.k, k, offsets, scatter=scatter), _write(cache.v, v, offsets, scatter=scatter))
      # The writes are sinks nothing reads before the program ends, and XLA's GPU scheduler may defer them: in an
      # XAttention prefill on the H200 it put every layer's cache writes after the last layer's attention, holding
      # each layer's k and v to the end (4 KB per token per layer in an 8B model; 16 GiB at 128K). The barrier
      # makes them happen before this layer's attention.
      k, v, cache = jax.lax.optimization_barrier((k, v, cache))
    if self_attention:  # T == S, query t at position t
      keys, values, kv_lengths = k, v, q_lengths
    else:  # everything in the cache up to and including x
      keys, values, kv_lengths = cache.k, cache.v, offsets + q_lengths
    out, density = self._attend(
      q, keys.astype(q.dtype), values.astype(q.dtype), q_lengths, kv_lengths, self_attention=self_attention
    )
    return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim)), cache, density

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> q [B, T, N, H], k and v [B, T, K, H], q and k rotated to `positions`."""
    B, T, _ = x.shape
    N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
    inv_freq = rope_frequencies(*self.rope)
    q = apply_rope(self.q_proj(x).reshape(B, T, N, H), positions, inv_freq)
    k = apply_rope(self.k_proj(x).reshape(B, T, K, H), positions, inv_freq)
    return q, k, self.v_proj(x).reshape(B, T, K, H)

  def _axes(self, mesh) -> dict:
    """The mesh axes attention is split over (those `mesh` has; seq only where it has more than one device)."""
    has = lambda a: a if a in mesh.axis_names else None
    batch, head, seq = (has(a) for a in self.mesh_axes)
    return dict(batch_axis=batch, head_axis=head, seq_axis=seq if seq and mesh.shape[seq] > 1 else None)

  def _attend(self, q, k, v, q_lengths, kv_lengths, *, self_attention: bool):
    T = q.shape[1]
    if self.xattention is not None and T > 1:
      cfg = self.xattention
      kw = dict(
        is_causal=True,
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
        threshold=self.threshold.get_value(),
        stride=cfg.stride,
        block_size=cfg.block_size,
        keep_sink=cfg.keep_sink,
        keep_diagonal=cfg.keep_diagonal,
        keep_top_neighbors=cfg.keep_top_neighbors,
        query_chunk_size=cfg.query_chunk_size,
        implementation=cfg.implementation,
        estimator=cfg.estimator,
        return_block_layout="counts",  # the density alone: no [B, N, T/blk, S/blk] index table, by construction
      )
      mesh = current_mesh()
      if mesh is None:
        out, layout = xattn_jax.xattention(q, k, v, **kw)
      else:  # per device, over its batch elements, heads and (sequence-parallel) query chunks
        out, layout = sharded_xattention(q, k, v, mesh=mesh, **self._axes(mesh), **kw)
      return out, layout.density()
    # Dense: prefill (self-attention: one lengths array for queries and keys, which lets cuDNN serve), a later
    # chunk (query t at position kv_len - q_len + t) or a decode step; O(T) memory on every platform.
    implementation = self.dense_implementation
    if T == 1 or (implementation == "cudnn" and not self_attention):
      implementation = None  # decode steps take the one-pass route; cuDNN cannot place a later chunk's queries
    kw = dict(
      is_causal=True,
      query_seq_lengths=q_lengths,
      key_value_seq_lengths=q_lengths if self_attention else kv_lengths,
      implementation=implementation,
    )
    mesh = current_mesh()
    if mesh is None or T == 1:  # a decode step is plain XLA: partitioned as the cache is (positions over "seq")
      out = xattn_jax.dense_attention(q, k, v, **kw)
    else:
      out = sharded_dense_attention(q, k, v, mesh=mesh, **self._axes(mesh), **kw)
    return out, jnp.float32(-1.0)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.attn = Attention(config, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(
      config.d_model,
      config.mlp_dim,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      chunk_tokens=config.mlp_chunk_tokens,
    )

  def __call__(self, x, **attn_kwargs):
    attn_out, cache, density = self.attn(self.attn_norm(x), **attn_kwargs)
    x = x + attn_out
    # The norm and the residual inside the MLP's token chunks: each chunk's norm reads its rows of x through the
    # slice, so neither a normalized [T, D] copy of x nor a copy of each chunk's rows for the GEMMs is needed, and
    # the sum is written over those rows.
    mlp = lambda h: h + self.mlp(self.mlp_norm(h))
    return over_token_chunks(mlp, x, self.mlp.chunk_tokens), cache, density
