"""The XAttention knobs as one frozen, validated, hashable config.

Hashable so that it can be a static argument of `jax.jit` and a field of a model config. Per-head thresholds are
stored as a tuple for the same reason; pass an array directly to `xattention(threshold=...)` instead when the
thresholds must change without recompiling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from xattn_jax.estimators import check_estimator

Implementation = object  # None, a backend name or configured backend, or a tuple of them (see normalize_implementation)


def _check_threshold_value(value: float, name: str) -> float:
  value = float(value)
  if not (math.isfinite(value) and value >= 0.0):
    raise ValueError(f"{name}={value} must lie in [0, inf)")
  return value


def is_configured_backend(x) -> bool:
  """A backend object carrying its kernels' tuning (e.g. `xattn_jax.pallas_kernels.mosaic_gpu.MosaicGpu(...)`):
  hashable, with a registered `name` and a `backend()` that builds it."""
  return isinstance(getattr(x, "name", None), str) and callable(getattr(x, "backend", None))


def normalize_implementation(implementation) -> Implementation:
  """None, one backend (a name or a configured backend), or a sequence of them tried in order; returned hashable."""
  if implementation is None or isinstance(implementation, str) or is_configured_backend(implementation):
    return implementation
  if (
    isinstance(implementation, Sequence)
    and implementation
    and all(isinstance(x, str) or is_configured_backend(x) for x in implementation)
  ):
    return tuple(implementation)
  raise ValueError(
    f"{implementation=} must be None, a backend name or configured backend (e.g. "
    "xattn_jax.pallas_kernels.mosaic_gpu.MosaicGpu(...)), or a non-empty sequence of them"
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class XAttentionConfig:
  """XAttention settings (SPEC §6 defaults).

  Attributes:
    stride: antidiagonal stride s; must divide block_size. 8 is the paper's default; 16 is faster and coarser.
    block_size: attention block size in tokens, for both query and key blocks.
    threshold: tau, the fraction of each query block's estimated attention mass to keep. A float, or one value per
      query head (a tuple of length N). tau >= 1 is dense attention; tau = 0 keeps only the forced blocks.
    keep_sink: always keep key block 0 (the attention sink).
    keep_diagonal: always keep the diagonal key block (forced anyway in causal attention).
    keep_top_neighbors: also keep both neighbours of each query block's highest-scoring key block (SPEC §2.7), for
      sharp diagonals that cross a key-block boundary; off by default (the paper's selection).
    query_chunk_size: queries processed per step, a multiple of block_size; bounds the memory of scores and block
      tables. None picks one from a memory budget.
    estimator: "antidiagonal" (the paper's) or "alternating" (samples every token distance; SPEC §1.7).
    implementation: None (best for the platform), a backend name ("xla", ...) or configured backend
      (`xattn_jax.pallas_kernels.mosaic_gpu.MosaicGpu(forward=...)`, `xattn_jax.pallas_kernels.tpu.Tpu(...)`), or a
      sequence of them tried in order.
  """

  stride: int = 8
  block_size: int = 128
  threshold: float | tuple[float, ...] = 0.9
  keep_sink: bool = True
  keep_diagonal: bool = True
  keep_top_neighbors: bool = False
  query_chunk_size: int | None = None
  implementation: Implementation = None
  estimator: str = "antidiagonal"

  def __post_init__(self):
    for name in ("stride", "block_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.block_size % self.stride:
      raise ValueError(f"stride={self.stride} must divide block_size={self.block_size}")
    if isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool):
      object.__setattr__(self, "threshold", _check_threshold_value(self.threshold, "threshold"))
    elif isinstance(self.threshold, Sequence) and len(self.threshold) > 0:
      object.__setattr__(
        self, "threshold", tuple(_check_threshold_value(t, f"threshold[{i}]") for i, t in enumerate(self.threshold))
      )
    else:
      raise ValueError(f"threshold={self.threshold!r} must be a float or a non-empty sequence of floats (one per head)")
    if self.query_chunk_size is not None:
      qcs = self.query_chunk_size
      if not isinstance(qcs, int) or isinstance(qcs, bool) or qcs <= 0 or qcs % self.block_size:
        raise ValueError(
          f"query_chunk_size={qcs!r} must be None or a positive multiple of block_size={self.block_size}"
        )
    object.__setattr__(self, "implementation", normalize_implementation(self.implementation))
    object.__setattr__(
      self, "estimator", check_estimator(self.estimator, stride=self.stride, block_size=self.block_size).value
    )
    for name in ("keep_sink", "keep_diagonal", "keep_top_neighbors"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
