"""Input validation shared by the public ops.

Two kinds of checks:
- static ones (ranks, shapes, dtypes, Python scalars) raise ValueError at trace time;
- value checks (sequence lengths, block tables, thresholds given as arrays) raise ValueError when the values are
  concrete (eager calls) and become `checkify.debug_check`s when traced: no-ops under plain `jax.jit`, real checks
  when the caller wraps the computation in `checkify.checkify` (the tests always do). `traced_checks(False)` drops
  them from traces made inside it (faster dispatch).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

# Traced value checks give the enclosing jitted computation an effect, and JAX dispatches effectful computations on
# a slower path (measured: +0.03 ms per call on a CPU, +0.2-0.3 ms on an H100). On by default so that checkify
# always sees them; code that wants the fast dispatch traces inside `traced_checks(False)`. A context variable, set
# only by that context manager: nothing can leave the checks off for the rest of a process (a module-wide switch set
# by a benchmark's main once turned them off for every test run after it).
_TRACED_CHECKS = contextvars.ContextVar(
  "xattn_jax_traced_checks", default=os.environ.get("XATTN_JAX_TRACED_CHECKS", "1") != "0"
)


def traced_checks_enabled() -> bool:
  return _TRACED_CHECKS.get()


@contextlib.contextmanager
def traced_checks(enabled: bool):
  """Within the block, functions traced (jitted) include the checkify value checks or not; restored on exit. Affects
  tracing only: jit caches keep what was traced before."""
  token = _TRACED_CHECKS.set(bool(enabled))
  try:
    yield
  finally:
    _TRACED_CHECKS.reset(token)


def concrete_value(x) -> np.ndarray | None:
  """The value of `x` as a NumPy array, or None when it is traced."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def enforce(pred, message: str) -> None:
  """Raises ValueError(message) if concrete `pred` has a False entry; a checkify debug check if traced."""
  value = concrete_value(pred)
  if value is None:
    if _TRACED_CHECKS.get():
      checkify.debug_check(jnp.all(pred), message)
  elif not bool(np.all(value)):
    raise ValueError(message)


def check_rank(x, rank: int, name: str, layout: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_float_dtype(x, name: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}.dtype={x.dtype} must be a floating dtype (bfloat16, float16 or float32)")
  if x.dtype not in _SUPPORTED_DTYPES:
    raise NotImplementedError(f"{name}.dtype={x.dtype} is not supported; use bfloat16, float16 or float32")


@dataclasses.dataclass(frozen=True)
class Dims:
  """Sizes of one attention call, in the einsum legend of the project."""

  B: int  # batch
  T: int  # query length
  S: int  # key length
  N: int  # query heads
  K: int  # kv heads
  H: int  # head dim

  @property
  def G(self) -> int:  # query heads per kv head
    return self.N // self.K


def check_qkv(q, k, v=None, *, q_name="q", k_name="k", v_name="v") -> Dims:
  """Validates [B,T,N,H] queries and [B,S,K,H] keys/values; returns the sizes."""
  check_rank(q, 4, q_name, "[B, T, N, H]")
  check_rank(k, 4, k_name, "[B, S, K, H]")
  if v is not None:
    check_rank(v, 4, v_name, "[B, S, K, H]")
  B, T, N, H = q.shape
  _, S, K, _ = k.shape
  if k.shape[0] != B:
    raise ValueError(f"{k_name}.shape[0]={k.shape[0]} must equal the batch size {q_name}.shape[0]={B}")
  if k.shape[3] != H:
    raise ValueError(f"{k_name}.shape[3]={k.shape[3]} must equal the head dim {q_name}.shape[3]={H}")
  if v is not None and tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"{v_name}.shape={tuple(v.shape)} must equal {k_name}.shape={tuple(k.shape)}")
  if T < 1 or S < 1 or H < 1 or N < 1 or K < 1 or B < 1:
    raise ValueError(f"{q_name}.shape={tuple(q.shape)} and {k_name}.shape={tuple(k.shape)} must have no zero size")
  if N % K:
    raise ValueError(
      f"the number of query heads N={N} ({q_name}.shape[2]) must be a multiple of the number of kv heads K={K} "
      f"({k_name}.shape[2])"
    )
  if S < T:
    raise ValueError(
      f"the key length S={S} ({k_name}.shape[1]) must be >= the query length T={T} ({q_name}.shape[1]): queries are "
      "aligned to the end of the keys"
    )
  check_float_dtype(q, q_name)
  check_float_dtype(k, k_name)
  if v is not None:
    check_float_dtype(v, v_name)
  if k.dtype != q.dtype or (v is not None and v.dtype != q.dtype):
    vd = "" if v is None else f", {v_name}.dtype={v.dtype}"
    raise ValueError(f"{q_name}.dtype={q.dtype}, {k_name}.dtype={k.dtype}{vd} must be equal")
  return Dims(B=B, T=T, S=S, N=N, K=K, H=H)


