"""Backend registry: which implementation computes each op, tried in order with fallthrough.

Every backend computes exactly SPEC on validated inputs, with the signatures of the three protocols below. A backend
raises NotImplementedError (at trace time) for a legal input it does not support, so that
`implementation=("pallas_mosaic_gpu", "xla")` falls through to the next one. The core registers only "xla"; the
Pallas backends register themselves (`register`) when `xattn_jax.pallas_kernels` is imported, which the package's
`__init__` does, with factories that import their kernels on first use. Memory bounds over long queries are the
caller's: `xattention` runs every backend on query chunks it sizes from a budget.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import ClassVar, Protocol

import jax

from xattn_jax.config import is_configured_backend, normalize_implementation
from xattn_jax.estimators import Estimator
from xattn_jax.geometry import Geometry
from xattn_jax.layout import BlockLayout


class ScoresFn(Protocol):
  def __call__(
    self,
    q: jax.Array,
    k: jax.Array,
    geometry: Geometry,
    *,
    stride: int,
    block_size: int,
    causal: bool,
    scale: float,
    estimator: Estimator,
    interpret,
    padding_zeroed: bool = False,
  ) -> jax.Array:
    """SPEC §1 block scores, f32 [B, N, nQb, nKb], of the estimator of SPEC §1.7. `padding_zeroed`: the caller has
    zeroed the padding tokens that share a stride group with real ones (`geometry.zero_straddling_tokens`), so a
    backend need not zero them itself."""


class AttentionFn(Protocol):
  def __call__(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    geometry: Geometry,
    *,
    causal: bool,
    scale: float,
    interpret,
  ) -> tuple[jax.Array, jax.Array]:
    """SPEC §4 block-sparse attention: (out [B, T, N, H], lse f32 [B, N, T])."""


class AttentionBwdFn(Protocol):
  def __call__(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    d_lse: jax.Array,
    layout: BlockLayout,
    geometry: Geometry,
    *,
    causal: bool,
    scale: float,
    interpret,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `AttentionFn` for the cotangents of out and lse."""


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  antidiagonal_scores: ScoresFn
  block_sparse_attention: AttentionFn
  block_sparse_attention_bwd: AttentionBwdFn | None = None  # None: the XLA backward serves this backend's forward


