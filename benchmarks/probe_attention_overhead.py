"""Where does the fixed cost of the sparse attention call go? (probe for benchmarks/notes_attention_mosaic_gpu.md)

Times, per length, with one or four selected blocks per query block: the kernel alone (persistent grid, and one CTA
per layout row), the whole public op under jit, the XLA prologue (`unmasked_prefix`) alone, and a trivial jitted op
for the host dispatch floor.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import timed, without_traced_checks
from xattn_jax.pallas_kernels import block_sparse_attention_mosaic_gpu as kernel
from xattn_jax.geometry import Geometry


@without_traced_checks  # the ops timed without the dispatch cost of traced checks
def main():
  heads, kv_heads, head_dim = 32, 8, 128
  tiny = jax.jit(lambda x: x + 1)
  print(f"host floor (x+1): {timed(tiny, jnp.ones(8), repeats=30)['ms']:.3f} ms")
  for length in [int(x) for x in sys.argv[1].split(",")]:
    nb = length // 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, length, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, length, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, length, kv_heads, head_dim), jnp.bfloat16)
    geometry = Geometry.from_lengths(jnp.array([length], jnp.int32), jnp.array([length], jnp.int32))
    for name, blocks in (("diag only", 1), ("4 blocks", 4)):
      mask = jnp.broadcast_to(
        (jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None])
        & (jnp.arange(nb)[None, :] > jnp.arange(nb)[:, None] - blocks),
        (1, heads, nb, nb),
      )
      layout = xa.BlockLayout.from_dense(mask)
      direct = jax.jit(
        lambda q, k, v, layout: kernel.block_sparse_attention(
          q, k, v, layout, geometry, causal=True, scale=head_dim**-0.5
        )
      )
      per_row = jax.jit(
        lambda q, k, v, layout: kernel.block_sparse_attention(
          q, k, v, layout, geometry, causal=True, scale=head_dim**-0.5, config=kernel.ForwardConfig(num_ctas=None)
        )
      )
      public = jax.jit(
        lambda q, k, v, layout: xa.block_sparse_attention(
          q, k, v, layout, causal=True, implementation="pallas_mosaic_gpu"
        )
      )
      prefix = jax.jit(lambda layout: kernel.unmasked_prefix(layout, geometry, causal=True))
      print(
        f"T={length:>6} {name:>9}: kernel {timed(direct, q, k, v, layout, repeats=30)['ms']:7.3f} ms   "
        f"one CTA per row {timed(per_row, q, k, v, layout, repeats=30)['ms']:7.3f} ms   public op "
        f"{timed(public, q, k, v, layout, repeats=30)['ms']:7.3f} ms   unmasked_prefix "
        f"{timed(prefix, layout, repeats=30)['ms']:7.3f} ms",
        flush=True,
      )


if __name__ == "__main__":
  main()
