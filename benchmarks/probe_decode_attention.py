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
  wide_kh, keys_left[_t][_flat] - forms of the widened route (`widened_decode`), for `--in-loop`
Measured on the H200 (2026-12-03, jax 0.11.2) before the switch: the dot route 0.174 ms at B=1, S=128K
(3.09 TB/s) against 0.909 ms (0.59 TB/s) elementwise; at B=8 1.16 against 0.93 TB/s, and per sequence 3.36 TB/s
(but 2.5x slower than one batched pair inside the model's decode loop: 37.1 against 14.6 ms per step at 32K, B=8);
S split into 8-128 chunks (flash-decoding in XLA) 0.6-0.9 TB/s. Results: benchmarks/notes_model_prefill.md.

  python benchmarks/probe_decode_attention.py --lengths 32768,131072 --batches 1,8
  python benchmarks/probe_decode_attention.py --lengths 32768 --batches 8 --in-loop 16 \
    --variants current,wide_kh,keys_left,keys_left_t,keys_left_flat,two_batch
  (the last: inside a decode loop, does XLA's GPU compiler relay a cache out for the loop?)
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

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


def widened_decode(q, k, v, kv_lengths, scale, keys_left: bool, transpose_logits: bool, flat: bool):
  """Forms of the B > 1 route (queries widened to all kv heads), to find one XLA's GPU compiler reads in place inside
  a decode loop. `keys_left`: the K cache is the first dot's left operand (batch, non-contracting S, contracting
  K * H minor: the canonical left form), logits [B, S, N] and softmax over S, or turned to [B, N, S] first with
  `transpose_logits` (tried in the model on the H100 2026-12-06: K still relaid out for the loop). Otherwise the
  query is the left operand, as in xattn_jax.dense. `flat`: the cache's (K, H) merged into one contracting dim, as
  xattn_jax.dense does since 2026-12-06; query left and not flat ("wide_kh") is its route before that, whose K
  cache XLA's GPU compiler relaid out for the decode loop."""
  B, S, K, H = k.shape
  N = q.shape[2]
  own = (jnp.arange(N)[:, None] // (N // K) == jnp.arange(K)[None, :])[None, :, :, None]
  wide = jnp.where(own, q.reshape(B, N, 1, H), jnp.zeros((), q.dtype)).astype(k.dtype)
  kk, vv, c = (k.reshape(B, S, K * H), v.reshape(B, S, K * H), (2,)) if flat else (k, v, (2, 3))
  wide = wide.reshape(B, N, K * H) if flat else wide
  f32 = jnp.float32
  if keys_left:
    s = jax.lax.dot_general(kk, wide, ((c, c), ((0,), (0,))), preferred_element_type=f32) * scale  # [B, S, N]
    s = jnp.swapaxes(s, 1, 2) if transpose_logits else s
  else:
    s = jax.lax.dot_general(wide, kk, ((c, c), ((0,), (0,))), preferred_element_type=f32) * scale  # [B, N, S]
  axis = 1 if keys_left and not transpose_logits else 2
  real = jnp.expand_dims(jnp.arange(S) < kv_lengths[:, None], 3 - axis)
  s = jnp.where(real, s, -jnp.inf)
  m = jnp.max(s, axis=axis, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=axis)  # [B, N]
  dims = (((axis,), (1,)), ((0,), (0,)))
  wide_o = jax.lax.dot_general(p.astype(v.dtype), vv, dims, preferred_element_type=f32).reshape(B, N, K, H)
  o = jnp.sum(jnp.where(own, wide_o, 0.0), axis=2) / jnp.where(l > 0, l, 1.0)[..., None]
  return o.reshape(B, 1, N, H).astype(q.dtype)


def in_decode_loop(fn, steps: int):
  """`steps` decode steps in one program, as the model's decode loop runs them: the caches are carried, each step
  writes its token's K and V at the sequence's length and attends over the cache. XLA's layout assignment sees the
  dots inside the loop, so a cache operand it wants relaid out shows as temporaries (memory_analysis) of its size."""

  def run(q, k, v, kv_lengths):
    def body(i, carry):
      k, v, out = carry
      at = kv_lengths[0] + i - 1
      k = jax.lax.dynamic_update_slice(k, out.reshape(k.shape[0], 1, k.shape[2], -1)[..., : k.shape[3]], (0, at, 0, 0))
      v = jax.lax.dynamic_update_slice(v, out.reshape(v.shape[0], 1, v.shape[2], -1)[..., : v.shape[3]], (0, at, 0, 0))
      return k, v, fn(q + out, k, v, kv_lengths + i)

    return jax.lax.fori_loop(0, steps, body, (k, v, jnp.zeros_like(q)))

  return jax.jit(run, donate_argnums=(1, 2))  # the caches updated in place, as the model's decode loop does


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=csv_of(int), default=[32768, 131072])
  parser.add_argument("--batches", type=csv_of(int), default=[1, 8])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--variants", type=csv_of(str), default=["current", "wide", "two_batch", "unrolled"])
  parser.add_argument("--dtype", default="bfloat16", help="float32 on a CPU (its dots take no bf16 x bf16 -> f32)")
  parser.add_argument(
    "--in-loop", type=int, default=0, help="N > 0: each variant inside an N-step decode loop (temporaries, ms/step)"
  )
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
      dtype = jnp.dtype(args.dtype)
      q = jax.random.normal(kq, (B, 1, N, H), dtype)
      k = jax.random.normal(kk, (B, S, K, H), dtype)
      v = jax.random.normal(kv, (B, S, K, H), dtype)
      lengths = jnp.full((B,), S - 3, jnp.int32)
      variants = {
        "current": functools.partial(dense._decode_attention, scale=scale),
        "elementwise": functools.partial(elementwise_decode, scale=scale),
        "unrolled": functools.partial(unrolled_decode, scale=scale),
        "two_batch": functools.partial(dense._decode_attention, scale=scale, widen=False),
        "wide": functools.partial(dense._decode_attention, scale=scale, widen=True),
      }
      for left in (False, True):
        for t in (False, True) if left else (False,):
          for flat in (False, True) if left else (False,):  # query left and flat: "wide"
            name = ("keys_left" + "_t" * t if left else "wide_kh") + "_flat" * flat
            variants.setdefault(
              name, functools.partial(widened_decode, scale=scale, keys_left=left, transpose_logits=t, flat=flat)
            )
      if args.in_loop:
        for name in args.variants:
          f = in_decode_loop(variants[name], args.in_loop)
          compiled = f.lower(q, k, v, lengths).compile()
          temps = compiled.memory_analysis().temp_size_in_bytes / 2**30
          carried = [
            line.split("while(")[0].strip()[:200] for line in compiled.as_text().splitlines() if " while(" in line
          ]
          k, v, _ = jax.block_until_ready(compiled(q, k, v, lengths))  # warm-up; the caches come back updated
          start = time.perf_counter()
          for _ in range(3):
            k, v, out = compiled(q, k, v, lengths)
          jax.block_until_ready(out)
          t = (time.perf_counter() - start) * 1e3 / 3
          print(
            f"B={B} S={S:>7} {name:<11} in a {args.in_loop}-step loop: temps {temps:6.2f} GiB "
            f"{t / args.in_loop:8.3f} ms/step; loop carry {carried[:1]}",
            flush=True,
          )
        del k, v
        continue
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
