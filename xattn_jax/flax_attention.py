"""Flax adapter: XAttention as the `attention_fn` of `flax.nnx.MultiHeadAttention` and of
`flax.linen.MultiHeadDotProductAttention` (or any module with that hook).

    # NNX: nnx.MultiHeadAttention forwards its `is_causal` call argument
    attn = nnx.MultiHeadAttention(num_heads=32, in_features=4096, decode=False, rngs=rngs,
                                  attention_fn=xattn_jax.attention_fn(XAttentionConfig(threshold=0.9)))
    y = attn(x, is_causal=True)

    # Linen: MultiHeadDotProductAttention passes no is_causal, so fix it in the adapter
    attn = nn.MultiHeadDotProductAttention(num_heads=32, attention_fn=xattn_jax.attention_fn(is_causal=True))
    y = attn.apply(params, x)

Flax passes a dense `mask` when you give one (and builds one itself in decode mode); XAttention cannot honour it and
raises NotImplementedError, so leave the mask out and let `is_causal` and the seq lengths say what is masked.
"""

from __future__ import annotations

from collections.abc import Callable

from xattn_jax.config import XAttentionConfig
from xattn_jax.ops import xattention


def attention_fn(config: XAttentionConfig | None = None, *, is_causal: bool | None = None, **overrides) -> Callable:
  """An `attention_fn(query, key, value, bias=None, mask=None, **flax_kwargs)` computing XAttention.

  Args:
    config: the XAttention knobs; default `XAttentionConfig()`.
    is_causal: None follows the `is_causal` the module passes (nnx.MultiHeadAttention forwards its call argument);
      True or False forces it.
    **overrides: further fixed keyword arguments of `xattention` (e.g. query_seq_lengths, interpret).
  """
  config = XAttentionConfig() if config is None else config
  if not isinstance(config, XAttentionConfig):
    raise ValueError(f"config must be an XAttentionConfig, got {type(config).__name__}")
  if is_causal is not None and not isinstance(is_causal, bool):
    raise ValueError(f"{is_causal=} must be None or a bool")
  forced_causal = is_causal

  # The Flax keywords are named (not only swallowed by **kwargs): Linen passes an attention_fn only the keywords
  # its signature names, and dropout must reach xattention to be refused rather than silently dropped.
  def fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    is_causal: bool = False,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    input_positions=None,
    **unused,
  ):
    if input_positions is not None:
      raise NotImplementedError("xattention takes positions from the seq lengths, not input_positions")
    return xattention(
      query,
      key,
      value,
      bias,
      mask,
      is_causal=is_causal if forced_causal is None else forced_causal,
      threshold=config.threshold,
      stride=config.stride,
      block_size=config.block_size,
      keep_sink=config.keep_sink,
      keep_diagonal=config.keep_diagonal,
      keep_top_neighbors=config.keep_top_neighbors,
      query_chunk_size=config.query_chunk_size,
      estimator=config.estimator,
      implementation=config.implementation,
      dropout_rng=dropout_rng,
      dropout_rate=dropout_rate,
      broadcast_dropout=broadcast_dropout,
      deterministic=deterministic,
      dtype=dtype,
      precision=precision,
      module=module,
      **overrides,
      **unused,
    )

  return fn
