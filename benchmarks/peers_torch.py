"""PyTorch peers of the block-sparse kernel, timed on the same inputs and block layouts: FlexAttention and SDPA.

Torch only (no JAX): `attention_speed.py --peers flex,sdpa` imports this module after timing our kernel and hands
over its q/k/v (JAX arrays through DLPack, or NumPy arrays) and the layout as a NumPy bool block mask. torch is not a
dependency of the project; on the GPU machine it sits in the same Python as JAX.

Semantics (SPEC §4 with T == S, block 128): query t attends to key j when block (t // 128, j // 128) is selected
and, with causal, j <= t. FlexAttention's BlockMask says the same thing with two block lists per query block row:

    block mask row r (x selected)    full blocks (no mask_mod)   partial blocks (mask_mod q >= kv)
    kv block:  0 1 2 3 4 5           kv blocks [0, 3]            kv blocks [5]   (the diagonal, r = 5)
               x . . x . x

Selected blocks below the diagonal are full: the kernel reads them unmasked. The diagonal block is partial: the
kernel evaluates mask_mod there only. Selected blocks above the diagonal hold no causal key and are dropped, as
`BlockLayout.from_dense(..., allowed=allowed_blocks(...))` drops them. `mask_mod="causal"` (the default, what the
benchmark times) is the cheapest mask_mod that is exact on the partial blocks; it does not describe the whole mask, so
flex_attention's eager (uncompiled) path, which ignores the block lists and applies mask_mod to every score, would
compute dense causal attention with it. `mask_mod="layout"` adds the block lookup (exact everywhere, eager included)
at the cost of a gather in the diagonal blocks. Every call here goes through torch.compile, as FlexAttention's
documentation requires for its fused kernel.
"""

from __future__ import annotations

import functools
import inspect
import statistics
import time

import numpy as np
import torch
from torch.nn.attention import flex_attention as fa

BLOCK = 128


