"""The XLA reference at 32K tokens x 32 heads on a CPU, within the memory of the CI machine (slow: -m slow)."""

from __future__ import annotations

import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from xattn_jax.synthetic import llm_like_qkv


@pytest.mark.slow
def test_xattention_32k_tokens_32_heads_on_cpu():
  T, N, K, H = 32768, 32, 8, 128
  q, k, v = llm_like_qkv(jax.random.key(0), seq_len=T, num_heads=N, num_kv_heads=K, head_dim=H)
  out, layout = jax.jit(
    lambda q, k, v: xa.xattention(
      q, k, v, is_causal=True, threshold=0.9, implementation="xla", return_block_layout=True
    )
  )(q, k, v)
  out = np.asarray(out.astype(jnp.float32))
  assert out.shape == (1, T, N, H) and np.isfinite(out).all()
  density = float(layout.density())
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"density {density:.3f}, peak RSS {peak_gib:.1f} GiB")
  assert 0 < density < 1 and peak_gib < 20


def test_query_chunks_make_no_copy_of_q_or_the_output():
  """xattention's chunk loop slices q and writes the output in place: growing T (ragged, so a tail chunk runs)
  grows the compiled call's temporaries by the key side only, far less than one more copy of q (the old scan over
  a chunked, padded copy of q and a stacked output grew them by about two). Compiled, not run."""

  def temporaries(T):
    q = jax.ShapeDtypeStruct((1, T, 32, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.bfloat16)
    call = jax.jit(
      lambda q, k, v: xa.xattention(
        q, k, v, is_causal=True, threshold=0.9, stride=16, implementation="xla", query_chunk_size=4096
      )
    )
    return call.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

  small, large = 33768, 66536
  q_growth = (large - small) * 32 * 64 * 2
  assert temporaries(large) - temporaries(small) < 0.5 * q_growth


@pytest.mark.parametrize("num_blocks,max_blocks", [(1024, 364), (1024, 1024), (1000, 364), (997, 100), (8, 3), (1, 5)])
def test_query_chunks_divide_the_blocks_when_they_can(num_blocks, max_blocks):
  """The automatic query chunk stays within its budget and divides the blocks when a divisor costs at most twice the
  fewest chunks (no tail chunk: each kernel is in the compiled program once); otherwise the chunks are equal."""
  from xattn_jax.geometry import cdiv, chunk_blocks

  per = chunk_blocks(num_blocks, max_blocks)
  assert 1 <= per <= max_blocks
  fewest = cdiv(num_blocks, max_blocks)
  if any(num_blocks % n == 0 for n in range(fewest, 2 * fewest + 1)):
    assert num_blocks % per == 0 and num_blocks // per <= 2 * fewest
  else:
    assert per == cdiv(num_blocks, fewest)


def test_a_128k_one_shot_call_has_no_tail_chunk():
  """At the 8B shape (32 query / 8 kv heads, 128K tokens) the automatic chunks divide T: the lowered program holds
  each Pallas kernel once (counted in the cuda lowering, which this CPU can produce without a GPU)."""
  q = jax.ShapeDtypeStruct((1, 131072, 32, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 131072, 8, 128), jnp.bfloat16)
  call = jax.jit(lambda q, k, v: xa.xattention(q, k, v, is_causal=True, threshold=0.9))
  text = call.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu_v2") == 2  # the scoring and the attention kernel


def test_block_counts_hold_no_index_table():
  """`return_block_layout="counts"` (what the model asks for its density) returns O(T) per head: at 32K tokens and
  32 heads in query chunks of 4K the compiled call's outputs are the layout's minus its [B, N, T/blk, S/blk] int32
  index table (8 MiB here, 8 GiB at 1M tokens), and its temporaries are no larger: one chunk's table, which the
  kernels read (in a single chunk that is the whole table)."""
  T, N, K, H = 32768, 32, 8, 128
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, T, K, H), jnp.bfloat16)
  kw = dict(is_causal=True, implementation="xla", query_chunk_size=4096)
  memory = {
    mode: jax.jit(lambda q, k, v: xa.xattention(q, k, v, return_block_layout=mode, **kw))
    .lower(q, kv, kv)
    .compile()
    .memory_analysis()
    for mode in (True, "counts")
  }
  table = N * (T // 128) ** 2 * 4
  less = memory[True].output_size_in_bytes - memory["counts"].output_size_in_bytes
  assert table <= less < table + 1024, (less, table)  # (plus a tuple entry)
  assert memory["counts"].temp_size_in_bytes <= memory[True].temp_size_in_bytes
