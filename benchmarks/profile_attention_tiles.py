"""Launch the sparse attention kernel once per (length, density) case, for Nsight Compute (notes: the per-tile cost).

    ncu --clock-control none --kernel-name regex:mosaic_gpu --set full -o $OUT/tiles \
      python3 benchmarks/profile_attention_tiles.py 32768:5,32768:50,8192:5

Each case compiles first (no kernel launch), then runs the kernel exactly once, so that the k-th profiled launch is
the k-th case. Then, for the hottest SASS lines of each launch:

    ncu --import $OUT/tiles.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 benchmarks/profile_attention_tiles.py --sass-top sass.csv

Without Nsight, Mosaic GPU's own profiler times each consumer warpgroup's tile phases ("open": the Q load's wait;
"open_first_k": the first K's; "open_turn": the ping-pong turn's; "steps"; "close": the epilogue and stores) and
the gaps between tiles, per CTA:

    python3 benchmarks/profile_attention_tiles.py 8192:10,32768:10 --phases $OUT/phases

It writes the kernel's Perfetto trace under that directory and prints, per case, the busiest warpgroup's span (the
kernel's time), how much longer the busiest CTA (SM) ran than the mean one (the schedule's tail), and each phase's
median and mean time per tile and its share of all warpgroups' time, for both consumers and for each (wg0, wg1).
The five ranges per tile fill the profiler's SMEM buffer at 32K (the script says when a trace is cut short); profile
8K and 16K whole. Units: the profiler stamps events with the SM's cycle counter and writes ts = cycles / 1000
after a start in ns, so its "us" are thousands of cycles (kcyc; divide by the clock in GHz: an H100 under this load
runs at ~1.5 GHz). Its event writes cost ~12 cycles each, so the phases are slightly longer than without it.

A case is T:percent[:kv heads[:variant]] (8 kv heads and the default ForwardConfig if left out; variants as in
attention_variants.py). Shapes as in attention_speed.py: B=1, 32 query heads, head dim 128, bf16, causal,
fixed-density layouts holding the diagonal. Prints the layout's work (tiles, visited blocks) per case, which the
profile's cycles are divided by.
"""

import collections
import csv
import dataclasses
import glob
import json
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.attention_variants import VARIANTS, direct_call
from benchmarks.common import fixed_density_layout, without_traced_checks
from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as kernel
from xattn_jax.geometry import Geometry


def sass_top(path: str, lines: int = 40) -> None:
  """Per profiled kernel in ncu's source-page CSV: the SASS lines with the most warp-stall samples."""
  rows = list(csv.reader(open(path, errors="replace")))
  kernels = []  # [header, rows]: each kernel's table starts with a header row naming Source and the sample columns
  for row in rows:
    if "Source" in (c.strip() for c in row) and any("Sampl" in c for c in row):
      kernels.append((row, []))
    elif kernels and len(row) == len(kernels[-1][0]):
      kernels[-1][1].append(row)

  def number(x):
    try:
      return float(x.replace(",", ""))
    except ValueError:
      return 0.0

  print(f"{len(rows)} csv rows, {len(kernels)} kernels")
  for header, body in kernels:
    columns = [i for i, c in enumerate(header) if "Sampl" in c]
    source, key = header.index("Source"), columns[0]
    total = sum(number(r[key]) for r in body)
    print(
      f"--- kernel: {len(body)} SASS lines, {total:.0f} samples ({header[key]}); columns: samples, share, "
      + ", ".join(header[i] for i in columns[1:])
    )
    for r in sorted(body, key=lambda r: -number(r[key]))[:lines]:
      print(
        f"{number(r[key]):8.0f} {100 * number(r[key]) / max(total, 1):5.1f}%  "
        + " | ".join(r[i] for i in columns[1:])
        + "  "
        + r[source][:110]
      )


def tile_phases(trace: dict) -> dict:
  """A Mosaic GPU profiler trace (Perfetto JSON: "B" / "E" events with name, ts in kcyc, pid = SM, tid = one
  warpgroup of one CTA) summarized: {"phases": {name: [durations of its outermost ranges]}, "between": [gaps from
  one range's end to the next range's begin on a warpgroup], "span": {tid: last end - first begin}, "sm_span":
  {pid: the SM's last end - its first begin}, "by_warpgroup": {name: {warpgroup: durations}}}. Ranges nested inside
  another (a scope re-entered in a loop body) count toward the outer one only. The dump numbers the traces
  1 + warpgroup + kernel.WARPGROUPS x CTA, so a range's warpgroup is (tid - 1) % kernel.WARPGROUPS."""
  by_tid = collections.defaultdict(list)
  for event in trace["traceEvents"]:
    by_tid[event["tid"]].append(event)
  phases, between, span, sm_bounds = collections.defaultdict(list), [], {}, {}
  by_warpgroup = collections.defaultdict(lambda: collections.defaultdict(list))
  for tid, events in by_tid.items():
    events.sort(key=lambda e: e["ts"])  # per warpgroup the clock is monotone (the dump enforces it)
    stack, last_end = [], None
    for event in events:
      if event["ph"] == "B":
        if not stack and last_end is not None:
          between.append(event["ts"] - last_end)
        stack.append(event)
      else:
        begin = stack.pop()
        if not stack:
          duration = event["ts"] - begin["ts"]
          phases[begin["name"]].append(duration)
          by_warpgroup[begin["name"]][(tid - 1) % kernel.WARPGROUPS].append(duration)
          last_end = event["ts"]
    span[tid] = events[-1]["ts"] - events[0]["ts"]
    lo, hi = sm_bounds.get(events[0]["pid"], (events[0]["ts"], events[-1]["ts"]))
    sm_bounds[events[0]["pid"]] = min(lo, events[0]["ts"]), max(hi, events[-1]["ts"])
  sm_span = {pid: hi - lo for pid, (lo, hi) in sm_bounds.items()}
  by_warpgroup = {name: dict(sorted(per.items())) for name, per in by_warpgroup.items()}
  return {"phases": dict(phases), "between": between, "span": span, "sm_span": sm_span, "by_warpgroup": by_warpgroup}


