"""The decoder-only transformer, with a fixed-size KV cache for prefill (one shot or chunked) and decode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from xattn_jax.models.config import ModelConfig
from xattn_jax.sharding import current_mesh
from xattn_jax.models.layers import RMSNorm
from xattn_jax.models.modules import Block, LayerCache, threshold_vector


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  layers: tuple[LayerCache, ...]
  lengths: jax.Array  # int32 [B]: tokens written per batch element

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]


class Transformer(nnx.Module):
  """Llama-family decoder. Calling it on int32 tokens [B, T] returns logits [B, T, V] (positions 0..T-1)."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embedder = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List(
      [Block(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for i in range(config.num_layers)]
    )
    self.final_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = (
      None
      if config.tie_embeddings
      else nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
      )
    )

  def set_thresholds(self, thresholds=None) -> None:
    """Sets the XAttention thresholds of every XAttention layer in place (no recompilation: they are state).

    thresholds: None (back to the config's), a float (every head of every layer), or per layer [L] / [L, N] (a
    float or one value per query head each, e.g. a calibration table); entries of dense layers are ignored.
    """
    L, N = self.config.num_layers, self.config.num_heads
    if thresholds is not None and not isinstance(thresholds, (int, float)):
      thresholds = list(thresholds)
      if len(thresholds) != L:
        raise ValueError(f"thresholds have {len(thresholds)} layers; the model has {L}")
    for i, block in enumerate(self.layers):
      attn = block.attn
      if attn.threshold is None:
        continue
      if thresholds is None:
        value = self.config.attention.for_layer(i).threshold
      elif isinstance(thresholds, (int, float)):
        value = thresholds
      else:
        value = thresholds[i]
      try:
        attn.threshold.set_value(threshold_vector(value, N))
      except ValueError as e:
        raise ValueError(f"thresholds[{i}]: {e}") from None

  def with_attention(self, attention) -> "Transformer":
    """The same weights (shared, not copied) under another `AttentionConfig`, thresholds from that config."""
    config = self.config.with_attention(attention)
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=self.dtype, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    _, params, _ = nnx.split(self, nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest)
    model.set_thresholds()
    return model

  def thresholds(self) -> list:
    """The current thresholds, float32 [N] per XAttention layer and None per dense layer."""
    return [None if b.attn.threshold is None else b.attn.threshold.get_value() for b in self.layers]

  def _logits(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    if self.lm_head is None:
      return self.embedder.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def _run(self, tokens, *, positions, q_lengths, cache, offsets, self_attention):
    h = self.embedder(tokens)
    mesh = current_mesh()
    seq = self.config.attention.seq_axis
    if mesh is not None and seq in mesh.axis_names and mesh.shape[seq] > 1 and tokens.shape[1] > 1:
      # Sequence parallelism: every layer's activations split along the prompt's tokens.
      batch = self.config.attention.batch_axis
      h = jax.lax.with_sharding_constraint(h, P(batch if batch in mesh.axis_names else None, seq, None))
    layers, densities = [], []
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else cache.layers[i]
      h, layer_cache, density = block(
        h, positions=positions, q_lengths=q_lengths, cache=layer_cache, offsets=offsets, self_attention=self_attention
      )
      layers.append(layer_cache)
      densities.append(density)
    return h, (None if cache is None else tuple(layers)), jnp.stack(densities)

  def __call__(self, tokens: jax.Array, *, lengths: jax.Array | None = None) -> jax.Array:
    """Full forward without a cache. tokens int32 [B, T] -> logits float32 [B, T, V]."""
    B, T = tokens.shape
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, _, _ = self._run(tokens, positions=positions, q_lengths=lengths, cache=None, offsets=None, self_attention=True)
    return self._logits(h)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    c = self.config
    shape = (batch, max_len, c.num_kv_heads, c.head_dim)
    dtype = dtype or self.dtype
    return KVCache(
      tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers)),
      jnp.zeros((batch,), jnp.int32),
    )

  def _last_logits(self, h, last_index):
    last = jnp.take_along_axis(h, jnp.maximum(last_index, 0)[:, None, None], axis=1)[:, 0]
    return self._logits(last)

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
    """A prompt from position 0, right padded: tokens [B, T], lengths [B] (T <= cache.max_len).

    Returns (logits of each prompt's last token [B, V], the cache holding the prompts, per-layer density [L]).
    """
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, layers, densities = self._run(
      tokens,
      positions=positions,
      q_lengths=lengths,
      cache=cache,
      offsets=jnp.zeros((B,), jnp.int32),
      self_attention=True,
    )
    return self._last_logits(h, lengths - 1), KVCache(layers, lengths.astype(jnp.int32)), densities

  def extend(self, tokens: jax.Array, lengths: jax.Array, cache: KVCache):
    """The next chunk of each prompt, attending to the cache and itself: tokens [B, C] starting at cache.lengths,
    lengths [B] real tokens of the chunk (0 for a finished prompt). Returns like `prefill`."""
    B, C = tokens.shape
    offsets = cache.lengths
    positions = offsets[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    h, layers, densities = self._run(
      tokens, positions=positions, q_lengths=lengths, cache=cache, offsets=offsets, self_attention=False
    )
    return self._last_logits(h, lengths - 1), KVCache(layers, offsets + lengths), densities

  def decode(self, tokens: jax.Array, cache: KVCache):
    """One token per sequence: tokens [B] at position cache.lengths. Returns (logits [B, V], cache)."""
    B = tokens.shape[0]
    logits, cache, _ = self.extend(tokens[:, None], jnp.ones((B,), jnp.int32), cache)
    return logits, cache
