"""Probe: one decode step's attention (T = 1) over a long KV cache, formulations compared by the bandwidth they reach.

A decode step reads the whole cache once; its floor is (K + V bytes) / HBM bandwidth. The model's decode at 128K
reached 43% of the weights-plus-cache roofline (benchmarks/notes_model_prefill.md), so the attention is the suspect.
Variants (all [B, S, K, H] caches as the model stores them, GQA 32/8, head dim 128, bf16, f32 softmax):
  current      - xattn_jax.dense's decode route (two dot_generals; for B > 1 batched over the sequence only, each
                 query widened to all kv heads with zeros outside its own)
  wide         - the B > 1 route at every B (at B = 1 too)
  two_batch    - the B = 1 route at every B (the route until 2026-12-06): dots batched over the sequence and the kv
                 head, which are not one stride of the cache, so XLA transposes it (in the model's decode loop, once
                 for the whole loop: a second cache)
  elementwise  - the route before that (elementwise products reduced over H, then over S)
  unrolled     - the B = 1 route once per sequence
Measured on the H200 (2026-12-03, jax 0.11.2) before the switch: the dot route 0.174 ms at B=1, S=128K
(3.09 TB/s) against 0.909 ms (0.59 TB/s) elementwise; at B=8 1.16 against 0.93 TB/s, and per sequence 3.36 TB/s
(but 2.5x slower than one batched pair inside the model's decode loop: 37.1 against 14.6 ms per step at 32K, B=8);
S split into 8-128 chunks (flash-decoding in XLA) 0.6-0.9 TB/s. Results: benchmarks/notes_model_prefill.md.

  python benchmarks/probe_decode_attention.py --lengths 32768,131072 --batches 1,8
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.common import timed
from benchmarks.result_files import csv_of
from xattn_jax import dense


def elementwise_decode(q, k, v, kv_lengths, scale):
  """The formulation the model used until 2026-12-03: products reduced over H, then over S."""
  B, S, K, H = k.shape
  qg = q.reshape(B, 1, K, q.shape[2] // K, H).astype(jnp.float32)
  s = jnp.sum(qg * k[:, :, :, None, :].astype(jnp.float32), axis=-1) * scale  # [B, S, K, G]
  s = jnp.where(jnp.arange(S)[None, :, None, None] < kv_lengths[:, None, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  o = jnp.sum(p[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1) / jnp.sum(p, axis=1)[..., None]
  return o.reshape(B, 1, q.shape[2], H).astype(q.dtype)


def unrolled_decode(q, k, v, kv_lengths, scale):
  """The B = 1 route once per sequence (dots whose only batch dimension is the kv head)."""
  return jnp.concatenate(
    [
      dense._decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], kv_lengths[b : b + 1], scale)
      for b in range(q.shape[0])
    ]
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=csv_of(int), default=[32768, 131072])
  parser.add_argument("--batches", type=csv_of(int), default=[1, 8])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--variants", type=csv_of(str), default=["current", "wide", "two_batch", "unrolled"])
  args = parser.parse_args()
  N, K, H = 32, 8, 128
  scale = H**-0.5
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  for B in args.batches:
    for S in args.lengths:
      if 2 * B * S * K * H * 2 > 60 * 2**30:
        print(f"B={B} S={S}: skipped (cache over 60 GiB)")
        continue
      kq, kk, kv = jax.random.split(jax.random.key(S + B), 3)
      q = jax.random.normal(kq, (B, 1, N, H), jnp.bfloat16)
      k = jax.random.normal(kk, (B, S, K, H), jnp.bfloat16)
      v = jax.random.normal(kv, (B, S, K, H), jnp.bfloat16)
      lengths = jnp.full((B,), S - 3, jnp.int32)
      variants = {
        "current": functools.partial(dense._decode_attention, scale=scale),
        "elementwise": functools.partial(elementwise_decode, scale=scale),
        "unrolled": functools.partial(unrolled_decode, scale=scale),
        "two_batch": functools.partial(dense._decode_attention, scale=scale, widen=False),
        "wide": functools.partial(dense._decode_attention, scale=scale, widen=True),
      }
      ref = jax.jit(variants["current"])(q, k, v, lengths).astype(jnp.float32)
      gb = 2 * k.size * k.dtype.itemsize / 1e9
      for name, fn in ((n, variants[n]) for n in args.variants):
        f = jax.jit(fn)
        err = float(jnp.max(jnp.abs(f(q, k, v, lengths).astype(jnp.float32) - ref)))
        t = timed(f, q, k, v, lengths, repeats=args.repeats, pipeline=10)["ms"]
        print(f"B={B} S={S:>7} {name:<9} {t:8.3f} ms  {gb / t:6.2f} TB/s  max|diff| {err:.2e}", flush=True)
      del k, v


if __name__ == "__main__":
  main()
