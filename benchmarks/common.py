"""Measurement helpers of the benchmark scripts: wall-clock timing of jitted calls, fixed-density causal layouts,
relative error, and the traced-check scope that timed programs run in."""

from __future__ import annotations

import collections
import functools
import glob
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import xattn_jax as xa

BLOCK = 128  # the block size of every benchmark layout


def timed(fn, *args, repeats: int, warmup: int = 3, pipeline: int = 1) -> dict:
  """Milliseconds per call: median (and min, spread) of `repeats` samples after `warmup` calls. A sample is
  `pipeline` calls issued back to back and waited for once, divided by `pipeline`: 1 measures one call's latency
  including the host's dispatch; more hide the dispatch behind the device's work (throughput of back-to-back calls)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(pipeline)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) * 1e3 / pipeline)
  return {"ms": statistics.median(times), "min_ms": min(times), "spread_ms": statistics.pstdev(times)}


def chained_in_one_jit(fn, calls: int):
  """One jitted program of `calls` back-to-back calls of fn(x, *rest) on the same data: each call's x passes through
  an optimization barrier with the previous call's outputs, so XLA can neither merge the calls nor reorder them and
  every call sees the original inputs (a data-dependent op keeps its selection); one element of each output is
  summed into the result, so no call is dead code (the barrier keeps XLA from computing just that element). What a
  model's layers do in one program. Time it with `timed` and divide by `calls`: the GPU's cost per call without the
  host's dispatch of each."""

  def run(x, *rest):
    total = jnp.zeros((), jnp.float32)
    for _ in range(calls):
      x, out = jax.lax.optimization_barrier((x, fn(x, *rest)))
      total = total + sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(out))
    return x, total

  return jax.jit(run)


def timed_per_call(fn, *args, repeats: int, in_jit: int = 1, pipeline: int = 1) -> dict:
  """`timed` per call: on one call, or on `in_jit` calls chained in one program (`chained_in_one_jit`: a model's
  layers, without the host's dispatch of each) with every time divided by in_jit."""
  if in_jit == 1:
    return timed(fn, *args, repeats=repeats, pipeline=pipeline)
  t = timed(chained_in_one_jit(fn, in_jit), *args, repeats=repeats, pipeline=pipeline)
  return {name: value / in_jit for name, value in t.items()}


def device_op_times(fn, *args, divide_by: int = 1, top: int = 15, warmup: bool = True) -> list[dict]:
  """Where one call's device time goes: `fn(*args)` run once under `jax.profiler.trace`, the events of the
  accelerator's planes (or the host's XLA threads where there is none) summed by name. On a GPU the "XLA Ops" line
  names each HLO op (fusion, custom call, dot) with its kernels' time; the stream lines name the kernels. Rows
  {line, name, ms, count} per line kind, each kind's `top` largest, times and counts divided by `divide_by` (the
  steps of a loop, to report per step), largest first. `warmup=False` for a compiled fn that cannot run twice."""
  if warmup:
    jax.block_until_ready(fn(*args))  # compiled and warm: the trace holds one run
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      jax.block_until_ready(fn(*args))
    (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  if not planes:
    planes = [p for p in data.planes if p.name == "/host:CPU"]
  totals = collections.defaultdict(lambda: [0.0, 0])
  for plane in planes:
    for line in plane.lines:
      kind = "stream" if line.name.startswith("Stream") else line.name.split("/")[0]  # host threads: no id
      if kind == "python":
        continue
      for event in line.events:
        entry = totals[kind, event.name]
        entry[0] += event.duration_ns / 1e6
        entry[1] += 1
  rows = []
  for kind in sorted({k for k, _ in totals}):
    named = sorted(((n, t) for (k, n), t in totals.items() if k == kind), key=lambda nt: -nt[1][0])
    rows += [dict(line=kind, name=n, ms=t[0] / divide_by, count=t[1] / divide_by) for n, t in named[:top]]
  return rows


def fixed_density_layout(key, *, batch, heads, length, density) -> xa.BlockLayout:
  """Causal layout with `density` of each row's allowed blocks, always holding the diagonal: in every query block
  row the diagonal block and round(density * allowed) - 1 random other allowed blocks. A length off whole blocks
  (a ragged prompt) has a partial last block."""
  nb = -(-length // BLOCK)
  allowed = xa.allowed_blocks(q_len=length, kv_len=length, block_size=BLOCK)  # [1, 1, nb, nb]
  u = jax.random.uniform(key, (batch, heads, nb, nb))
  diag = jnp.eye(nb, dtype=bool)
  u = jnp.where(diag, 2.0, jnp.where(allowed, u, -1.0))
  rank = jnp.argsort(jnp.argsort(-u, axis=-1), axis=-1)
  keep = jnp.maximum(1, jnp.round(density * jnp.sum(allowed, axis=-1, keepdims=True))).astype(jnp.int32)
  return xa.BlockLayout.from_dense(rank < keep, block_size=BLOCK, allowed=allowed)


def block_mask_of(layout: xa.BlockLayout) -> np.ndarray:
  """The layout as a NumPy bool block mask [B, N, nQb, nKb], True at the selected blocks: what a peer outside JAX
  (benchmarks.peers_torch) builds its own mask from, so that it runs on exactly the blocks our kernel ran."""
  return np.asarray(layout.to_dense())


def rel_err(got, want) -> float:
  """||got - want|| / ||want|| in float32 (Frobenius norms over all axes)."""
  return float(jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))


def without_traced_checks(fn):
  """`fn` run with xattn_jax's traced checkify value checks off, as production dispatch runs: no checkify effects in
  the timed programs (with them a call pays ~0.2-0.3 ms on JAX's slow dispatch path). The setting is restored on
  return, so a script's main can be called from tests."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with xa.traced_checks(False):
      return fn(*args, **kwargs)

  return wrapper