def _xla() -> Backend:
  from xattn_jax import attention_xla, scoring_xla

  def scores(q, k, geometry, *, interpret, padding_zeroed=False, **kw):
    del interpret, padding_zeroed  # plain XLA runs the same everywhere; its zeroing fuses into its float32 copies
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
  sequence. Subclasses name the backend (`xattn_jax.pallas_kernels.mosaic_gpu.MosaicGpu`,
  `xattn_jax.pallas_kernels.tpu.Tpu`); each field is None (the kernel's default) or that backend's kernel config:
  scores a ScoresConfig, forward a ForwardConfig, backward a BackwardConfig. The registered factory gets the
  instance."""

  scores: object = None
  forward: object = None
  backward: object = None
  name: ClassVar[str] = ""

  def backend(self) -> Backend:
    return _REGISTRY[self.name](self)


def _registered_name(name) -> str:
  """The registry name of a backend name or of a configured backend (`Tuned`)."""
  return name.name if is_configured_backend(name) else name


def _load(name) -> Backend:
  if is_configured_backend(name):  # carries its own tuning
    return name.backend()
  return _REGISTRY[name]()


def resolve(implementation) -> tuple[str, ...] | None:
  """The backend names to try, in order; None for the default (`implementation=None`): each platform's order
  (`_DEFAULT_ORDER`), chosen when the program is lowered (see `dispatch`). Inside an `on_each_platform` branch the
  default is that platform's names, never None: a jitted function given them as a static argument is traced once per
  branch (its trace cache is keyed by its arguments, not by the branch)."""
  implementation = normalize_implementation(implementation)
  if implementation is None:
    return None if _TARGET.get() is None else _default_names(_TARGET.get())
  names = implementation if isinstance(implementation, tuple) else (implementation,)
  for name in names:
    if _registered_name(name) not in _REGISTRY:
      raise ValueError(f"implementation={name!r} is not one of the available backends {available()}")
  return names


# The platform whose branch `_per_platform` is tracing ("cpu", "gpu", "tpu"); unset outside one.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("xattn_target_platform", default=None)
# lax.platform_dependent's platform names -> jax.default_backend()'s.
_LOWERING_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}


def target_platform() -> str:
  """The platform the code being traced will run on: the branch's (lowering time) inside a default dispatch, else
  `jax.default_backend()`. Kernel backends check it instead of the default backend, so that a program exported
  for a TPU from a CPU host traces the TPU kernels in its TPU branch."""
  return _TARGET.get() or jax.default_backend()


def _first_supported(names, call):
  """`call(backend_name)` on the first of `names` that does not raise NotImplementedError."""
  reasons = []
  for name in names:
    try:
      return call(name)
    except NotImplementedError as e:
      reasons.append(f"{getattr(name, 'name', name)}: {e}")
  raise NotImplementedError("; ".join(reasons))


def _default_names(platform: str) -> tuple[str, ...]:
  """The registered backends of `platform`'s default order (a `jax.default_backend()` name)."""
  return tuple(n for n in _DEFAULT_ORDER.get(platform, ("xla",)) if n in _REGISTRY)


def on_each_platform(fn, *args):
  """`fn(platform, *args)` for each platform ("cpu", "gpu", "tpu": `jax.default_backend()` names), staged out with
  `lax.platform_dependent`: lowering keeps only the branch of the platform it lowers for (every branch is traced,
  each jitted kernel once per shape), so one exported program serves cpu, cuda and tpu, and a CPU host can export
  for a TPU. Inside a branch `target_platform()` names its platform."""

  def branch(platform):
    def run(*args):
      token = _TARGET.set(_LOWERING_PLATFORMS[platform])
      try:
        return fn(_LOWERING_PLATFORMS[platform], *args)
      finally:
        _TARGET.reset(token)

    return run

  if _TARGET.get() is not None:  # already inside a platform's branch (an op within a dispatched op)
    return fn(_TARGET.get(), *args)
  return jax.lax.platform_dependent(*args, default=branch("cpu"), cuda=branch("cuda"), tpu=branch("tpu"))


def where_backend_may_run(name: str, implementation, fn, *args):
  """`fn(*args)` where backend `name` may serve a call of `implementation` (it is one of its names, or for the
  default, in the order of the platform the program is lowered for), else `args` unchanged."""
  names = resolve(implementation)
  if names is not None:
    return fn(*args) if name in map(_registered_name, names) else args
  return on_each_platform(lambda platform, *args: fn(*args) if name in _default_names(platform) else args, *args)


def _per_platform(call, *args):
  """`call(names, *args)` with each platform's default backend order (`on_each_platform`)."""
  return on_each_platform(lambda platform, *args: call(_default_names(platform), *args), *args)


def dispatch(op: str, implementation, *args, **kwargs):
  """Calls `op` on the first backend of `implementation` that does not raise NotImplementedError (for the default,
  per platform at lowering time: `_per_platform`)."""

  def call(names, *args):
    try:
      return _first_supported(names, lambda name: getattr(_load(name), op)(*args, **kwargs))
    except NotImplementedError as e:
      raise NotImplementedError(f"no backend of implementation={implementation!r} supports this {op} call: {e}")

  names = resolve(implementation)
  return _per_platform(call, *args) if names is None else call(names, *args)


def dispatch_backward(implementation, *args, **kwargs):
  """The backward of block_sparse_attention: the first backend of `implementation` that has one and does not raise
  NotImplementedError, else the XLA backward (`attention_xla_bwd`), which serves every forward."""

  def call(names, *args):
    def backward(name):
      kernel = _load(name).block_sparse_attention_bwd
      if kernel is None:
        raise NotImplementedError("no backward kernels")
      return kernel(*args, **kwargs)

    try:
      return _first_supported(names, backward)
    except NotImplementedError:
      from xattn_jax import attention_xla_bwd

      return attention_xla_bwd.block_sparse_attention_bwd(
        *args, **{k: v for k, v in kwargs.items() if k != "interpret"}
      )

  names = resolve(implementation)
  return _per_platform(call, *args) if names is None else call(names, *args)
