"""Model configs: the Llama family (Llama 2/3/3.1, SmolLM2, Qwen2), and the attention choice per layer.

Einsum legend everywhere in `models/`: B batch, T query length, S key length, N query heads, K kv heads, H head dim,
D model dim, F MLP hidden dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from xattn_jax import XAttentionConfig
from xattn_jax.backends import available as available_backends


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama 3.1 "llama3" RoPE scaling (Hugging Face rope_scaling with rope_type "llama3")."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if not (self.factor >= 1 and self.high_freq_factor > self.low_freq_factor > 0):
      raise ValueError(f"invalid llama3 rope scaling {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """Which attention each layer runs.

  Attributes:
    kind: "dense" (jax.nn.dot_product_attention) or "xattention".
    xattention: the XAttention knobs (stride, block size, threshold, keep_sink, implementation).
    layer_thresholds: optional per-layer thresholds, one entry per layer, each a float or a per-head tuple
      (overrides xattention.threshold; e.g. from calibration).
    dense_layers: the first n layers stay dense (the reference does this for video models).
    dense_implementation: `xattn_jax.dense_attention`'s implementation for dense layers, decode steps and dense
      models (prefill, chunked prefill, training): None lets `xattn_jax.dense_route` pick an O(T)-memory route for
      the platform (cuDNN flash attention, the block-sparse kernels with every block, or XLA's logits when they are
      small); "cudnn" (self-attention; later chunks and decode steps keep the automatic route), or backend name(s)
      of the block-sparse op ("xla", "pallas_mosaic_gpu", "pallas_tpu"; decode steps keep the one-pass route).
    batch_axis, head_axis, seq_axis: mesh axes attention is shard_mapped over when a mesh is set (`jax.set_mesh`):
      batch, heads, and the tokens of a prompt (sequence parallelism); axes the mesh lacks are ignored.
  """

  kind: str = "dense"
  xattention: XAttentionConfig = XAttentionConfig()
  layer_thresholds: tuple | None = None
  dense_layers: int = 0
  dense_implementation: str | tuple[str, ...] | None = None
  batch_axis: str | None = "data"  # under jax.set_mesh(mesh): XAttention runs per device over these mesh axes
  head_axis: str | None = "tensor"
  seq_axis: str | None = "seq"

  def __post_init__(self):
    if self.kind not in ("dense", "xattention"):
      raise ValueError(f"attention kind={self.kind!r} must be 'dense' or 'xattention'")
    names = (self.dense_implementation,) if isinstance(self.dense_implementation, str) else self.dense_implementation
    choices = ("cudnn",) + available_backends()
    if names is not None and (
      not isinstance(names, (tuple, list))
      or not names
      or any(n not in choices for n in names)
      or ("cudnn" in names and len(names) > 1)
    ):
      raise ValueError(
        f"dense_implementation={self.dense_implementation!r} must be None, 'cudnn', or one or more "
        f"of {available_backends()}"
      )
    if isinstance(names, list):
      object.__setattr__(self, "dense_implementation", tuple(names))
    if self.dense_layers < 0:
      raise ValueError(f"dense_layers={self.dense_layers} must be >= 0")
    if self.layer_thresholds is not None:
      object.__setattr__(
        self,
        "layer_thresholds",
        tuple(tuple(float(x) for x in t) if isinstance(t, (list, tuple)) else float(t) for t in self.layer_thresholds),
      )

  def for_layer(self, layer: int) -> XAttentionConfig | None:
    """The XAttention config of `layer`, or None where the layer is dense."""
    if self.kind == "dense" or layer < self.dense_layers:
      return None
    if self.layer_thresholds is None:
      return self.xattention
    if layer >= len(self.layer_thresholds):
      raise ValueError(f"layer_thresholds has {len(self.layer_thresholds)} entries; layer {layer} has none")
    return dataclasses.replace(self.xattention, threshold=self.layer_thresholds[layer])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder-only Llama-family transformer."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  max_seq_len: int = 8192
  attention: AttentionConfig = AttentionConfig()
  # The MLP runs over chunks of this many tokens (batch x time): its [tokens, F] intermediates are the largest
  # activations of a long prefill (3 x 3.5 GiB at 128K tokens for Llama-3.1-8B in bf16). None: one chunk.
  mlp_chunk_tokens: int | None = 8192

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
      "max_seq_len",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.mlp_chunk_tokens is not None and self.mlp_chunk_tokens <= 0:
      raise ValueError(f"mlp_chunk_tokens={self.mlp_chunk_tokens} must be positive or None")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")

  def with_attention(self, attention: AttentionConfig) -> ModelConfig:
    return dataclasses.replace(self, attention=attention)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, source: object = "config.json", **overrides) -> ModelConfig:
    """From a Hugging Face config.json dict (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM without a
    sliding window), transformers 4 or 5 style (v5 writes RoPE settings as `rope_parameters`).

    Raises:
      NotImplementedError: an architecture or feature this model does not implement.
      ValueError: a missing or inconsistent key.
    """
    hf = dict(hf)
    arch = (hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type", "<none>"))])[0]
    if arch not in _MODEL_TYPES.values():
      raise NotImplementedError(
        f"{source}: unsupported architecture {arch!r} (supported: {', '.join(_MODEL_TYPES.values())})"
      )
    missing = [
      k
      for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
      if k not in hf
    ]
    if missing:
      raise ValueError(f"{source}: missing required config key(s) {missing}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
      raise NotImplementedError(f"{source}: hidden_act={hf['hidden_act']!r} (only silu is supported)")
    if hf.get("mlp_bias"):
      raise NotImplementedError(f"{source}: mlp_bias=true is not supported")
    if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
      raise NotImplementedError(f"{source}: attention_bias=true for {arch} (it adds an o_proj bias) is not supported")
    sliding = hf.get("use_sliding_window", arch == "MistralForCausalLM") and hf.get("sliding_window")
    if sliding or any(t != "full_attention" for t in hf.get("layer_types") or ()):
      raise NotImplementedError(f"{source}: sliding-window attention is not supported")
    rope = dict(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", 10000.0)
    if hf.get("rope_parameters") is not None:  # transformers >= 5
      params = hf["rope_parameters"]
      if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise NotImplementedError(f"{source}: per-layer-type rope_parameters are not supported: {params}")
      theta = params.get("rope_theta", theta)
      rope = dict(params)
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None
    if kind == "llama3":
      absent = [
        k
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k not in rope
      ]
      if absent:
        raise ValueError(f"{source}: llama3 rope scaling lacks key(s) {absent}")
      rope_scaling = RopeScaling(
        factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"],
      )
    elif kind != "default":
      raise NotImplementedError(f"{source}: rope_scaling type {kind!r} is not supported (supported: llama3)")
    heads = hf["num_attention_heads"]
    config = dict(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"],
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=theta,
      rope_scaling=rope_scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=arch == "Qwen2ForCausalLM",
      max_seq_len=hf.get("max_position_embeddings", 8192),
    )
    return cls(**(config | overrides))


_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def llama3_1_8b(**overrides) -> ModelConfig:
  """Llama-3.1-8B's shape (no weights ship here); keyword overrides replace any field, e.g. num_layers=4."""
  return _preset(
    dict(
      vocab_size=128256,
      d_model=4096,
      num_layers=32,
      num_heads=32,
      num_kv_heads=8,
      head_dim=128,
      mlp_dim=14336,
      rms_norm_eps=1e-5,
      rope_theta=500000.0,
      rope_scaling=RopeScaling(),
      max_seq_len=131072,
    ),
    overrides,
  )


def smollm2_135m(**overrides) -> ModelConfig:
  """SmolLM2-135M(-Instruct): Llama architecture, 9 query / 3 kv heads, tied embeddings."""
  return _preset(
    dict(
      vocab_size=49152,
      d_model=576,
      num_layers=30,
      num_heads=9,
      num_kv_heads=3,
      head_dim=64,
      mlp_dim=1536,
      rms_norm_eps=1e-5,
      rope_theta=100000.0,
      tie_embeddings=True,
      max_seq_len=8192,
    ),
    overrides,
  )


def _preset(fields: dict, overrides: dict) -> ModelConfig:
  """A preset's fields with the caller's overrides on top (`llama3_1_8b(num_layers=4)`)."""
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise TypeError(f"unknown ModelConfig field(s) {sorted(unknown)}")
  return ModelConfig(**(fields | overrides))