def to_torch(x, device) -> torch.Tensor:
  """A torch tensor on `device` holding x: a torch tensor, a NumPy array (ml_dtypes bfloat16 too, by its bits) or any
  array with `__dlpack__` (a JAX array: zero copy on the same GPU)."""
  if isinstance(x, torch.Tensor):
    return x.to(device)
  if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
    try:
      return torch.from_dlpack(x).to(device)
    except (RuntimeError, TypeError, BufferError):  # another device or dtype DLPack can't carry: through the host
      x = np.asarray(x)
  x = np.asarray(x)
  if x.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: torch.from_numpy has no such dtype; same bits as torch's
    return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16).to(device)
  return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def qkv_to_torch(q, k, v, *, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """q [B, T, N, H], k/v [B, S, K, H] (our layout) -> contiguous torch copies [B, N, T, H], [B, K, S, H] (torch's)."""
  return tuple(to_torch(x, device).transpose(1, 2).contiguous() for x in (q, k, v))


def _ordered(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """bool [..., nKb] -> (int32 counts [...], int32 [..., nKb] selected block indices first, ascending)."""
  counts = mask.sum(-1, dtype=torch.int32)
  indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
  return counts, indices


def _causal(b, h, q_idx, kv_idx):
  return q_idx >= kv_idx


def flex_block_mask(block_mask, *, device, causal: bool = True, mask_mod: str = "causal") -> fa.BlockMask:
  """FlexAttention BlockMask of a dense block mask (see the module docstring).

  Args:
    block_mask: bool [B, N, nQb, nKb] (NumPy or torch), True at the selected 128-token blocks; nQb == nKb.
    device: where the BlockMask lives (that of q/k/v).
    causal: the diagonal blocks are causal (partial), those above it dropped; else every selected block is full.
    mask_mod: "causal" (q >= kv, exact on the partial blocks only; the fast one) or "layout" (the block lookup and,
      with causal, q >= kv: exact everywhere).

  Raises:
    ValueError: block_mask is not 4-d bool, or mask_mod is neither name.
    NotImplementedError: nQb != nKb (causal masks aligned to the bottom right are not written here).
  """
  mask = to_torch(block_mask, device)
  if mask.dim() != 4 or mask.dtype != torch.bool:
    raise ValueError(f"block_mask must be bool [B, N, nQb, nKb], got {mask.dtype} {tuple(mask.shape)}")
  if mask_mod not in ("causal", "layout"):
    raise ValueError(f"mask_mod={mask_mod!r} must be 'causal' or 'layout'")
  nqb, nkb = mask.shape[-2:]
  if nqb != nkb:
    raise NotImplementedError(f"block_mask.shape={tuple(mask.shape)}: only nQb == nKb (T == S) is written here")
  if causal:
    rows, cols = torch.arange(nqb, device=device)[:, None], torch.arange(nkb, device=device)[None, :]
    partial, full = mask & (cols == rows), mask & (cols < rows)
  else:
    partial, full = torch.zeros_like(mask), mask
  if mask_mod == "layout":
    table = mask.clone()

    def mod(b, h, q_idx, kv_idx):
      keep = table[b, h, q_idx // BLOCK, kv_idx // BLOCK]
      return keep & (q_idx >= kv_idx) if causal else keep

  else:
    mod = _causal if causal else fa.noop_mask
  return fa.BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mod)


def gqa_supported() -> bool:
  """Whether this torch's flex_attention takes enable_gqa (2.5 and later); else kv heads are repeated."""
  return "enable_gqa" in inspect.signature(fa.flex_attention).parameters


@functools.cache
def compiled_flex_attention():
  """torch.compile(flex_attention), one per process; static shapes (a length change recompiles instead of switching
  to a dynamic-shape kernel), and room for one compile per benchmark shape."""
  config = torch._dynamo.config
  name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
  setattr(config, name, max(getattr(config, name), 64))
  return torch.compile(fa.flex_attention, dynamic=False)


def flex_attention(q, k, v, block_mask: fa.BlockMask) -> torch.Tensor:
  """Compiled FlexAttention of torch-layout q [B, N, T, H], k/v [B, K, S, H] -> [B, N, T, H]."""
  if q.shape[1] != k.shape[1] and not gqa_supported():
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask)
  return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_causal(q, k, v, *, backend: str):
  """Dense causal torch SDPA restricted to one backend ("cudnn", "flash", "efficient", "math") on torch-layout
  q [B, N, T, H], k/v [B, K, S, H].

  Returns:
    (call, gqa): call() -> out [B, N, T, H]; gqa says how K < N ran: "enable_gqa", or "repeated kv heads" where the
    backend refused enable_gqa (the repeat done here once, outside the calls), or "no gqa" for K == N. Decided by one
    call here, so the timed calls never retry.
  """
  from torch.nn.attention import SDPBackend, sdpa_kernel

  backends = dict(
    cudnn=SDPBackend.CUDNN_ATTENTION,
    flash=SDPBackend.FLASH_ATTENTION,
    efficient=SDPBackend.EFFICIENT_ATTENTION,
    math=SDPBackend.MATH,
  )
  if backend not in backends:
    raise ValueError(f"backend={backend!r} must be one of {sorted(backends)}")

  def call(q, k, v, **kw):
    with sdpa_kernel([backends[backend]]):
      return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)

  if q.shape[1] == k.shape[1]:
    return (lambda: call(q, k, v)), "no gqa"
  try:
    call(q, k, v, enable_gqa=True)
    return (lambda: call(q, k, v, enable_gqa=True)), "enable_gqa"
  except (RuntimeError, TypeError):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return (lambda: call(q, k, v)), "repeated kv heads"


def synchronize(device) -> None:
  if torch.device(device).type == "cuda":
    torch.cuda.synchronize(device)


def timed(fn, *, device, repeats: int, warmup: int = 3, pipeline: int = 1) -> dict:
  """Milliseconds per call of fn(), as `benchmarks.common.timed` measures JAX calls: median (and min, spread) of
  `repeats` samples after `warmup` calls, a sample = `pipeline` calls issued back to back and waited for once, on the
  host clock (host dispatch included). On a GPU also `event_ms`: the median of CUDA events around the same calls
  (the stream's time from the first call's launch to the last one's end). `first_call_s`: the first warm-up call, a
  compile included."""
  start = time.perf_counter()
  fn()
  synchronize(device)
  first_call_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    fn()
  synchronize(device)
  cuda = torch.device(device).type == "cuda"
  times, event_times = [], []
  for _ in range(repeats):
    if cuda:
      begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    if cuda:
      begin.record()
    for _ in range(pipeline):
      fn()
    if cuda:
      end.record()
    synchronize(device)
    times.append((time.perf_counter() - start) * 1e3 / pipeline)
    if cuda:
      event_times.append(begin.elapsed_time(end) / pipeline)
  result = dict(ms=statistics.median(times), min_ms=min(times), spread_ms=statistics.pstdev(times))
  if cuda:
    result["event_ms"] = statistics.median(event_times)
  return dict(result, first_call_s=first_call_s)


def rel_err(got: torch.Tensor, want) -> float:
  """||got - want|| / ||want|| in float32; got torch-layout [B, N, T, H], want our layout [B, T, N, H] (any array
  `to_torch` takes)."""
  want = to_torch(want, got.device).transpose(1, 2)
  return float(torch.linalg.vector_norm((got - want).float()) / torch.linalg.vector_norm(want.float()))


def default_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"
