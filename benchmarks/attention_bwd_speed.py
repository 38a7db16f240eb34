"""Attention backward speed on one GPU: dense cuDNN fwd+bwd vs our block-sparse fwd+bwd at fixed densities.

    python benchmarks/attention_bwd_speed.py --lengths 8192,32768,131072 --tag 8k-128k

Shapes: B=1, 32 query heads, 8 kv heads, head dim 128, bf16, causal (flags change them). Per length, in one process:

    dense fwd+bwd     jax.vjp of jax.nn.dot_product_attention(implementation="cudnn") and its pullback of a random dO
    dense bwd         the pullback alone (residuals from a forward run beforehand)
    sparse fwd+bwd    the same for xattn_jax.block_sparse_attention (implementation pallas_mosaic_gpu, else xla) on a
    sparse bwd        fixed-density causal layout (`benchmarks.common.fixed_density_layout`: the diagonal block plus
                      random allowed blocks, d of the causal blocks), densities --densities percent

Each entry is the median of --repeats timed calls after warm-up (`benchmarks.common.timed`). Ratios are to the dense
time of the same direction. TFLOP/s count matmul FLOPs: forward 4 * H per (query, key) pair, backward 2.5 times that
(5 matmuls of the same size for 2). Writes <out-dir>/attention_bwd_speed/<card>/<date>-<tag>.json and .md (after
every row, so a run stopped early keeps what it measured).
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
from benchmarks.common import BLOCK, fixed_density_layout, rel_err, timed
from benchmarks.result_files import add_output_args, csv_of, metadata, write_result

SCRIPT = "attention_bwd_speed"

BWD_FLOP_FACTOR = 2.5  # dS, dP, dQ, dK, dV recompute S and take 5 matmuls of the forward's size where it takes 2


def pair_flops(pairs: float, head_dim: int) -> float:
  """Forward matmul FLOPs of `pairs` (query, key) pairs: S = Q K^T and O = P V, 2 * H each."""
  return 4.0 * head_dim * pairs


def vjp_fns(attention):
  """(fwd+bwd, fwd, bwd) jitted for attention(q, k, v, *extra): forward and pullback of dO in one call; the forward
  returning the pullback (a pytree of residuals); the pullback alone. `extra` (e.g. the block layout) are jit
  arguments, not constants: XLA would otherwise constant-fold the layout's transposes at compile time."""

  def fwd_bwd(q, k, v, d_out, *extra):
    _, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, *extra), q, k, v)
    return pullback(d_out)

  forward = jax.jit(lambda q, k, v, *extra: jax.vjp(lambda q, k, v: attention(q, k, v, *extra), q, k, v)[1])
  backward = jax.jit(lambda pullback, d_out: pullback(d_out))
  return jax.jit(fwd_bwd), forward, backward


