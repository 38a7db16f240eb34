"""Attention speed on one GPU: dense cuDNN vs our block-sparse kernel at fixed densities, the estimator, end to end.

    python benchmarks/attention_speed.py --lengths 8192,32768,131072 --kv-heads 8,32 --tag v3

Shapes: B=1, 32 query heads, head dim 128, bf16, causal. Each entry is the median of --repeats timed calls after
warm-up (host clock around `block_until_ready`; calls of 0.1 ms and up, so launch overhead is small), with the dense
baseline timed the same way in the same process. Fixed-density layouts keep, in every query block row, the diagonal
block and round(d * allowed) - 1 random other allowed blocks, so the density is d of the causal blocks.
Writes <out-dir>/attention_speed/<card>/<date>-<tag>.json and .md.

--peers flex,sdpa (needs torch in the same Python, as on the GPU machine; imported only then) times PyTorch in the
same process on the same inputs: FlexAttention on each layout our kernel just ran (benchmarks/peers_torch.py builds
its BlockMask from the layout's bool block mask), next to our row, and dense causal torch SDPA (cuDNN) next to the
JAX cuDNN row, each with its output's error against ours / JAX cuDNN's.
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
from benchmarks.common import BLOCK, block_mask_of, fixed_density_layout, rel_err, timed_per_call
from benchmarks.result_files import add_output_args, csv_of, metadata, write_result
from xattn_jax.synthetic import llm_like_qkv

SCRIPT = "attention_speed"


def calibrate_threshold(q, k, *, stride, density, implementation) -> float:
  """Bisection on tau (selection only, the scores computed once) for about `density` of the causal blocks."""
  length = q.shape[1]
  scores = xa.antidiagonal_scores(q, k, stride=stride, implementation=implementation)
  select = jax.jit(lambda tau: xa.select_blocks(scores, q_len=length, kv_len=length, threshold=tau).density())
  lo, hi = 0.0, 1.0
  for _ in range(14):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if float(select(jnp.float32(mid))) < density else (lo, mid)
  return (lo + hi) / 2


def sparse_flops(layout: xa.BlockLayout, head_dim: int) -> float:
  return 4.0 * head_dim * BLOCK * BLOCK * float(jnp.sum(layout.counts))


PEERS = ("flex", "sdpa")


def run(args, argv=None) -> dict:
  rows = []
  peers = None
  if args.peers:
    from benchmarks import peers_torch as peers  # torch: only here, after the flags parsed

    device = peers.default_device()

  def measure_peer(fn):
    return peers.timed(fn, device=device, repeats=args.repeats, pipeline=args.pipeline)

  def measure(fn, *fn_args):
    return timed_per_call(fn, *fn_args, repeats=args.repeats, in_jit=args.in_jit, pipeline=args.pipeline)

  key = jax.random.key(args.seed)
  for length in args.lengths:
    for kv_heads in args.kv_heads:
      shape = dict(B=1, T=length, N=args.heads, K=kv_heads, H=args.head_dim)
      kq, kk, kv, kl = jax.random.split(jax.random.fold_in(key, length * 1000 + kv_heads), 4)
      q = jax.random.normal(kq, (1, length, args.heads, args.head_dim), jnp.bfloat16)
      k = jax.random.normal(kk, (1, length, kv_heads, args.head_dim), jnp.bfloat16)
      v = jax.random.normal(kv, (1, length, kv_heads, args.head_dim), jnp.bfloat16)
      dense_flops = 4.0 * length * length * args.head_dim * args.heads / 2
      dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=args.dense_implementation)
      )
      base = measure(dense, q, k, v)
      rows.append(
        dict(
          shape,
          what=f"dense {args.dense_implementation}",
          density=1.0,
          **base,
          ratio=1.0,
          tflops=dense_flops / base["ms"] / 1e9,
        )
      )
      print(f"{length:>7} K={kv_heads:<2} dense {args.dense_implementation:<14} {base['ms']:9.3f} ms", flush=True)
      if peers is not None:
        tq, tk, tv = peers.qkv_to_torch(q, k, v, device=device)
      if "sdpa" in args.peers:
        sdpa, gqa = peers.sdpa_causal(tq, tk, tv, backend=args.sdpa_backend)
        t = measure_peer(sdpa)
        got = sdpa()
        entry = dict(
          shape,
          what=f"torch sdpa {args.sdpa_backend}",
          gqa=gqa,
          density=1.0,
          **t,
          ratio=t["ms"] / base["ms"],
          tflops=dense_flops / t["ms"] / 1e9,
          rel_err_vs_cudnn=peers.rel_err(got, jax.block_until_ready(dense(q, k, v))),
        )
        rows.append(entry)
        del sdpa, got
        print(
          f"{length:>7} K={kv_heads:<2} torch sdpa {args.sdpa_backend:<9} {t['ms']:9.3f} ms  "
          f"{entry['ratio']:.3f}x dense ({gqa}), rel err {entry['rel_err_vs_cudnn']:.2e}",
          flush=True,
        )
      if "sparse" in args.sections:
        sparse = jax.jit(
          lambda q, k, v, layout: xa.block_sparse_attention(
            q, k, v, layout, causal=True, implementation=args.implementation
          )
        )
        want_dense = dense(q, k, v) if length <= 32768 else None
        for d in args.densities:
          layout = fixed_density_layout(kl, batch=1, heads=args.heads, length=length, density=d / 100)
          t = measure(sparse, q, k, v, layout)
          real_d = float(layout.density())
          entry = dict(
            shape,
            what="sparse kernel",
            density=real_d,
            **t,
            ratio=t["ms"] / base["ms"],
            target_ratio=1.15 * real_d if d < 100 else 1.05,
            tflops=sparse_flops(layout, args.head_dim) / t["ms"] / 1e9,
          )
          if d == 100 and want_dense is not None:
            got = sparse(q, k, v, layout)
            entry["rel_err_vs_cudnn"] = rel_err(got, want_dense)
          rows.append(entry)
          print(
            f"{length:>7} K={kv_heads:<2} sparse d={real_d:5.3f}     {t['ms']:9.3f} ms  "
            f"{entry['ratio']:.3f}x dense (target <= {entry['target_ratio']:.3f})  {entry['tflops']:.0f} TFLOP/s",
            flush=True,
          )
          if "flex" in args.peers:  # FlexAttention on the blocks our kernel just ran
            block_mask = peers.flex_block_mask(block_mask_of(layout), device=device)
            t = measure_peer(lambda: peers.flex_attention(tq, tk, tv, block_mask))
            got = peers.flex_attention(tq, tk, tv, block_mask)
            flex = dict(
              shape,
              what="torch flex_attention",
              gqa="enable_gqa" if peers.gqa_supported() else "repeated kv heads",
              density=real_d,
              **t,
              ratio=t["ms"] / base["ms"],
              vs_ours=t["ms"] / entry["ms"],
              tflops=sparse_flops(layout, args.head_dim) / t["ms"] / 1e9,
              rel_err_vs_ours=peers.rel_err(got, jax.block_until_ready(sparse(q, k, v, layout))),
            )
            rows.append(flex)
            del got, block_mask
            print(
              f"{length:>7} K={kv_heads:<2} flex   d={real_d:5.3f}     {t['ms']:9.3f} ms  {flex['ratio']:.3f}x dense  "
              f"flex/ours {flex['vs_ours']:.3f}  events {t.get('event_ms', float('nan')):.3f} ms  "
              f"rel err vs ours {flex['rel_err_vs_ours']:.2e}  first call {t['first_call_s']:.1f} s",
              flush=True,
            )
      for stride in args.strides if "estimator" in args.sections else ():
        est = jax.jit(lambda q, k: xa.antidiagonal_scores(q, k, stride=stride, implementation=args.implementation))
        t = measure(est, q, k)
        rows.append(dict(shape, what=f"estimator s={stride}", density=None, **t, ratio=t["ms"] / base["ms"]))
        print(
          f"{length:>7} K={kv_heads:<2} estimator s={stride:<2}      {t['ms']:9.3f} ms  "
          f"{t['ms'] / base['ms']:.3f}x dense",
          flush=True,
        )
      if "e2e" in args.sections:
        sq, sk, sv = llm_like_qkv(
          kq, seq_len=length, num_heads=args.heads, num_kv_heads=kv_heads, head_dim=args.head_dim
        )
        for stride in args.strides:
          tau = args.threshold
          if args.e2e_density is not None:  # the tau that keeps about this fraction of causal blocks on this input
            tau = calibrate_threshold(
              sq, sk, stride=stride, density=args.e2e_density, implementation=args.implementation
            )
          e2e = jax.jit(
            lambda q, k, v: xa.xattention(
              q,
              k,
              v,
              is_causal=True,
              threshold=tau,
              stride=stride,
              implementation=args.implementation,
              return_block_layout=True,
            )
          )
          t = measure(e2e, sq, sk, sv)
          base_s = measure(dense, sq, sk, sv)
          out, layout = e2e(sq, sk, sv)
          want = dense(sq, sk, sv)
          err = rel_err(out, want)
          rows.append(
            dict(
              shape,
              what=f"xattention s={stride} tau={tau:.3g}",
              density=float(layout.density()),
              **t,
              ratio=t["ms"] / base_s["ms"],
              dense_ms=base_s["ms"],
              rel_err_vs_dense=err,
            )
          )
          print(
            f"{length:>7} K={kv_heads:<2} xattention s={stride:<2}     {t['ms']:9.3f} ms  "
            f"{base_s['ms'] / t['ms']:.2f}x faster, density {float(layout.density()):.3f}, rel err {err:.2e}",
            flush=True,
          )
          # The selection and layout building alone (XLA), from the scores the estimator produced.
          scores = jax.jit(
            lambda q, k: xa.antidiagonal_scores(q, k, stride=stride, implementation=args.implementation)
          )(sq, sk)
          select = jax.jit(lambda s: xa.select_blocks(s, q_len=length, kv_len=length, threshold=tau))
          t = measure(select, scores)
          rows.append(
            dict(
              shape,
              what=f"selection s={stride} tau={tau:.3g}",
              density=None,
              **t,
              ratio=t["ms"] / base_s["ms"],
              target_ratio=0.02,
            )
          )
          print(
            f"{length:>7} K={kv_heads:<2} selection s={stride:<2}      {t['ms']:9.3f} ms  "
            f"{t['ms'] / base_s['ms']:.3f}x dense (target <= 0.02)",
            flush=True,
          )
          del scores
      if peers is not None:
        del tq, tk, tv
  result = dict(
    metadata(SCRIPT, argv),
    rows=rows,
    heads=args.heads,
    head_dim=args.head_dim,
    traced_checks=args.traced_checks,
    pipeline=args.pipeline,
    in_jit=args.in_jit,
  )
  if peers is not None:
    result.update(peers=args.peers, torch=peers.torch.__version__, torch_device=device)
  return result


def to_markdown(result: dict) -> str:
  lines = [
    f"# Attention speed: {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    f"B=1, {result['heads']} query heads, head dim {result['head_dim']}, bf16, causal. ms = median; ratio = time / "
    "dense time of the same shape in the same process (for xattention rows: of the same synthetic input). "
    f"Traced value checks: {result.get('traced_checks', 'on')}. Calls per timed sample: "
    f"{result.get('pipeline', 1)} (1: each call waited for, host dispatch included; more: back-to-back calls)."
    + (
      f" Each call is one of {result['in_jit']} chained calls in one jitted program (a model's layers), time / "
      f"{result['in_jit']}: no host dispatch per call."
      if result.get("in_jit", 1) > 1
      else ""
    ),
    "",
    *(
      [
        f"Peers in the same process: torch {result['torch']} on {result['torch_device']}, the same q/k/v; flex rows "
        "run FlexAttention (torch.compile) on the block layout of the sparse row above them. Their ms is timed as "
        "ours (host clock, dispatch included); `flex/ours` = flex ms / our ms; `events` = CUDA-event median of the "
        "same calls (the GPU's time without the host's dispatch gaps)."
        + (
          " Our rows here are chained calls in one program and the peers' single calls: compare their events."
          if result.get("in_jit", 1) > 1
          else ""
        ),
        "",
      ]
      if "torch" in result
      else []
    ),
    "| T | K | what | density | ms | spread ms | ratio | target | TFLOP/s | note |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    note = ", ".join(
      [f"{k}={r[k]:.2e}" for k in ("rel_err_vs_cudnn", "rel_err_vs_dense", "rel_err_vs_ours") if k in r]
      + ([f"flex/ours={r['vs_ours']:.3f}"] if "vs_ours" in r else [])
      + ([f"events {r['event_ms']:.3f} ms"] if "event_ms" in r else [])
      + ([r["gqa"]] if r.get("gqa") == "repeated kv heads" else [])
    )
    dens = "" if r["density"] is None else f"{r['density']:.3f}"
    lines.append(
      f"| {r['T']} | {r['K']} | {r['what']} | {dens} | {r['ms']:.3f} | {r['spread_ms']:.3f} | {r['ratio']:.3f} | "
      f"{r.get('target_ratio', '') and format(r['target_ratio'], '.3f')} | "
      f"{'' if 'tflops' not in r else format(r['tflops'], '.0f')} | {note} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ints = csv_of(int)
  parser.add_argument("--lengths", type=ints, default=[8192, 32768, 131072])
  parser.add_argument("--kv-heads", type=ints, default=[8, 32])
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--densities", type=ints, default=[5, 10, 25, 50, 100])
  parser.add_argument("--strides", type=ints, default=[8, 16])
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument(
    "--e2e-density",
    type=float,
    default=None,
    help="instead of --threshold, calibrate tau per stride to keep this fraction of causal blocks",
  )
  parser.add_argument("--sections", default="sparse,estimator,e2e")
  parser.add_argument(
    "--implementation",
    type=lambda s: tuple(s.split(",")),
    default=("pallas_mosaic_gpu", "xla"),
    help="backends tried in order (comma separated)",
  )
  parser.add_argument("--dense-implementation", default="cudnn", help="jax.nn.dot_product_attention implementation")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument(
    "--pipeline",
    type=int,
    default=1,
    help="calls per timed sample, issued back to back (see `timed`); 1 = per-call latency",
  )
  parser.add_argument(
    "--in-jit",
    type=int,
    default=1,
    help="N > 1 times N chained calls inside one jitted program per sample and reports time / N (as a model's "
    "layers run: the GPU's cost without per-call host dispatch)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--peers",
    type=csv_of(str),
    default=[],
    help=f"PyTorch peers timed in the same process (comma separated, of {','.join(PEERS)}): FlexAttention on each "
    "sparse layout, torch SDPA next to the dense row; needs torch importable",
  )
  parser.add_argument(
    "--sdpa-backend", default="cudnn", choices=["cudnn", "flash", "efficient", "math"], help="of --peers sdpa"
  )
  add_output_args(parser)
  parser.add_argument(
    "--traced-checks",
    choices=["on", "off"],
    default="off",
    help="xattn_jax's checkify value checks in the traced ops (on costs ~0.2-0.3 ms of dispatch)",
  )
  args = parser.parse_args(argv)
  if args.pipeline < 1:
    parser.error(f"--pipeline {args.pipeline} must be >= 1")
  if unknown := [p for p in args.peers if p not in PEERS]:
    parser.error(f"--peers {','.join(unknown)}: not among {','.join(PEERS)}")
  if "flex" in args.peers and "sparse" not in args.sections:
    parser.error("--peers flex runs on the sparse section's layouts: add sparse to --sections")
  if args.peers:
    try:
      import torch  # noqa: F401
    except ImportError as e:
      parser.error(f"--peers {','.join(args.peers)} needs torch in this Python ({e})")
  if args.repeats < 20:
    print("note: fewer than 20 repeats; the results are not for the record", file=sys.stderr)
  with xa.traced_checks(args.traced_checks == "on"):
    result = run(args, argv)
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  print(to_markdown(result))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
