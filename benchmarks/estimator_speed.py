"""Estimator time per estimator (SPEC §1.7) and stride against dense cuDNN attention timed in the same process.

    python benchmarks/estimator_speed.py --lengths 32768,131072 --strides 8,16 --tag estimators

B = 1, 32 query / 8 kv heads, head dim 128, bf16, causal, random normal inputs, the default backend (Mosaic GPU on a
Hopper GPU). Each row: `xa.antidiagonal_scores` in ms (median of --repeats waited-for calls), its ratio to cuDNN and
to the paper's estimator at the same stride and length. --profile adds where one call's device time goes
(`benchmarks.common.device_op_times`: the Mosaic GPU kernel against the XLA ops around it, such as the combine of the
kernel's per-row partial sums). --configs times the Mosaic GPU kernel (with its combine) called directly with other
`ScoresConfig`s of the paper's estimator in the same process (e.g. `--configs default,cluster-heads-2,key-splits-2`),
each row with its largest difference from the default config's scores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import BLOCK, device_op_times, timed_per_call, without_traced_checks
from benchmarks.result_files import add_output_args, csv_of, write_result
from xattn_jax.geometry import Geometry

SCRIPT = "estimator_speed"
ESTIMATORS = [e.value for e in xa.Estimator]
CONFIGS = {  # ScoresConfig fields of the Mosaic GPU kernel per --configs name
  "default": {},  # 2-CTA clusters where the GQA group is even, 2 key splits
  "single": {"cluster_heads": 1, "key_splits": 1},  # the default before 2026-12-07: one CTA per row block and head
  "cluster-heads-2": {"cluster_heads": 2, "key_splits": 1},  # two query heads' CTAs share each K chunk (multicast)
  "key-splits-2": {"cluster_heads": 1, "key_splits": 2},
  "cluster-2-splits-2": {"cluster_heads": 2, "key_splits": 2},
  "stages-3": {"num_stages": 3},
  "block-n-128": {"block_n": 128},
}


def timing_row(length: int, stride: int, t: dict, dense_ms: float, **fields) -> dict:
  """One result row: the case, `timed_per_call`'s times and their share of dense, then the row kind's own fields."""
  return dict(
    length=length,
    stride=stride,
    ms=t["ms"],
    min_ms=t["min_ms"],
    dense_ms=dense_ms,
    of_dense=t["ms"] / dense_ms,
    **fields,
  )


def config_rows(
  q, k, *, length: int, stride: int, dense_ms: float, names: list[str], repeats: int, in_jit: int = 1
) -> list[dict]:
  """The kernel module's entry point with each named ScoresConfig (paper's estimator, causal, block 128)."""
  from xattn_jax.pallas_kernels import antidiagonal_mosaic_gpu as kernel

  geometry = Geometry.from_lengths(jnp.array([q.shape[1]], jnp.int32), jnp.array([k.shape[1]], jnp.int32))
  rows, base = [], None
  for name in names:
    config = kernel.ScoresConfig(**CONFIGS[name])
    fn = jax.jit(
      lambda q, k, c=config: kernel.antidiagonal_scores(
        q, k, geometry, stride=stride, block_size=BLOCK, causal=True, scale=q.shape[-1] ** -0.5, config=c
      )
    )
    scores = fn(q, k)
    base = scores if base is None else base
    t = timed_per_call(fn, q, k, repeats=repeats, in_jit=in_jit)
    diff = float(jnp.max(jnp.abs(scores - base)))
    of_default = t["ms"] / rows[0]["ms"] if rows else 1.0
    rows.append(timing_row(length, stride, t, dense_ms, config=name, of_default=of_default, max_diff=diff))
    print(
      f"{length:>7} s={stride:<2} config {name:<16} {t['ms']:8.3f} ms  {t['ms'] / dense_ms:6.1%} of cuDNN  "
      f"{rows[-1]['of_default']:5.2f}x the default  max |diff| {diff:.1e}",
      flush=True,
    )
  return rows


def run(args) -> dict:
  rows, config_table = [], []
  for length in args.lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(keys[0], (1, length, args.heads, args.head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, length, args.kv_heads, args.head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, length, args.kv_heads, args.head_dim), jnp.bfloat16)
    dense = jax.jit(
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=args.dense_implementation)
    )
    dense_ms = timed_per_call(dense, q, k, v, repeats=args.repeats, in_jit=args.in_jit)["ms"]
    for stride in args.strides:
      paper_ms = None
      for estimator in ESTIMATORS:
        fn = jax.jit(lambda q, k, s=stride, e=estimator: xa.antidiagonal_scores(q, k, stride=s, estimator=e))
        t = timed_per_call(fn, q, k, repeats=args.repeats, in_jit=args.in_jit)
        paper_ms = paper_ms or t["ms"]
        rows.append(timing_row(length, stride, t, dense_ms, estimator=estimator, of_paper=t["ms"] / paper_ms))
        print(
          f"{length:>7} s={stride:<2} {estimator:<12} {t['ms']:8.3f} ms  {t['ms'] / dense_ms:6.1%} of cuDNN "
          f"({dense_ms:.2f} ms)  {t['ms'] / paper_ms:5.2f}x the paper's",
          flush=True,
        )
        if args.profile:
          ops = device_op_times(fn, q, k, top=8)
          rows[-1]["profile"] = ops
          for op in ops:
            print(f"{'':>10} {op['line']:<10} {op['ms']:8.3f} ms x{op['count']:g}  {op['name'][:90]}", flush=True)
      if args.configs:
        config_table += config_rows(
          q,
          k,
          length=length,
          stride=stride,
          dense_ms=dense_ms,
          names=args.configs,
          repeats=args.repeats,
          in_jit=args.in_jit,
        )
  return dict(
    shape=dict(B=1, N=args.heads, K=args.kv_heads, H=args.head_dim, dtype="bfloat16", causal=True),
    repeats=args.repeats,
    in_jit=args.in_jit,
    rows=rows,
    configs=config_table,
  )


def to_markdown(result: dict) -> str:
  shape = result["shape"]
  lines = [
    f"# Estimator time: {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"`{result['command']}`",
    "",
    f"B={shape['B']}, N={shape['N']}, K={shape['K']}, H={shape['H']}, {shape['dtype']}, causal; median of "
    f"{result['repeats']} waited-for calls"
    + (
      f" of {result['in_jit']} calls chained in one jitted program, divided by {result['in_jit']}"
      if result.get("in_jit", 1) > 1
      else ""
    )
    + "; dense = cuDNN in the same process."
    + (f" Note: {result['note']}" if result.get("note") else ""),
    "",
    "| T | stride | estimator | ms | of cuDNN | vs the paper's |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['length']} | {r['stride']} | {r['estimator']} | {r['ms']:.3f} | {r['of_dense']:.1%} | "
      f"{r['of_paper']:.2f}x |"
    )
  profiled = [r for r in result["rows"] if r.get("profile")]
  if profiled:
    lines += [
      "",
      "One traced call per row, its device ops (ms):",
      "",
      "| T | stride | estimator | op | ms |",
      "|---|---|---|---|---|",
    ]
    for r in profiled:
      for op in r["profile"]:
        lines.append(f"| {r['length']} | {r['stride']} | {r['estimator']} | {op['name'][:80]} | {op['ms']:.3f} |")
  if result.get("configs"):
    lines += [
      "",
      "The Mosaic GPU kernel (and its combine) called directly per ScoresConfig, paper's estimator; max |diff| = the "
      "largest difference from the default config's scores:",
      "",
      "| T | stride | config | ms | of cuDNN | vs default | max abs diff |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in result["configs"]:
      lines.append(
        f"| {r['length']} | {r['stride']} | {r['config']} | {r['ms']:.3f} | {r['of_dense']:.1%} | "
        f"{r['of_default']:.2f}x | {r['max_diff']:.1e} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=csv_of(int), default=[32768, 131072])
  p.add_argument("--strides", type=csv_of(int), default=[8, 16])
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--in-jit", type=int, default=1, help="time N chained calls in one jitted program, per call")
  p.add_argument("--profile", action="store_true", help="also trace one call: the device time of each op")
  p.add_argument(
    "--configs",
    type=csv_of(str),
    default=[],
    help=f"Mosaic GPU ScoresConfig variants to time directly, the first as the reference: {', '.join(CONFIGS)}",
  )
  p.add_argument("--dense-implementation", default="cudnn", help="jax.nn.dot_product_attention's (None: XLA)")
  add_output_args(p, tag="estimators")
  args = p.parse_args(argv)
  unknown = sorted(set(args.configs) - set(CONFIGS))
  if unknown:
    p.error(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
  if args.dense_implementation == "None":
    args.dense_implementation = None
  result = without_traced_checks(run)(args)
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  print(f"wrote {stem}.json / .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
