"""Flax NNX long-context transformers (Llama / Qwen2 family) that call `xattn_jax.xattention`."""

from models.config import AttentionConfig, ModelConfig, RopeScaling, llama3_1_8b, smollm2_135m
from models.generate import GenerationResult, Generator
from models.loading import from_pretrained, load_tokenizer
from models.transformer import KVCache, Transformer

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
