"""Time to first token of the 8B-shaped model sharded over the local GPUs (heads, sequence) against one GPU.

    python benchmarks/model_prefill_sharded.py --length 131072 --tag 128k-8gpu

The Llama-3.1-8B shape (`model_prefill.make_model`: all 32 layers unless --layers, random bf16 weights made on the
first device, or --checkpoint), one random prompt of --length tokens, for each --kinds (dense; xattention at the flat
--threshold, stride --stride: tau 0.53 lands near 10% density on these random weights at 128K, as
`model_prefill.py`'s threshold search found on 2026-12-06). First on one GPU (no mesh: the baseline), then on each
--meshes entry "DATAxSEQxTENSOR" (`xattn_jax.models.sharding.make_mesh`: "seq" splits the prompt's tokens and runs
attention sequence-parallel, "tensor" splits the heads; default: every head split, every sequence split, and half
and half when there are 4 or more GPUs). The prompt is prefilled in one shot (--chunk-size: in chunks).

Each row: TTFT (median of --repeats prefills after a compiled first call), compile seconds, XLA temporaries per
device, the largest allocator peak over the mesh's devices (monotone since the process started: an upper bound for
the row), speed-up over one GPU and its share of linear (speed-up / devices), the mean XAttention density, and the
last position's logits against one GPU's (relative error, largest difference, same argmax).
Writes <out-dir>/model_prefill_sharded/<card>/<date>-<tag>.json and .md (after every row).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.common import rel_err, without_traced_checks
from benchmarks.model_prefill import SHAPES, make_model, memory_peak, time_prefill, xattention_config
from benchmarks.result_files import add_output_args, csv_of, metadata, write_result
from xattn_jax.models import AttentionConfig, Generator
from xattn_jax.models.sharding import check_divisible, make_mesh

SCRIPT = "model_prefill_sharded"
KINDS = ("dense", "xattention")


def mesh_shape(text: str) -> tuple[int, int, int]:
  """ "DATAxSEQxTENSOR" -> (data, seq, tensor), each a positive int."""
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"{text!r}: a mesh is DATAxSEQxTENSOR, three positive ints (e.g. 1x8x1)")
  return tuple(int(p) for p in parts)


def default_meshes(n: int) -> list[tuple[int, int, int]]:
  """Heads over every device, the sequence over every device, and (4 or more devices) half and half."""
  if n < 2:
    return []
  meshes = [(1, 1, n), (1, n, 1)]
  if n >= 4 and n % 2 == 0:
    meshes.append((1, n // 2, 2))
  return meshes


def attention_config(kind: str, args) -> AttentionConfig:
  return AttentionConfig() if kind == "dense" else xattention_config(args, args.threshold)


def compare(logits: np.ndarray, base: np.ndarray) -> dict:
  return dict(
    rel_err_vs_1gpu=rel_err(logits, base),
    max_logit_diff_vs_1gpu=float(np.abs(logits - base).max()),
    same_argmax=bool(logits.argmax() == base.argmax()),
  )


def build_mesh(dims: tuple[int, int, int]):
  """The (data, seq, tensor) mesh on the first data * seq * tensor devices."""
  data, seq, tensor = dims
  return make_mesh(data, tensor, jax.devices()[: data * seq * tensor], seq=seq)


def run_row(model, prompt, args, *, kind: str, dims, mesh, base: dict | None) -> dict:
  """One prefill configuration (`mesh` None: one GPU): TTFT and memory, and the logits against the one-GPU `base`."""
  data, seq, tensor = dims
  chunk = args.chunk_size or args.length
  gen = Generator(model.with_attention(attention_config(kind, args)), max_len=args.length, chunk_size=chunk, mesh=mesh)
  timing = time_prefill(gen, prompt, args.repeats)
  del gen
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
  logits = timing.pop("logits")
  row = dict(
    kind=kind,
    mesh=f"{data}x{seq}x{tensor}",
    devices=len(devices),
    chunk=chunk,
    peak_gib=memory_peak(devices),
    **{k: v for k, v in timing.items() if k != "peak_gib"},
  )
  if kind == "dense":
    row.pop("layer_densities")
  if base is None:
    row["logits"] = logits
  else:
    speedup = base["ttft_s"] / row["ttft_s"]
    row.update(speedup=speedup, scaling_efficiency=speedup / len(devices), **compare(logits, base["logits"]))
  return row


def to_markdown(result: dict) -> str:
  lines = [
    f"# Sharded model prefill: {result['gpus']} x {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    f"{result['model']}. Mesh = data x seq x tensor (1x1x1: one GPU, no mesh). TTFT = median of the timed prefills; "
    "peak = the largest allocator peak over the row's devices since the process started (an upper bound); "
    "efficiency = speed-up / devices; logits = the last position's against one GPU's.",
    "",
    "| kind | mesh | devices | TTFT s | speed-up | efficiency | compile s | temp GiB / device | peak GiB | density "
    "| logits rel err | same argmax |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    density = f"{r['density']:.3f}" if r["kind"] != "dense" else ""
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] >= 0 else "n/a"
    speed = f"{r['speedup']:.2f}x | {r['scaling_efficiency']:.0%}" if "speedup" in r else "1.00x | "
    err = f"{r['rel_err_vs_1gpu']:.2e} | {r['same_argmax']}" if "rel_err_vs_1gpu" in r else "(baseline) | "
    lines.append(
      f"| {r['kind']} | {r['mesh']} | {r['devices']} | {r['ttft_s']:.3f} | {speed} | {r['compile_s']:.1f} "
      f"| {r['temp_gib']:.2f} | {peak} | {density} | {err} |"
    )
  return "\n".join(lines) + "\n"


@without_traced_checks  # TTFT without the dispatch cost of traced checks
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--length", type=int, default=131072)
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_1_8b")
  parser.add_argument("--checkpoint", default=None, help="Hugging Face directory or .gguf (default: random weights)")
  parser.add_argument("--kinds", type=csv_of(str), default=list(KINDS))
  parser.add_argument(
    "--meshes", type=csv_of(mesh_shape), default=None, help="DATAxSEQxTENSOR,... (default: see above)"
  )
  parser.add_argument("--threshold", type=float, default=0.53)
  parser.add_argument("--stride", type=int, default=8)
  parser.add_argument("--chunk-size", type=int, default=None, help="default: the whole prompt in one chunk")
  parser.add_argument(
    "--query-chunk-size", type=int, default=None, help="XAttention's query chunk (as model_prefill.py's option)"
  )
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  add_output_args(parser)
  args = parser.parse_args(argv)
  if unknown := sorted(set(args.kinds) - set(KINDS)):
    parser.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
  n = jax.device_count()
  meshes = default_meshes(n) if args.meshes is None else args.meshes
  if too_big := [m for m in meshes if np.prod(m) > n]:
    parser.error(f"--meshes {too_big} need more than the {n} devices here")
  if batched := [m for m in meshes if m[0] != 1]:
    parser.error(f"--meshes {batched}: one prompt (batch 1) takes data = 1; benchmarks/multi_gpu.py splits batches")
  model = make_model(
    argparse.Namespace(
      checkpoint=args.checkpoint,
      layers=args.layers,
      lengths=[args.length],
      decode_contexts=[],
      shape=args.shape,
      seed=args.seed,
    )
  )
  built = {}
  for dims in meshes:
    built[dims] = build_mesh(dims)
    try:  # before anything is timed: heads, kv heads and the MLP split by "tensor", the prompt by "seq"
      check_divisible(model.config, built[dims], batch=1, max_len=args.length)
    except ValueError as e:
      parser.error(f"--meshes {'x'.join(map(str, dims))}: {e}")
  prompt = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, size=args.length).tolist()
  result = dict(
    metadata(SCRIPT, argv),
    gpus=n,
    model=(
      f"{args.checkpoint or args.shape + ' shape, random bf16 weights'}, {model.config.num_layers} layers, one prompt "
      f"of {args.length} tokens; xattention: tau {args.threshold}, stride {args.stride}"
    ),
    rows=[],
  )

  def write():
    rows = [{k: v for k, v in r.items() if k != "logits"} for r in result["rows"]]
    return write_result(
      dict(result, rows=rows), script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown
    )

  for kind in args.kinds:
    base = run_row(model, prompt, args, kind=kind, dims=(1, 1, 1), mesh=None, base=None)
    result["rows"].append(base)
    write()
    for dims in meshes:
      result["rows"].append(run_row(model, prompt, args, kind=kind, dims=dims, mesh=built[dims], base=base))
      write()
    base.pop("logits")
  stem = write()
  print(to_markdown(result))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
