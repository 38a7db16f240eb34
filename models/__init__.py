"""Flax NNX long-context transformers (Llama / Qwen2 family) that call `xattn_jax.xattention`."""
