"""Kernel variants of the sparse attention side by side, and where the public op's device time goes.

    python benchmarks/attention_variants.py --lengths 32768 --kv-heads 8,32 --densities 5,10,100 \
        --variants default,head,per-row --pipeline 1,10 --rounds 3

For each (length, kv heads, density) case, on the fixed-density layouts of `benchmarks.common` (B=1, 32 query heads,
head dim 128, bf16, causal): dense cuDNN, the public op, and the kernel called directly with each --variants
ForwardConfig (default; snake = the static head-major snake, the default before the tile counter; head, rows = that
tile_order; per-row = one CTA per layout row; smem = P through SMEM), with --other-module the same variants of a
second kernel module ("other <variant>": an earlier or candidate version), timed in `--rounds` interleaved rounds
(a slow drift of the card's clock shows as a spread between rounds, not as a difference between variants). Each
timing is `benchmarks.common.timed` at every --pipeline value.

--trace adds, per case, a profiler trace of 5 calls of the public op: every device kernel's name and mean duration,
and the device span per call (first kernel start to last kernel end), so that the XLA prologue around the Mosaic
kernel and the host dispatch can be told apart. --module swaps in another kernel module with the same API (to time
an earlier version in the same run). Writes <out-dir>/attention_variants/<card>/<date>-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import pathlib
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import chained_in_one_jit, fixed_density_layout, rel_err, timed, without_traced_checks
from benchmarks.result_files import add_output_args, csv_of, metadata, write_result
from xattn_jax.geometry import Geometry

SCRIPT = "attention_variants"

VARIANTS = {
  "default": {},
  "snake": {"tile_order": "head", "tile_scheduler": "snake"},  # the default before the tile counter (v4)
  "head": {"tile_order": "head"},
  "rows": {"tile_order": "rows"},
  "per-row": {"num_ctas": None},
  "smem": {"pv_operand": "smem"},
}


def device_kernels(fn, *args, calls: int = 5) -> tuple[dict, float]:
  """Runs `calls` calls under the profiler: {kernel name: (launches per call, mean us)}, mean device span per call."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    events = []
    for path in glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True):
      for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
          continue
        for line in plane.lines:
          if "Stream" in line.name and "Memcpy" not in line.name:
            events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
  if not events:
    raise RuntimeError("the profiler trace holds no GPU kernel events")
  by_name = collections.defaultdict(list)
  for _, duration, name in events:
    by_name[name].append(duration / 1e3)
  kernels = {name: (len(d) / calls, statistics.mean(d)) for name, d in by_name.items()}
  events.sort()
  # Calls are waited for one by one, so a gap longer than any call's own gaps separates them: split at the
  # calls - 1 largest gaps.
  gaps = sorted(range(1, len(events)), key=lambda i: events[i][0] - events[i - 1][0] - events[i - 1][1])[-(calls - 1) :]
  bounds = [0, *sorted(gaps), len(events)]
  spans = [(events[hi - 1][0] + events[hi - 1][1] - events[lo][0]) / 1e6 for lo, hi in zip(bounds, bounds[1:])]
  return kernels, statistics.median(spans)


def to_markdown(result: dict) -> str:
  pipeline = result["pipeline"]
  lines = [
    f"# Sparse attention variants: {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    f"Kernel module {result['module']}. ms = median of {result['repeats']} samples per round, rounds separated "
    "by '/'; pipeline p = p back-to-back calls per sample (1 includes the host dispatch). Traced checks off."
    + (
      f" Each call is one of {result['in_jit']} chained calls in one jitted program, time / {result['in_jit']}."
      if result.get("in_jit", 1) > 1
      else ""
    )
    + " rel err: the output's relative error to the default kernel's on the same input."
    + (f" Rows 'other <variant>': module {result['other_module']}." if result.get("other_module") else "")
    + (f" Note: {result['note']}" if result.get("note") else ""),
    "",
    "| T | K | density | what | "
    + " | ".join(f"pipeline {p}: ms per round" for p in pipeline)
    + " | ratio to cuDNN | rel err |",
    "|---|---|---|---|" + "---|" * len(pipeline) + "---|---|",
  ]
  lines += [table_line(row, len(pipeline)) for row in result["rows"]]
  return "\n".join(lines) + "\n"


def table_line(row: dict, pipelines: int) -> str:
  """A row of the table: a timed call (ms per round at each pipeline value), a trace's device span per call, or one
  device kernel of the trace."""
  case = f"| {row['T']} | {row['K']} | {row['percent']}% |"
  if "ms" in row:
    cells = [" / ".join(f"{t:.3f}" for t in per_round) for per_round in row["ms"]]
    err = f"{row['rel_err_vs_default']:.1e}" if "rel_err_vs_default" in row else ""
    return f"{case} {row['what']} | " + " | ".join(cells) + f" | {row['ratio']:.3f} | {err} |"
  if "span_ms" in row:
    return f"{case} {row['what']} | {row['span_ms']:.3f} ms |" + " |" * (pipelines + 1)
  kernel = f"device kernel {row['kernel'][:60]} x{row['per_call']:g}"
  return f"| | | | {kernel} | {row['us']:.1f} us |" + " |" * (pipelines + 1)


