"""Flax NNX long-context transformers (Llama / Qwen2 family) that call `xattn_jax.xattention`."""

from xattn_jax import _subpackages

_subpackages.deprecated_alias(__name__)  # as the old top-level `models`: an alias of this package

from xattn_jax.models.config import AttentionConfig, ModelConfig, RopeScaling, llama3_1_8b, smollm2_135m  # noqa: E402
from xattn_jax.models.generate import GenerationResult, Generator  # noqa: E402
from xattn_jax.models.loading import from_pretrained, load_tokenizer  # noqa: E402
from xattn_jax.models.transformer import KVCache, Transformer  # noqa: E402

__all__ = [
  "AttentionConfig",
  "GenerationResult",
  "Generator",
  "KVCache",
  "ModelConfig",
  "RopeScaling",
  "Transformer",
  "from_pretrained",
  "llama3_1_8b",
  "load_tokenizer",
  "smollm2_135m",
]


def __getattr__(name: str):  # `models.haystack` and `models.calibration` moved to xattn_jax.evaluation
  return _subpackages.moved_attribute("models", name)