def check_static_int(value, name: str, *, minimum: int = 1) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
  return int(value)


def check_return_block_layout(value) -> bool | str:
  """False, True (the BlockLayout) or "counts" (a BlockCounts: the layout's O(T) part, enough for its density)."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value == "counts":
    return value
  raise ValueError(f"return_block_layout={value!r} must be False, True or 'counts'")


def check_stride_block(stride, block_size) -> tuple[int, int]:
  stride = check_static_int(stride, "stride")
  block_size = check_static_int(block_size, "block_size")
  if block_size % stride:
    raise ValueError(f"{stride=} must divide {block_size=}")
  return stride, block_size


def check_scale(scale, head_dim: int) -> float:
  if scale is None:
    return 1.0 / float(np.sqrt(head_dim))
  try:
    scale = float(scale)
  except TypeError as e:
    raise ValueError(f"{scale=} must be a Python float (it is a static argument)") from e
  if not np.isfinite(scale) or scale <= 0:
    raise ValueError(f"{scale=} must be a finite positive float")
  return scale


def seq_lengths(lengths, *, batch: int, maximum: int, name: str) -> jax.Array:
  """Validated int32 [B] lengths; `None` means every sequence has `maximum` tokens."""
  if lengths is None:
    return jnp.full((batch,), maximum, jnp.int32)
  if not hasattr(lengths, "shape"):
    lengths = np.asarray(lengths)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name}.dtype={lengths.dtype} must be an integer dtype")
  if tuple(lengths.shape) != (batch,):
    raise ValueError(f"{name}.shape={tuple(lengths.shape)} must be ({batch},) (one length per batch element)")
  lengths = jnp.asarray(lengths, jnp.int32)
  enforce((lengths >= 0) & (lengths <= maximum), f"{name} must lie in [0, {maximum}]")
  return lengths


def query_key_lengths(query_seq_lengths, key_value_seq_lengths, dims: Dims) -> tuple[jax.Array, jax.Array]:
  """Validated (q_lengths, kv_lengths), int32 [B] each, with q_b <= k_b (queries end where the keys end)."""
  q_lengths = seq_lengths(query_seq_lengths, batch=dims.B, maximum=dims.T, name="query_seq_lengths")
  kv_lengths = seq_lengths(key_value_seq_lengths, batch=dims.B, maximum=dims.S, name="key_value_seq_lengths")
  enforce(
    q_lengths <= kv_lengths,
    "query_seq_lengths must be <= key_value_seq_lengths per batch element (query t sits at position k_b - q_b + t)",
  )
  return q_lengths, kv_lengths


def threshold_array(threshold, num_heads: int) -> jax.Array:
  """tau as float32 [N]; a scalar is broadcast. Values must lie in [0, inf)."""
  if isinstance(threshold, bool):
    raise ValueError(f"{threshold=} must be a float or an array of shape [{num_heads}]")
  if isinstance(threshold, (int, float, np.floating, np.integer)):
    value = float(threshold)
    if not (np.isfinite(value) and value >= 0):
      raise ValueError(f"{threshold=} must lie in [0, inf)")
    return jnp.full((num_heads,), value, jnp.float32)
  if isinstance(threshold, (list, tuple)):
    threshold = np.asarray(threshold, np.float32)
  if not hasattr(threshold, "dtype") or not (
    jnp.issubdtype(threshold.dtype, jnp.floating) or jnp.issubdtype(threshold.dtype, jnp.integer)
  ):
    raise ValueError(f"threshold must be a float or a float array of shape [{num_heads}], got {threshold!r}")
  if threshold.ndim == 0:
    threshold = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (num_heads,))
  elif tuple(threshold.shape) != (num_heads,):
    raise ValueError(f"threshold.shape={tuple(threshold.shape)} must be () or ({num_heads},) (one per query head)")
  threshold = jnp.asarray(threshold, jnp.float32)
  enforce(jnp.isfinite(threshold) & (threshold >= 0), "threshold must lie in [0, inf)")
  return threshold
