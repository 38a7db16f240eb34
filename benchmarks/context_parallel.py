"""Sequence (context) parallel XAttention: time, per-device memory and bytes moved against the number of devices.

    python benchmarks/context_parallel.py --lengths 131072,262144,1048576 --devices 1,2,4,8

One sequence (B=1), 32 query / 8 kv heads of 128, bf16, causal, on the LLM-like synthetic input of
`xattn_jax.synthetic` at --threshold. For each device count P (the first P devices, a 1-D mesh "seq"):
`sharded_xattention(seq_axis="seq")` timed (median of --repeats after warm-up), XLA's per-device memory of the
compiled call (temporaries; arguments and output are the sharded q/k/v/out), the bytes each device receives (the
K/V all-gather plus the zig-zag reordering of q and of the output) and the communication time those bytes predict at
--link-gb-s (docs/sequence_parallel.md), and the largest difference from the unsharded op's output. The unsharded
`xattention` on one device is timed in the same process: at P = 1 the sharded call must run at its speed.
Writes <out-dir>/context_parallel/<card>/<date>-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import timed, without_traced_checks
from benchmarks.result_files import add_output_args, csv_of, metadata, write_result
from xattn_jax.context_parallel import chunk_tokens
from xattn_jax.synthetic import llm_like_qkv

SCRIPT = "context_parallel"


def bytes_received(*, T: int, S: int, N: int, K: int, H: int, P: int, block: int, itemsize: int = 2) -> dict:
  """Per device: the K/V all-gather and the zig-zag reordering of q (in) and of the output (out)."""
  c = chunk_tokens(T, P, block)
  Sp = -(-S // P) * P
  kv = 2 * Sp * K * H * itemsize * (P - 1) / P
  reorder = 2 * (2 * c) * N * H * itemsize * (P - 1) / P  # q in, out back: at most all but the local share moves
  return dict(kv_gather=kv, reorder=reorder, total=kv + reorder)


def needed_key_blocks(counts, indices, *, P: int, block: int) -> float:
  """The fraction of key blocks that the attention of one device's queries selects (union over its query blocks
  and heads, mean over devices and kv heads): what gathering only the selected K/V blocks would move, against all.
  counts [B, N, nQb], indices [B, N, nQb, nKb] of the unsharded layout; device i owns zig-zag chunks i, 2P-1-i."""
  B, N, nqb, nkb = indices.shape
  per_chunk = -(-nqb // (2 * P))
  fractions = []
  for i in range(P):
    rows = [r for c in (i, 2 * P - 1 - i) for r in range(c * per_chunk, min((c + 1) * per_chunk, nqb))]
    used = np.zeros((B, N, nkb), bool)
    for r in rows:
      for b in range(B):
        for n in range(N):
          used[b, n, indices[b, n, r, : counts[b, n, r]]] = True
    fractions.append(used.mean())
  return float(np.mean(fractions))


def run(args, argv=None) -> dict:
  devices = jax.devices()
  rows = []
  for T in args.lengths:
    q, k, v = llm_like_qkv(
      jax.random.key(args.seed), seq_len=T, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim
    )
    q, k, v = (x.astype(args.dtype) for x in (q, k, v))
    kw = dict(is_causal=True, threshold=args.threshold, stride=args.stride, block_size=args.block)
    plain = jax.jit(lambda q, k, v: xa.xattention(q, k, v, **kw))
    want = plain(q, k, v)
    base = timed(plain, q, k, v, repeats=args.repeats)
    layout = jax.jit(lambda q, k, v: xa.xattention(q, k, v, return_block_layout=True, **kw)[1])(q, k, v)
    density = float(layout.density())
    counts, indices = np.asarray(layout.counts), np.asarray(layout.indices)
    rows.append(
      dict(
        T=T,
        P=1,
        what="xattention (unsharded)",
        ms=base["ms"],
        spread_ms=base["spread_ms"],
        density=density,
        temp_gib=_temps(plain, q, k, v),
      )
    )
    print(f"{T:>8} unsharded       {base['ms']:10.2f} ms  density {density:.3f}", flush=True)
    for P in args.devices:
      if P > len(devices):
        print(f"{T:>8} P={P}: only {len(devices)} devices", flush=True)
        continue
      mesh = jax.make_mesh((P,), ("seq",), devices=devices[:P], axis_types=(jax.sharding.AxisType.Auto,))
      spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq", None, None))
      qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
      fn = jax.jit(
        lambda q, k, v: xa.sharded_xattention(q, k, v, mesh=mesh, batch_axis=None, head_axis=None, seq_axis="seq", **kw)
      )
      got = fn(qs, ks, vs)
      diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      t = timed(fn, qs, ks, vs, repeats=args.repeats)
      needed = needed_key_blocks(counts, indices, P=P, block=args.block)
      moved = bytes_received(
        T=T,
        S=T,
        N=args.heads,
        K=args.kv_heads,
        H=args.head_dim,
        P=P,
        block=args.block,
        itemsize=jnp.dtype(args.dtype).itemsize,
      )
      row = dict(
        T=T,
        P=P,
        what="sharded_xattention seq",
        ms=t["ms"],
        spread_ms=t["spread_ms"],
        speedup=base["ms"] / t["ms"],
        efficiency=base["ms"] / t["ms"] / P,
        temp_gib=_temps(fn, qs, ks, vs),
        bytes_received_gib=moved["total"] / 2**30,
        kv_gather_gib=moved["kv_gather"] / 2**30,
        predicted_comm_ms=moved["total"] / (args.link_gb_s * 1e9) * 1e3,
        max_abs_diff=diff,
        needed_kv_fraction=needed,
      )
      rows.append(row)
      print(
        f"{T:>8} P={P:<2} {t['ms']:10.2f} ms  {row['speedup']:5.2f}x ({row['efficiency']:.0%} of linear)  "
        f"temps {row['temp_gib']:.2f} GiB/device  receives {row['bytes_received_gib']:.2f} GiB "
        f"(~{row['predicted_comm_ms']:.1f} ms at {args.link_gb_s:g} GB/s)  selected K/V {needed:.0%}  "
        f"max diff {diff:.1e}",
        flush=True,
      )
      del qs, ks, vs, got
  return dict(
    metadata(SCRIPT, argv),
    devices=len(devices),
    shape=dict(
      N=args.heads,
      K=args.kv_heads,
      H=args.head_dim,
      dtype=str(jnp.dtype(args.dtype)),
      threshold=args.threshold,
      stride=args.stride,
      block=args.block,
    ),
    link_gb_s=args.link_gb_s,
    rows=rows,
  )


def _temps(fn, *args) -> float:
  """XLA temporaries of the compiled call per device (GiB)."""
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**30


def to_markdown(result: dict) -> str:
  s = result["shape"]
  lines = [
    f"# Context parallel XAttention: {result['devices']} x {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    f"B=1, {s['N']} query / {s['K']} kv heads of {s['H']}, {s['dtype']}, causal, tau {s['threshold']}, stride "
    f"{s['stride']}, LLM-like synthetic input. Predicted communication: bytes received per device / "
    f"{result['link_gb_s']:g} GB/s.",
    "",
    "Selected K/V: the fraction of key blocks the device's own query blocks selected (union over them and its "
    "heads) — what gathering only those would move.",
    "",
    "| T | P | what | ms | speedup | of linear | temps GiB/device | receives GiB | predicted comm ms | "
    "selected K/V | max diff |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['T']} | {r['P']} | {r['what']} | {r['ms']:.2f} | {r.get('speedup', 1):.2f} | "
      f"{r.get('efficiency', 1):.0%} | {r['temp_gib']:.2f} | {r.get('bytes_received_gib', 0):.2f} | "
      f"{r.get('predicted_comm_ms', 0):.1f} | {r.get('needed_kv_fraction', 1):.0%} | "
      f"{r.get('max_abs_diff', 0):.1e} |"
    )
  return "\n".join(lines) + "\n"


@without_traced_checks
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ints = csv_of(int)
  parser.add_argument("--lengths", type=ints, default=[131072, 262144, 1048576])
  parser.add_argument("--devices", type=ints, default=[1, 2, 4, 8], help="device counts P (the first P devices)")
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", type=jnp.dtype, default=jnp.dtype(jnp.bfloat16))
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--stride", type=int, default=8)
  parser.add_argument("--block", type=int, default=128)
  parser.add_argument(
    "--link-gb-s", type=float, default=400.0, help="GB/s each device receives at (NVLink 4 all-gather: ~350-450)"
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  add_output_args(parser)
  args = parser.parse_args(argv)
  result = run(args, argv)
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  print(to_markdown(result))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