def run(args, argv=None, checkpoint=lambda result: None) -> dict:
  """checkpoint(partial result) is called after every row, so a run stopped early keeps what it measured."""
  rows = []
  meta = metadata(SCRIPT, argv)

  def result():
    return dict(meta, rows=rows, heads=N, kv_heads=K, head_dim=H, implementation=list(args.implementation))

  key = jax.random.key(args.seed)
  N, K, H = args.heads, args.kv_heads, args.head_dim

  def record(shape, what, density, t, base, flops, note=""):
    entry = dict(shape, what=what, density=density, **t, ratio=t["ms"] / base["ms"], tflops=flops / t["ms"] / 1e9)
    rows.append(entry)
    print(
      f"{shape['T']:>7} {what:<22} d={density:5.3f} {t['ms']:9.3f} ms  {entry['ratio']:.3f}x dense  "
      f"{entry['tflops']:.0f} TFLOP/s {note}",
      flush=True,
    )
    checkpoint(result())

  for length in args.lengths:
    shape = dict(B=1, T=length, N=N, K=K, H=H)
    kq, kk, kv, ko, kl = jax.random.split(jax.random.fold_in(key, length), 5)
    q = jax.random.normal(kq, (1, length, N, H), jnp.bfloat16)
    k = jax.random.normal(kk, (1, length, K, H), jnp.bfloat16)
    v = jax.random.normal(kv, (1, length, K, H), jnp.bfloat16)
    d_out = jax.random.normal(ko, (1, length, N, H), jnp.bfloat16)
    causal_pairs = N * length * (length + 1) / 2
    dense = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=args.dense_implementation
    )
    dense_fwd_bwd, dense_fwd, dense_bwd = vjp_fns(dense)
    base_all = timed(dense_fwd_bwd, q, k, v, d_out, repeats=args.repeats)
    base_bwd = timed(dense_bwd, dense_fwd(q, k, v), d_out, repeats=args.repeats)
    name = args.dense_implementation
    record(shape, f"dense {name} fwd+bwd", 1.0, base_all, base_all, (1 + BWD_FLOP_FACTOR) * pair_flops(causal_pairs, H))
    record(shape, f"dense {name} bwd", 1.0, base_bwd, base_bwd, BWD_FLOP_FACTOR * pair_flops(causal_pairs, H))
    want = dense_fwd_bwd(q, k, v, d_out) if length <= args.check_max_length else None
    for d in args.densities:
      layout = fixed_density_layout(kl, batch=1, heads=N, length=length, density=d / 100)
      sparse = lambda q, k, v, layout: xa.block_sparse_attention(
        q, k, v, layout, causal=True, implementation=args.implementation
      )
      sparse_fwd_bwd, sparse_fwd, sparse_bwd = vjp_fns(sparse)
      real_d = float(layout.density())
      pairs = float(jnp.sum(layout.counts)) * BLOCK * BLOCK
      t_all = timed(sparse_fwd_bwd, q, k, v, d_out, layout, repeats=args.repeats)
      note = ""
      if d == 100 and want is not None:  # all causal blocks: the same gradients as cuDNN's
        got = sparse_fwd_bwd(q, k, v, d_out, layout)
        errs = [rel_err(a, b) for a, b in zip(got, want)]
        note = "rel err vs dense (dq, dk, dv) " + ", ".join(f"{e:.1e}" for e in errs)
      record(shape, "sparse fwd+bwd", real_d, t_all, base_all, (1 + BWD_FLOP_FACTOR) * pair_flops(pairs, H), note)
      if note:
        rows[-1]["rel_err_vs_dense"] = errs
      t_bwd = timed(sparse_bwd, sparse_fwd(q, k, v, layout), d_out, repeats=args.repeats)
      record(shape, "sparse bwd", real_d, t_bwd, base_bwd, BWD_FLOP_FACTOR * pair_flops(pairs, H))
  return result()


def to_markdown(result: dict) -> str:
  lines = [
    f"# Attention backward speed: {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    f"B=1, {result['heads']} query heads, {result['kv_heads']} kv heads, head dim {result['head_dim']}, bf16, "
    f"causal; sparse = {','.join(result['implementation'])}. ms = median; ratio = time / dense time of the same "
    "direction (fwd+bwd or bwd) and shape in the same process; TFLOP/s of matmul FLOPs (bwd = 2.5 x fwd).",
    "",
    "| T | what | density | ms | spread ms | ratio | TFLOP/s | note |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    note = (
      "" if "rel_err_vs_dense" not in r else "rel err dq/dk/dv " + ", ".join(f"{e:.1e}" for e in r["rel_err_vs_dense"])
    )
    lines.append(
      f"| {r['T']} | {r['what']} | {r['density']:.3f} | {r['ms']:.3f} | {r['spread_ms']:.3f} | "
      f"{r['ratio']:.3f} | {r['tflops']:.0f} | {note} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ints = csv_of(int)
  parser.add_argument("--lengths", type=ints, default=[8192, 32768, 131072])
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--densities", type=ints, default=[5, 10, 25, 50, 100])
  parser.add_argument(
    "--implementation",
    type=lambda s: tuple(s.split(",")),
    default=("pallas_mosaic_gpu", "xla"),
    help="backends tried in order (comma separated), forward and backward",
  )
  parser.add_argument("--dense-implementation", default="cudnn", help="jax.nn.dot_product_attention implementation")
  parser.add_argument(
    "--check-max-length",
    type=int,
    default=32768,
    help="compare the 100%% layout's gradients with the dense ones up to this length",
  )
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  add_output_args(parser)
  parser.add_argument(
    "--traced-checks", choices=["on", "off"], default="off", help="xattn_jax's checkify value checks in the traced ops"
  )
  args = parser.parse_args(argv)
  if args.repeats < 20:
    print("note: fewer than 20 repeats; the results are not for the record", file=sys.stderr)

  def write(result):
    return write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)

  with xa.traced_checks(args.traced_checks == "on"):  # restored on return (the script's main is also called in tests)
    result = run(args, argv, checkpoint=write)
  stem = write(result)
  print(to_markdown(result))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
