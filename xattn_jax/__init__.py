"""xattn-jax: XAttention (block-sparse attention with antidiagonal scoring) for JAX.

Layers, each importing only those above it: the core (this package's modules) <- `xattn_jax.pallas_kernels` (the
Pallas backends, registered with `xattn_jax.backends` when imported, as they are at the end of this file) <-
`xattn_jax.models` <- `xattn_jax.evaluation`, `xattn_jax.cli` and the benchmarks (see `_subpackages`).
"""

from xattn_jax._checks import traced_checks
from xattn_jax.config import XAttentionConfig
from xattn_jax.dense import DenseRoute, dense_attention, dense_route
from xattn_jax.estimators import Estimator
from xattn_jax.layout import BlockCounts, BlockLayout, allowed_blocks
from xattn_jax.ops import antidiagonal_scores, block_sparse_attention, xattention
from xattn_jax.selection import select_blocks
from xattn_jax.sharding import sharded_xattention
from xattn_jax.flax_attention import attention_fn

__all__ = [
  "BlockCounts",
  "BlockLayout",
  "DenseRoute",
  "Estimator",
  "XAttentionConfig",
  "allowed_blocks",
  "antidiagonal_scores",
  "attention_fn",
  "block_sparse_attention",
  "dense_attention",
  "dense_route",
  "select_blocks",
  "sharded_xattention",
  "traced_checks",
  "xattention",
]

# The other folders import as xattn_jax.<name> (from a checkout too); the kernel layer registers its backends (last:
# it imports the core).
from xattn_jax import _subpackages  # noqa: E402

_subpackages.install()
from xattn_jax import pallas_kernels  # noqa: E402, F401