def phase_table(summary: dict, tiles: int | None = None) -> str:
  """The busiest warpgroup's span and the busiest / mean SM span, then per phase: ranges, median and mean kcyc, and
  their sum over all warpgroups as a share of the summed spans (where the warpgroups' time goes). Given the case's
  `tiles`, a first line says when the trace holds fewer "close" ranges than 2 per tile (one per consumer): the
  profiler's SMEM buffer was too small and dropped the rest, so spans and the tail undercount."""
  total_span = sum(summary["span"].values())
  rows = [*summary["phases"].items(), ("(between ranges)", summary["between"])]
  sm_span = list(summary["sm_span"].values())
  lines = [
    f"warpgroups {len(summary['span'])}, busiest span {max(summary['span'].values()):.1f} kcyc; "
    f"SMs {len(sm_span)}, busiest / mean SM span {max(sm_span) / statistics.mean(sm_span):.3f}"
  ]
  closes = len(summary["phases"].get("close", []))
  if tiles is not None and closes < 2 * tiles:
    lines.insert(0, f"TRACE CUT SHORT: {closes} of {2 * tiles} tile closes recorded (profiler buffer full)")

  def line(label, durations):
    return (
      f"  {label:18s} n={len(durations):6d}  median {statistics.median(durations):7.2f} kcyc  "
      f"mean {statistics.mean(durations):7.2f} kcyc  share {sum(durations) / max(total_span, 1e-9):6.1%}"
    )

  for name, durations in rows:
    if durations:
      lines.append(line(name, durations))
      per_warpgroup = summary["by_warpgroup"].get(name, {})  # "(between ranges)" has none
      if len(per_warpgroup) > 1:  # each consumer's own: the two differ where one waits for the other
        lines += [line(f"  wg{wg}", d) for wg, d in per_warpgroup.items()]
  return "\n".join(lines)


@without_traced_checks  # production dispatch: no checkify effects in the timed programs
def main():
  if sys.argv[1] == "--sass-top":
    return sass_top(sys.argv[2])
  phases_dir = sys.argv[3] if sys.argv[2:3] == ["--phases"] else None
  heads, head_dim = 32, 128
  for case in sys.argv[1].split(","):
    length, percent, *rest = case.split(":")
    kv_heads, variant = (rest + ["8", "default"][len(rest) :])[:2]
    if variant not in VARIANTS:
      raise SystemExit(f"case {case!r}: variant {variant!r} not in {sorted(VARIANTS)}")
    length, percent, kv_heads = int(length), int(percent), int(kv_heads)
    config = kernel.ForwardConfig(**VARIANTS[variant])
    if phases_dir:
      case_dir = os.path.join(phases_dir, case.replace(":", "-"))
      os.makedirs(case_dir, exist_ok=True)
      config = dataclasses.replace(config, profile_dir=case_dir)
    ks = jax.random.split(jax.random.key(length + percent), 4)
    q = jax.random.normal(ks[0], (1, length, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, length, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, length, kv_heads, head_dim), jnp.bfloat16)
    layout = fixed_density_layout(ks[3], batch=1, heads=heads, length=length, density=percent / 100)
    geometry = Geometry.from_lengths(jnp.array([length], jnp.int32), jnp.array([length], jnp.int32))
    call = jax.jit(direct_call(kernel.block_sparse_attention, geometry, config))
    compiled = call.lower(q, k, v, layout).compile()
    jax.block_until_ready((q, k, v, layout))
    out = jax.block_until_ready(compiled(q, k, v, layout))
    tiles = int(layout.counts.size)
    visits = int(layout.counts.sum())
    print(
      f"case T={length} K={kv_heads} density={percent}% {variant}: {tiles} tiles (head, query block), "
      f"{visits} visited blocks, {visits / tiles:.2f} per tile, "
      f"output finite: {bool(jnp.isfinite(out.astype(jnp.float32)).all())}",
      flush=True,
    )
    if phases_dir:
      trace_file = sorted(glob.glob(os.path.join(case_dir, "*-trace.json")))[-1]  # <time_ns>-trace.json per call
      with open(trace_file) as f:
        print(phase_table(tile_phases(json.load(f)), tiles=tiles), flush=True)


if __name__ == "__main__":
  main()