@without_traced_checks  # production dispatch: no checkify effects in the timed programs
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ints = csv_of(int)
  parser.add_argument("--lengths", type=ints, default=[32768])
  parser.add_argument("--kv-heads", type=ints, default=[8, 32])
  parser.add_argument("--densities", type=ints, default=[5, 10, 100])
  parser.add_argument("--variants", type=csv_of(str), default=["default", "head", "per-row"])
  parser.add_argument("--pipeline", type=ints, default=[1, 10])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--in-jit", type=int, default=1, help="N > 1: N chained calls in one jitted program, time / N")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--trace", action="store_true")
  parser.add_argument("--module", default="xattn_jax.pallas_kernels.block_sparse_attention_mosaic_gpu")
  parser.add_argument("--other-module", default="", help="a second kernel module: its --variants too, as 'other <v>'")
  add_output_args(parser, tag="variants")
  args = parser.parse_args(argv)
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f"--variants {sorted(unknown)} not in {sorted(VARIANTS)}")
  kernel = importlib.import_module(args.module)
  modules = {"kernel": kernel, **({"other": importlib.import_module(args.other_module)} if args.other_module else {})}
  heads, head_dim = 32, 128
  rows = []
  result = dict(
    metadata(SCRIPT, argv),
    module=args.module,
    other_module=args.other_module,
    repeats=args.repeats,
    rounds=args.rounds,
    pipeline=args.pipeline,
    in_jit=args.in_jit,
    rows=rows,
  )

  def record(row):
    rows.append(row)
    print(table_line(row, len(args.pipeline)), flush=True)

  key = jax.random.key(0)
  for length in args.lengths:
    for kv_heads in args.kv_heads:
      ks = jax.random.split(jax.random.fold_in(key, length * 1000 + kv_heads), 4)
      q = jax.random.normal(ks[0], (1, length, heads, head_dim), jnp.bfloat16)
      k = jax.random.normal(ks[1], (1, length, kv_heads, head_dim), jnp.bfloat16)
      v = jax.random.normal(ks[2], (1, length, kv_heads, head_dim), jnp.bfloat16)
      geometry = Geometry.from_lengths(jnp.array([length], jnp.int32), jnp.array([length], jnp.int32))
      dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
      for percent in args.densities:
        case = dict(T=length, K=kv_heads, percent=percent)
        layout = fixed_density_layout(ks[3], batch=1, heads=heads, length=length, density=percent / 100)
        calls = {
          "dense cudnn": (dense, (q, k, v)),
          "public op": (
            jax.jit(
              lambda q, k, v, layout: xa.block_sparse_attention(
                q, k, v, layout, causal=True, implementation="pallas_mosaic_gpu"
              )
            ),
            (q, k, v, layout),
          ),
        }
        for prefix, module in modules.items():
          for name in args.variants:
            config = module.ForwardConfig(**VARIANTS[name])
            calls[f"{prefix} {name}"] = (
              jax.jit(direct_call(module.block_sparse_attention, geometry, config)),
              (q, k, v, layout),
            )
        outputs = {name: fn(*fn_args) for name, (fn, fn_args) in calls.items() if name.split()[0] in modules}
        reference = outputs.get("kernel default")  # without the default variant there is nothing to compare to
        errors = {} if reference is None else {name: rel_err(out, reference) for name, out in outputs.items()}
        if args.in_jit > 1:
          calls = {name: (chained_in_one_jit(fn, args.in_jit), fn_args) for name, (fn, fn_args) in calls.items()}
        times = {name: {p: [] for p in args.pipeline} for name in calls}
        for _ in range(args.rounds):
          for name, (fn, fn_args) in calls.items():
            for p in args.pipeline:
              times[name][p].append(timed(fn, *fn_args, repeats=args.repeats, pipeline=p)["ms"] / args.in_jit)
        base = statistics.median(times["dense cudnn"][args.pipeline[0]])
        for name in calls:
          record(
            dict(
              case,
              what=name,
              ms=[times[name][p] for p in args.pipeline],
              ratio=statistics.median(times[name][args.pipeline[0]]) / base,
              **({"rel_err_vs_default": errors[name]} if name in errors else {}),
            )
          )
        if args.trace:
          fn, fn_args = calls["public op"]
          kernels, span = device_kernels(fn, *fn_args)
          record(dict(case, what="public op, device span per call", span_ms=span))
          for name, (per_call, us) in sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
            record(dict(case, kernel=name, per_call=per_call, us=us))
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  print(f"wrote {stem}.json, .md")
  return 0


def direct_call(fn, geometry, config):
  """The kernel's entry point with the layout's geometry and a config, returning only the output."""
  return lambda q, k, v, layout: fn(q, k, v, layout, geometry, causal=True, scale=q.shape[-1] ** -0.5, config=config)[0]


if __name__ == "__main__":
  sys.exit(main())
