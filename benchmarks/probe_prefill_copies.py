"""Where a long prefill's device copies come from, and the TTFT of a source tree against dense in the same process.

The Llama-3.1-8B shape (random bf16 weights, `model_prefill.make_model`) at one length: dense one-shot TTFT, then
XAttention at fixed flat thresholds (no search: give the taus another run searched, e.g. model_prefill.py's), one-shot
and/or chunked, then one profiled XAttention prefill per mode whose copy events (`Memcpy*` / `memcpy*` on the stream
lines) are each attributed to the HLO op the trace names in the event's `hlo_op` stat (inside a command buffer
that is the buffer, `command_buffer_N`), else to the op overlapping it on an "XLA Ops" line: count, ms and bytes
(a cudaMemcpy's `memcpy_details` size; a copy kernel's bytes are not recorded) per op and event name. Then the --top
largest ops of a second profiled prefill (`common.device_op_times`).

Which source tree runs is PYTHONPATH's (the script imports xattn_jax and benchmarks from it), so two versions can be
A/B'd back to back on one warm machine, each against its own dense baseline:
    PYTHONPATH=$PWD python benchmarks/probe_prefill_copies.py --length 131072 --stride 16 --taus 0.524,0.502
    PYTHONPATH=.ab/old python benchmarks/probe_prefill_copies.py --length 131072 --stride 16 --taus 0.524,0.502
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import re
import sys
import tempfile

import jax
import numpy as np

import xattn_jax as xa
from benchmarks.common import device_op_times
from benchmarks.model_prefill import make_model, time_prefill
from benchmarks.result_files import csv_of
from xattn_jax.models import AttentionConfig, Generator


def prefill_once(gen: Generator, prompt) -> None:
  logits, cache, _ = gen.prefill([prompt])
  jax.block_until_ready(logits)
  del cache


def copy_attribution(fn) -> tuple[dict, list]:
  """Run `fn` once under the profiler: `attribute_copies` of its device planes."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      fn()
    (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  return attribute_copies([p for p in data.planes if p.name.startswith("/device:")])


def attribute_copies(planes) -> tuple[dict, list]:
  """{"module/hlo op <event name>": [count, ms, bytes]} of the copy events on the planes' stream lines, and the
  details of the first few copies (planes: objects with .lines, each with .name and .events as in ProfileData)."""
  ops, copies = [], []
  for plane in planes:
    for line in plane.lines:
      if line.name == "XLA Ops":
        ops += [(e.start_ns, e.end_ns, e.name) for e in line.events]
      elif line.name.startswith("Stream"):
        copies += [e for e in line.events if "memcpy" in e.name.lower()]
  ops.sort()
  starts = np.array([o[0] for o in ops], dtype=np.float64)
  table = collections.defaultdict(lambda: [0, 0.0, 0])
  samples = []
  for e in copies:
    stats = {str(k): v for k, v in e.stats}
    i = int(np.searchsorted(starts, e.start_ns, side="right")) - 1
    overlapping = ops[i][2] if i >= 0 and ops[i][1] >= e.start_ns else "(no op)"
    owner = f"{stats.get('hlo_module', '?')}/{stats['hlo_op']}" if "hlo_op" in stats else overlapping
    size = re.search(r"size:(\d+)", str(stats.get("memcpy_details", "")))
    row = table[f"{owner} <{e.name}>"]
    row[0] += 1
    row[1] += e.duration_ns / 1e6
    row[2] += int(size.group(1)) if size else 0
    if len(samples) < 6:
      keys = ("memcpy_details", "kernel_details")
      samples.append((owner, e.name, e.duration_ns / 1e3, {k: stats[k] for k in keys if k in stats}))
  return dict(table), samples


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--length", type=int, default=131072)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--stride", type=int, default=16)
  p.add_argument("--modes", type=csv_of(str), default=["one-shot", "chunked"])
  p.add_argument("--taus", type=csv_of(float), required=True, help="one flat threshold per mode, in --modes order")
  p.add_argument("--chunk-size", type=int, default=32768, help="the chunked mode's chunk")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--top", type=int, default=12, help="also the N largest ops of a second profiled prefill")
  p.add_argument("--shape", default="llama3_1_8b", help="model_prefill.SHAPES (tiny: a CPU smoke run)")
  args = p.parse_args(argv)
  if len(args.taus) != len(args.modes):
    p.error(f"--taus {args.taus}: one per mode in --modes {args.modes}")
  model = make_model(
    argparse.Namespace(
      checkpoint=None, layers=args.layers, lengths=[args.length], decode_contexts=[], shape=args.shape, seed=args.seed
    )
  )
  prompt = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, size=args.length).tolist()
  print(f"xattn_jax from {xa.__file__}, jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  dense = Generator(model.with_attention(AttentionConfig()), max_len=args.length, chunk_size=args.length, bucket=128)
  row = time_prefill(dense, prompt, args.repeats)
  first, base = row["first_call_s"], row["ttft_s"]
  print(f"{args.length:>7} dense one-shot        TTFT {base:7.3f} s  first call {first:6.1f} s", flush=True)
  del dense
  for mode, tau in zip(args.modes, args.taus):
    cfg = AttentionConfig(kind="xattention", xattention=xa.XAttentionConfig(stride=args.stride, threshold=tau))
    size = args.length if mode == "one-shot" else args.chunk_size
    gen = Generator(model.with_attention(cfg), max_len=args.length, chunk_size=size, bucket=128)
    row = time_prefill(gen, prompt, args.repeats)
    first, t = row["first_call_s"], row["ttft_s"]
    print(
      f"{args.length:>7} xattention s={args.stride} {mode:<8} tau {tau:.3f} TTFT {t:7.3f} s  {base / t:5.3f}x dense  "
      f"first call {first:6.1f} s",
      flush=True,
    )
    table, samples = copy_attribution(functools.partial(prefill_once, gen, prompt))
    for owner, name, us, stats in samples:
      print(f"  sample copy: {name} under {owner[:60]}: {us:.1f} us stats {stats}")
    for op, (n, ms, size) in sorted(table.items(), key=lambda kv: -kv[1][1]):
      print(f"  copies {mode:<8} {ms:8.3f} ms {n:5d}x {size / 2**20:10.1f} MiB  {op[:110]}", flush=True)
    for op in device_op_times(functools.partial(prefill_once, gen, prompt), top=args.top, warmup=False):
      print(f"  kernels {mode:<8} {op['ms']:8.3f} ms {op['count']:5.0f}x {op['line']}: {op['name'][:100]}", flush=True)
    del gen
  return 0


if __name__ == "__main__":
  sys.exit(main())
