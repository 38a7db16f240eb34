"""Where the compile time of the model's programs goes: trace, lower and XLA compile, timed apart.

The Llama-3.1-8B shape is built abstractly (no weights are allocated), so only compilation is measured; run once per
XLA_FLAGS variant (flags are read once per process). Example:
    python benchmarks/probe_compile.py --layers 1,32 --length 131072 --kinds dense,xattention --programs prefill
    XLA_FLAGS=--xla_gpu_autotune_level=0 python benchmarks/probe_compile.py --layers 32 --length 131072
One line per program: trace s, lower s, compile s, XLA temporaries, and the Mosaic GPU kernels in the module.
The decode loop's temporaries at batch 8 (a relaid-out cache would show as GiB here; XLA's dump names the buffers):
    XLA_FLAGS=--xla_dump_to=/tmp/dump python benchmarks/probe_compile.py --programs decode --kinds dense --batch 8 \
      --layers 2 --length 32768
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import xattn_jax as xa
from benchmarks.result_files import csv_of
from xattn_jax.models import AttentionConfig, Generator, Transformer, llama3_1_8b

GiB = 1 << 30


def program_args(gen: Generator, model, program: str, length: int, chunk: int, batch: int):
  """Abstract arguments (and static keywords) of the Generator's program: prefill (one shot), extend (one chunk into
  the cache) or decode (its whole loop over a cache of `length` tokens)."""
  cache = jax.eval_shape(lambda: model.init_cache(batch, gen.cache_len))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  if program == "decode":
    logits = jax.ShapeDtypeStruct((batch, model.config.vocab_size), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return (gen.state, i32(batch, 64), i32(), cache, logits, i32(1), key), dict(temperature=0.0, top_p=1.0)
  width = length if program == "prefill" else chunk
  return (gen.state, i32(batch, width), i32(batch), cache), {}


def probe(kind: str, layers: int, length: int, program: str, chunk: int, stride: int, batch: int = 1) -> str:
  attention = (
    AttentionConfig(kind="xattention", xattention=xa.XAttentionConfig(stride=stride, threshold=0.9))
    if kind == "xattention"
    else AttentionConfig(kind="dense")
  )
  config = llama3_1_8b(num_layers=layers, attention=attention)
  model = nnx.eval_shape(lambda: Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  gen = Generator(model, max_len=length, chunk_size=length if program == "prefill" else chunk)
  args, static = program_args(gen, model, program, length, chunk, batch)
  width = {"prefill": length, "extend": chunk, "decode": 1}[program]
  t0 = time.perf_counter()
  traced = gen._jitted[program].trace(*args, **static)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  kernels = lowered.as_text().count("@mosaic_gpu_v2")
  temps = compiled.memory_analysis().temp_size_in_bytes / GiB
  return (
    f"{kind:<10} s={stride:<2} layers {layers:>2} B {batch} T {length:>6} {program:<7} chunk {width:>6}: trace "
    f"{t1 - t0:5.1f} s lower {t2 - t1:5.1f} s compile {t3 - t2:6.1f} s temps {temps:6.2f} GiB kernels "
    f"{kernels} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", default="32")
  p.add_argument("--length", type=int, default=131072)
  p.add_argument("--kinds", default="xattention")
  p.add_argument(
    "--programs", default="prefill", help="prefill (one shot), extend (one chunk into the cache), decode (the loop)"
  )
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--chunk", type=int, default=32768)
  p.add_argument("--stride", type=int, default=8)
  p.add_argument(
    "--hold-gib",
    type=csv_of(float),
    default=[0.0],
    help="compile while this many GiB of device memory are held (as a benchmark's weights and caches are); one "
    "probe set per value",
  )
  args = p.parse_args()
  for hold in args.hold_gib:
    held = jnp.ones((int(hold * GiB) // 4,), jnp.float32) if hold else None  # a real allocation, not a lazy one
    jax.block_until_ready(held)
    print(f"holding {hold:g} GiB of device memory", flush=True)
    probe_all(args)
    del held


def probe_all(args):
  for kind in args.kinds.split(","):
    for program in args.programs.split(","):
      for layers in map(int, args.layers.split(",")):
        print(probe(kind, layers, args.length, program, args.chunk, args.stride, args.batch), flush=True)


if __name__ == "__main__":
  main()
