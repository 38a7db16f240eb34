"""`xattn-jax` command line. Subcommands:

  op    run the public op on LLM-like synthetic inputs (xattn_jax.synthetic) next to dense attention and print
        density, error and time; runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import xattn_jax as xa
from xattn_jax.synthetic import llm_like_qkv


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _op(args) -> int:
  dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[args.dtype]
  q, k, v = llm_like_qkv(jax.random.key(args.seed), batch=args.batch, seq_len=args.seq_len, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=dtype)
  config = xa.XAttentionConfig(stride=args.stride, threshold=args.threshold, block_size=args.block_size,
                               implementation=args.implementation)
  sparse = jax.jit(lambda q, k, v: xa.xattention(
      q, k, v, is_causal=True, threshold=config.threshold, stride=config.stride, block_size=config.block_size,
      implementation=config.implementation, return_block_layout=True))
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  out, layout = sparse(q, k, v)
  ref = dense(q, k, v)
  err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
  t_sparse = _time(sparse, q, k, v, repeats=args.repeats)
  t_dense = _time(dense, q, k, v, repeats=args.repeats)
  print(f"device: {jax.devices()[0].device_kind}   jax {jax.__version__}")
  print(f"shape: B={args.batch} T=S={args.seq_len} N={args.heads} K={args.kv_heads} H={args.head_dim} {args.dtype}, "
        f"causal, stride={args.stride}, threshold={args.threshold}")
  print(f"{'':12}{'time (ms)':>12}{'density':>10}{'rel. error':>12}")
  print(f"{'dense':12}{t_dense * 1e3:12.2f}{1.0:10.3f}{0.0:12.2e}")
  print(f"{'xattention':12}{t_sparse * 1e3:12.2f}{float(layout.density()):10.3f}{err:12.2e}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="xattn-jax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  op = sub.add_parser("op", help="run xattention on synthetic LLM-like inputs next to dense attention")
  op.add_argument("--seq-len", type=int, default=4096)
  op.add_argument("--batch", type=int, default=1)
  op.add_argument("--heads", type=int, default=8)
  op.add_argument("--kv-heads", type=int, default=2)
  op.add_argument("--head-dim", type=int, default=64)
  op.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="f32")
  op.add_argument("--stride", type=int, default=8)
  op.add_argument("--threshold", type=float, default=0.9)
  op.add_argument("--block-size", type=int, default=128)
  op.add_argument("--implementation", default=None)
  op.add_argument("--repeats", type=int, default=3)
  op.add_argument("--seed", type=int, default=0)
  op.set_defaults(run=_op)
  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, NotImplementedError) as e:
    print(f"xattn-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
