"""How evenly the forward kernel's persistent CTAs share the tiles, per tile order and scheduler (CPU only).

    python benchmarks/simulate_tile_schedule.py --lengths 8192,16384,32768 --densities 10,25,100

A kernel call lasts as long as its busiest CTA, so the ratio busiest / mean CTA work is the time lost to the
schedule. Each tile (one layout row) costs `--tile-cost` + `--block-cost` x its blocks, in thousands of SM cycles;
the defaults are the fit to the Mosaic GPU profiler's phases on an H100 (notes_attention_mosaic_gpu.md, "The tile
phases, profiled": 5.0 per tile for its opening, epilogue and loop switch, 2.82 per visited block). Layouts as in
profile_attention_tiles.py (fixed density, B = 1, 32 query heads, 8 kv heads). The orders are the kernel's own
`tile_coords`; the schedulers:
- snake: CTA c of G takes positions c, 2G - 1 - c, 2G + c, ... (static; the kernel's own `snake_position`);
- counter: the next position goes to the CTA that finishes first (the kernel's GMEM tile counter; the producer
  claims when it has issued the current tile's loads, about two blocks before the end, which simulates the same as
  claiming at the end).
"""

from __future__ import annotations

import argparse
import heapq
import pathlib
import sys

import jax
import numpy as np

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.common import fixed_density_layout
from benchmarks.result_files import csv_of
from xattn_jax.pallas_kernels.block_sparse_attention_mosaic_gpu import snake_position, tile_coords
from xattn_jax.pallas_kernels.common import TileOrder


def ordered_counts(counts: np.ndarray, order: TileOrder, group: int) -> np.ndarray:
  """counts [B, N, nQb] in the kernel's tile order (position t -> the row's block count)."""
  batch, heads, nqb = counts.shape
  t = np.arange(counts.size, dtype=np.int32)
  b, r, n = (np.asarray(x) for x in tile_coords(t, order, batch=batch, num_heads=heads, num_q_blocks=nqb, group=group))
  return counts[b, n, r]


def cta_work(costs: np.ndarray, ctas: int, scheduler: str) -> np.ndarray:
  """Each CTA's summed tile cost when `ctas` CTAs take the tiles (costs in position order) by `scheduler`."""
  if scheduler == "snake":
    rounds = np.arange(-(-len(costs) // ctas), dtype=np.int32)[:, None]
    t = np.asarray(snake_position(rounds, np.arange(ctas, dtype=np.int32)[None, :], ctas))  # [round, CTA]
    return np.where(t < len(costs), np.asarray(costs)[np.minimum(t, len(costs) - 1)], 0.0).sum(axis=0)
  work = np.zeros(ctas)
  free = [(0.0, c) for c in range(ctas)]  # (time the CTA asks for its next tile, CTA)
  for cost in costs:
    at, c = heapq.heappop(free)
    work[c] += cost
    heapq.heappush(free, (at + cost, c))
  return work


def main(argv=None):
  ints = csv_of(int)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=ints, default=[8192, 16384, 32768])
  parser.add_argument("--densities", type=ints, default=[10, 25, 100])
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--ctas", type=int, default=132)
  parser.add_argument("--tile-cost", type=float, default=5.0)
  parser.add_argument("--block-cost", type=float, default=2.82)
  args = parser.parse_args(argv)
  heads = 32
  schedules = [(order, scheduler) for order in TileOrder for scheduler in ("snake", "counter")]
  print("| T | density | tiles per CTA | " + " | ".join(f"{o.value} {s}" for o, s in schedules) + " |")
  print("|---|---|---|" + "---|" * len(schedules))
  for length in args.lengths:
    for percent in args.densities:
      key = jax.random.split(jax.random.key(length + percent), 4)[3]  # profile_attention_tiles.py's layout
      layout = fixed_density_layout(key, batch=1, heads=heads, length=length, density=percent / 100)
      counts = np.asarray(layout.counts)
      ratios = []
      for order, scheduler in schedules:
        costs = args.tile_cost + args.block_cost * ordered_counts(counts, order, heads // args.kv_heads)
        work = cta_work(costs, args.ctas, scheduler)
        ratios.append(f"{work.max() / work.mean():.3f}")
      print(f"| {length} | {percent}% | {counts.size / args.ctas:.1f} | " + " | ".join(ratios) + " |", flush=True)


if __name__ == "__main__":
  main()
