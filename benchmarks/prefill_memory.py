"""XLA's memory for a model's prefill programs, from compilation alone (no weights, no device memory used).

    python benchmarks/prefill_memory.py --lengths 131072 --chunk-sizes 0,32768 --kinds dense,xattention

Compiles `Transformer.prefill` (one shot, chunk 0) and `Transformer.extend` (a chunk of C tokens into a cache of T)
of the Llama-3.1-8B shape (or --shape tiny) on abstract arguments, as `Generator` does, and prints each program's
XLA temporaries (`memory_analysis().temp_size_in_bytes`: what it allocates beyond its arguments and outputs; the KV
cache is a donated argument), its arguments and its compile time. With --dump DIR, XLA's buffer reports go there
(the memory-usage report lists the live buffers at the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.result_files import csv_of  # imports no JAX: XLA_FLAGS below must be set before it loads


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ints = csv_of(int)
  parser.add_argument("--lengths", type=ints, default=[32768, 131072])
  parser.add_argument("--chunk-sizes", type=ints, default=[0, 32768], help="0: one-shot prefill")
  parser.add_argument("--kinds", default="dense,xattention")
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--shape", choices=["llama3_1_8b", "tiny"], default="llama3_1_8b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dump", default=None, help="directory for XLA's dumps (set before JAX starts)")
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args(argv)
  if args.dump:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump} --xla_dump_hlo_pass_re=NONE"
    ).strip()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from xattn_jax.models import AttentionConfig, Transformer, llama3_1_8b

  shapes = {
    "llama3_1_8b": {},
    "tiny": dict(vocab_size=512, d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=512),
  }
  rows = []
  for kind in args.kinds.split(","):
    for length in args.lengths:
      for chunk in args.chunk_sizes:
        config = llama3_1_8b(
          num_layers=args.layers, max_seq_len=length, attention=AttentionConfig(kind=kind), **shapes[args.shape]
        )
        model = nnx.eval_shape(
          lambda: Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        )
        graphdef, state = nnx.split(model)
        cache = jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(args.batch, length))
        T = chunk or length
        tokens = jax.ShapeDtypeStruct((args.batch, T), jnp.int32)
        lengths = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
        method = "extend" if chunk else "prefill"
        fn = lambda state, tokens, lengths, cache: getattr(nnx.merge(graphdef, state), method)(tokens, lengths, cache)
        start = time.perf_counter()
        compiled = jax.jit(fn, donate_argnums=3).lower(state, tokens, lengths, cache).compile()
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        row = dict(
          kind=kind,
          T=length,
          chunk=chunk,
          program=method,
          compile_s=round(seconds, 1),
          temp_gib=memory.temp_size_in_bytes / 2**30,
          argument_gib=memory.argument_size_in_bytes / 2**30,
          platform=jax.default_backend(),
          layers=args.layers,
          shape=args.shape,
        )
        rows.append(row)
        print(
          f"{kind:<10} T={length:>7} {'one-shot' if not chunk else f'chunk {chunk}':<12} temps "
          f"{row['temp_gib']:7.2f} GiB  arguments {row['argument_gib']:6.2f} GiB  compile {seconds:5.1f} s",
          flush=True,
        )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
