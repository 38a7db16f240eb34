"""Backend registry: which implementation computes each op, tried in order with fallthrough.

Every backend computes exactly SPEC on validated inputs, with the signatures of the three protocols below. A backend
raises NotImplementedError (at trace time) for a legal input it does not support, so that
`implementation=("pallas_mosaic_gpu", "xla")` falls through to the next one. The core registers only "xla"; the
Pallas backends register themselves (`register`) when `xattn_jax.pallas_kernels` is imported, which the package's
`__init__` does, with factories that import their kernels on first use. Memory bounds over long queries are the
caller's: `xattention` runs every backend on query chunks it sizes from a budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, Protocol

import jax

from xattn_jax.config import is_configured_backend, normalize_implementation
from xattn_jax.geometry import Geometry
from xattn_jax.layout import BlockLayout


class ScoresFn(Protocol):
  def __call__(self, q: jax.Array, k: jax.Array, geometry: Geometry, *, stride: int, block_size: int, causal: bool,
               scale: float, interpret) -> jax.Array:
    """SPEC §1 block scores, f32 [B, N, nQb, nKb]."""


class AttentionFn(Protocol):
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout, geometry: Geometry, *,
               causal: bool, scale: float, interpret) -> tuple[jax.Array, jax.Array]:
    """SPEC §4 block-sparse attention: (out [B, T, N, H], lse f32 [B, N, T])."""


class AttentionBwdFn(Protocol):
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
               d_lse: jax.Array, layout: BlockLayout, geometry: Geometry, *, causal: bool, scale: float,
               interpret) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `AttentionFn` for the cotangents of out and lse."""


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  antidiagonal_scores: ScoresFn
  block_sparse_attention: AttentionFn
  block_sparse_attention_bwd: AttentionBwdFn | None = None  # None: the XLA backward serves this backend's forward


def _xla() -> Backend:
  from xattn_jax import attention_xla, scoring_xla

  def scores(q, k, geometry, *, interpret, **kw):
    del interpret  # plain XLA runs the same everywhere
    return scoring_xla.antidiagonal_scores(q, k, geometry, **kw)

  def attention(q, k, v, layout, geometry, *, interpret, **kw):
    del interpret
    return attention_xla.block_sparse_attention(q, k, v, layout, geometry, **kw)

  return Backend("xla", scores, attention)


# name -> factory of the backend (called with the configured backend's instance, or with nothing).
_REGISTRY: dict[str, Callable[..., Backend]] = {"xla": _xla}
# Preferred order per JAX platform when `implementation=None`; names not registered are skipped.
_DEFAULT_ORDER = {
    "gpu": ("pallas_mosaic_gpu", "xla"),
    "cuda": ("pallas_mosaic_gpu", "xla"),
    "tpu": ("pallas_tpu", "xla"),
}


def register(name: str, factory: Callable[..., Backend]) -> None:
  """Adds (or replaces) the backend `name`; `factory(tuned=None)` builds it (a `Tuned` instance carries tuning)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"backend name must be a non-empty str, got {name!r}")
  _REGISTRY[name] = factory


def available() -> tuple[str, ...]:
  return tuple(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Tuned:
  """A registered backend with its kernels' tuning (a configured backend), passed as `implementation=` alone or in a
  sequence. Subclasses name the backend (`xattn_jax.pallas_kernels.mosaic_gpu.MosaicGpu`, `xattn_jax.pallas_kernels.tpu.Tpu`); each
  field is None (the kernel's default) or that backend's kernel config: scores a ScoresConfig, forward a
  ForwardConfig, backward a BackwardConfig. The registered factory gets the instance."""

  scores: object = None
  forward: object = None
  backward: object = None
  name: ClassVar[str] = ""

  def backend(self) -> Backend:
    return _factory(self.name)(self)


def _factory(name: str) -> Callable[..., Backend]:
  return _REGISTRY[name]


def _load(name) -> Backend:
  if is_configured_backend(name):  # carries its own tuning
    return name.backend()
  return _factory(name)()


def resolve(implementation) -> tuple[str, ...]:
  """The backend names to try, in order."""
  implementation = normalize_implementation(implementation)
  if implementation is None:
    order = _DEFAULT_ORDER.get(jax.default_backend(), ("xla",))
    return tuple(name for name in order if name in _REGISTRY)
  names = implementation if isinstance(implementation, tuple) else (implementation,)
  for name in names:
    registered = name.name if is_configured_backend(name) else name
    if registered not in _REGISTRY:
      raise ValueError(f"implementation={name!r} is not one of the available backends {available()}")
  return names


def dispatch(op: str, implementation, *args, **kwargs):
  """Calls `op` on the first backend of `implementation` that does not raise NotImplementedError."""
  reasons = []
  for name in resolve(implementation):
    try:
      return getattr(_load(name), op)(*args, **kwargs)
    except NotImplementedError as e:
      reasons.append(f"{getattr(name, 'name', name)}: {e}")
  raise NotImplementedError(f"no backend of implementation={implementation!r} supports this {op} call: " + "; ".join(reasons))


def dispatch_backward(implementation, *args, **kwargs):
  """The backward of block_sparse_attention: the first backend of `implementation` that has one and does not raise
  NotImplementedError, else the XLA backward (`attention_xla_bwd`), which serves every forward."""
  for name in resolve(implementation):
    backward = _load(name).block_sparse_attention_bwd
    if backward is None:
      continue
    try:
      return backward(*args, **kwargs)
    except NotImplementedError:
      pass
  from xattn_jax import attention_xla_bwd

  kwargs.pop("interpret", None)
  return attention_xla_bwd.block_sparse_attention_bwd(*args, **kwargs)
