"""One long single-sequence `xattention` call (256K .. 1M tokens) on one GPU: time and peak memory, vs dense cuDNN.

    python benchmarks/long_context.py --length 1048576

B=1, 32 query heads, 8 kv heads, head dim 128, bf16, causal, on the synthetic LLM-like input of
`xattn_jax.synthetic.llm_like_qkv`. Reported: XLA's temporaries of the compiled call (`memory_analysis`: the memory
beyond its arguments q/k/v and its output, which query chunking is meant to bound: scores, block tables, partial
sums of one chunk), the time of the call (median of --repeats), the device allocator's peak (since the process
started, so it also covers generating q/k/v: an upper bound only; run one length per process), the density (from a
second call that also returns the block layout, itself large at 1M tokens: 4 bytes per (head, query block, key
block)), and dense cuDNN timed in the same process.
Appends its run to <out-dir>/long_context/<card>/<date>-<tag>.json ({"runs": [...]}, one per process) and rewrites
the .md next to it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import timed, without_traced_checks
from benchmarks.result_files import add_output_args, metadata, result_stem, stem_file, write_result
from xattn_jax.synthetic import llm_like_qkv

SCRIPT = "long_context"


def _in_use(device) -> tuple[int, int]:
  stats = device.memory_stats() or {}
  return int(stats.get("bytes_in_use", -1)), int(stats.get("peak_bytes_in_use", -1))


def run(args, argv=None) -> dict:
  device = jax.devices()[0]
  T, N, K, H = args.length, args.heads, args.kv_heads, args.head_dim
  q, k, v = llm_like_qkv(jax.random.key(args.seed), seq_len=T, num_heads=N, num_kv_heads=K, head_dim=H)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  jax.block_until_ready((q, k, v))
  qkv_bytes = sum(x.size * x.dtype.itemsize for x in (q, k, v))
  out_bytes = q.size * q.dtype.itemsize
  call = jax.jit(
    lambda q, k, v: xa.xattention(
      q, k, v, is_causal=True, threshold=args.threshold, stride=args.stride, query_chunk_size=args.query_chunk_size
    )
  )
  compiled = call.lower(q, k, v).compile()
  analysis = compiled.memory_analysis()  # XLA's buffer assignment: temporaries beyond the arguments and outputs
  temp = int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1
  before, _ = _in_use(device)
  out = jax.block_until_ready(call(q, k, v))  # runs once; the peak below includes this call
  _, peak = _in_use(device)
  extra = peak - before - out_bytes  # an upper bound only: the peak also covers generating q, k, v
  finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  del out
  t = timed(call, q, k, v, repeats=args.repeats, warmup=1)
  row = dict(
    T=T,
    N=N,
    K=K,
    H=H,
    stride=args.stride,
    threshold=args.threshold,
    query_chunk_size=args.query_chunk_size,
    xattention_ms=t["ms"],
    xattention_spread_ms=t["spread_ms"],
    qkv_bytes=qkv_bytes,
    out_bytes=out_bytes,
    temp_bytes=temp,
    peak_bytes=peak,
    bytes_before=before,
    extra_peak_bytes=extra,
    output_finite=finite,
  )
  print(
    f"T={T}: xattention {t['ms']:.1f} ms; XLA temporaries {temp / 2**30:.2f} GiB; allocator peak "
    f"{peak / 2**30:.2f} GiB, beyond q/k/v/out at most "
    f"{extra / 2**30:.2f} GiB (q/k/v {qkv_bytes / 2**30:.2f} GiB, out {out_bytes / 2**30:.2f} GiB)",
    flush=True,
  )
  if args.density:
    with_layout = jax.jit(
      lambda q, k, v: xa.xattention(
        q,
        k,
        v,
        is_causal=True,
        threshold=args.threshold,
        stride=args.stride,
        query_chunk_size=args.query_chunk_size,
        return_block_layout=True,
      )[1].density()
    )
    row["density"] = float(with_layout(q, k, v))
    print(f"T={T}: density {row['density']:.4f}", flush=True)
  if args.dense_repeats:
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    d = timed(dense, q, k, v, repeats=args.dense_repeats, warmup=1)
    row.update(dense_ms=d["ms"], dense_spread_ms=d["spread_ms"], speedup=d["ms"] / t["ms"])
    print(f"T={T}: dense cuDNN {d['ms']:.1f} ms -> xattention {row['speedup']:.2f}x faster", flush=True)
  return dict(metadata(SCRIPT, argv), row=row)


def to_markdown(result) -> str:
  """The table of every run in the file: {"runs": [run, ...]}, or the bare list of runs of files written before."""
  results = result if isinstance(result, list) else result["runs"]
  lines = [
    "# Long single-sequence xattention calls",
    "",
    "B=1, bf16, causal, synthetic LLM-like input (`xattn_jax.synthetic`), traced checks off. temp = XLA's "
    "temporaries of the compiled call (memory beyond its arguments q/k/v and its output; -1: not recorded). "
    "Peak = the device allocator's peak since the process started, which also covers generating q/k/v, so "
    "'peak - q/k/v - out' is only an upper bound on the call's own memory.",
    "",
    "| card | jax | date | T | N/K/H | stride | tau | density | xattention ms | dense cuDNN ms | speedup | "
    "temp GiB | peak GiB | peak - q/k/v - out GiB | q/k/v GiB | command |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    w = r["row"]
    g = lambda b: f"{b / 2**30:.2f}"
    lines.append(
      f"| {r['card']} | {r['jax']} | {r['date']} | {w['T']} | {w['N']}/{w['K']}/{w['H']} | {w['stride']} | "
      f"{w['threshold']} | {w.get('density', float('nan')):.4f} | {w['xattention_ms']:.1f} | "
      f"{w.get('dense_ms', float('nan')):.1f} | {w.get('speedup', float('nan')):.2f} | "
      f"{g(w.get('temp_bytes', -1)) if w.get('temp_bytes', -1) >= 0 else 'n/a'} | {g(w['peak_bytes'])} | "
      f"{g(w['extra_peak_bytes'])} | {g(w['qkv_bytes'])} | `{r['command']}` |"
    )
  return "\n".join(lines) + "\n"


@without_traced_checks  # production dispatch: no checkify effects in the timed programs
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--length", type=int, default=1 << 20)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--stride", type=int, default=16)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--query-chunk-size", type=int, default=None, help="None: xattention's memory budget picks it")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dense-repeats", type=int, default=1, help="0 skips dense cuDNN")
  p.add_argument("--no-density", dest="density", action="store_false")
  p.add_argument("--seed", type=int, default=0)
  add_output_args(p)
  args = p.parse_args(argv)
  result = run(args, argv)
  path = stem_file(
    result_stem(args.out_dir, script=SCRIPT, card=result["card"], date=result["date"], tag=args.tag), ".json"
  )
  previous = json.loads(path.read_text()) if path.exists() else []
  runs = (previous if isinstance(previous, list) else previous["runs"]) + [result]
  record = {k: result[k] for k in ("card", "jax", "date", "command")}  # the file's: the last run's
  stem = write_result(
    dict(record, runs=runs), script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown
  )
  print(to_markdown(runs))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
