"""Time to first token and long-context decode of an 8B-class model on one GPU: dense vs XAttention.

    python benchmarks/model_prefill.py --lengths 8192,32768,131072 --tag 8k-128k
    python benchmarks/model_prefill.py --sections decode --decode-contexts 32768,131072 --decode-batches 1,8

Model: the Llama-3.1-8B shape (`xattn_jax.models.llama3_1_8b`, all 32 layers unless --layers), random bf16 weights
made on the device (or --checkpoint, a Hugging Face directory or .gguf file). One random prompt of T tokens per length.

prefill section, per length T: `Generator(model, max_len=T, chunk_size=T)` (one shot) and `chunk_size=C` (chunked,
C = --chunk-size, default min(T / 4, 32K)), dense and XAttention. Random weights give diffuse attention, so
XAttention runs at its natural density (--threshold, 0.9) and at flat thresholds searched to land near each
--target-densities entry: one prefill with a grid of thresholds spread over the layers gives density against tau,
interpolated per target. Each row: TTFT (median of --repeats prefill calls, compiled ahead of time), compile
seconds, XLA temporaries of the compiled program, and the device's peak memory so far (allocator peak since the
process started: monotone, so an upper bound for the row). The XAttention rows also carry the TTFT that op-level
times predict: the dense one-shot TTFT minus layers x the dense model's attention call (`dense_attention` with its
lengths: cuDNN where it serves), plus layers x (estimator + selection + sparse kernel at the row's density), each op
timed on random inputs of the same shape in the same process.

decode section, per context L and batch B: a cache filled with L random keys/values per sequence, then greedy decode
of --decode-tokens tokens in the generator's while loop; tokens/s against the roofline (weights + KV cache read per
step over the HBM bandwidth measured in the same process: the larger of a 4 GiB copy and a 4 GiB max). Shapes that
do not fit the device are reported as such.

Writes <out-dir>/model_prefill/<card>/<date>-<tag>.json and .md (after every row) and a TTFT plot.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import device_op_times, fixed_density_layout, timed, without_traced_checks
from benchmarks.result_files import add_output_args, csv_of, metadata, stem_file, write_result
from xattn_jax.models import AttentionConfig, Generator, Transformer, from_pretrained, llama3_1_8b
from xattn_jax.models.generate import CACHE_ALIGN
from xattn_jax.models.modules import LayerCache
from xattn_jax.models.transformer import KVCache

SCRIPT = "model_prefill"
GiB = 2**30
THRESHOLD_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Overrides of the Llama-3.1-8B preset: "tiny" runs the whole script on a CPU in seconds (its smoke test).
SHAPES = {
  "llama3_1_8b": {},
  "tiny": dict(vocab_size=512, d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=512),
}


def make_model(args) -> Transformer:
  if args.checkpoint:
    return from_pretrained(args.checkpoint, dtype=jnp.bfloat16)
  config = llama3_1_8b(
    num_layers=args.layers, max_seq_len=max(args.lengths + args.decode_contexts) + 1024, **SHAPES[args.shape]
  )

  @nnx.jit
  def create():
    return Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed))

  return create()


def memory_peak(devices=None) -> float:
  """The largest allocator peak (GiB) over `devices` (default: the first device); negative without statistics."""
  return max((d.memory_stats() or {}).get("peak_bytes_in_use", -1) for d in devices or jax.devices()[:1]) / GiB


def xattention_config(args, threshold: float, stride: int | None = None) -> AttentionConfig:
  return AttentionConfig(
    kind="xattention",
    xattention=xa.XAttentionConfig(
      stride=stride or args.stride, threshold=threshold, query_chunk_size=args.query_chunk_size
    ),
  )


def time_prefill(gen: Generator, prompt, repeats: int) -> dict:
  """TTFT of `gen` on one prompt: compile (ahead of time, first call), then `repeats` timed prefills."""
  start = time.perf_counter()
  logits, cache, dens = gen.prefill([prompt])
  jax.block_until_ready(logits)
  first = time.perf_counter() - start
  del cache
  programs = {"prefill" if len(prompt) <= gen.chunk_size else "extend"}
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    logits, cache, dens = gen.prefill([prompt])
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - start)
    del cache
  densities = np.asarray(dens)
  return dict(
    ttft_s=statistics.median(times),
    ttft_min_s=min(times),
    first_call_s=first,
    compile_s=sum(r.seconds for r in gen.compile_log if r.name in programs),  # this generator's, once
    temp_gib=max((r.temp_bytes for r in gen.compile_log if r.name in programs), default=-1) / GiB,
    density=float(densities[densities >= 0].mean()) if (densities >= 0).any() else 1.0,
    layer_densities=[round(float(d), 4) for d in densities],
    peak_gib=memory_peak(),
    finite=bool(jnp.all(jnp.isfinite(logits))),
    logits=np.asarray(logits[0], np.float32),
  )


def search_thresholds(gen: Generator, prompt, layers: int, targets) -> dict:
  """Flat thresholds expected to land near each target density: prefills with THRESHOLD_GRID spread over the layers
  (in round r layer i gets grid[(r * layers + i) % len(grid)]; one round when layers >= len(grid)), the density of
  each tau averaged over its layers, interpolated."""
  seen = {t: [] for t in THRESHOLD_GRID}
  for r in range(-(-len(THRESHOLD_GRID) // layers)):
    per_layer = [THRESHOLD_GRID[(r * layers + i) % len(THRESHOLD_GRID)] for i in range(layers)]
    gen.set_thresholds(per_layer)
    _, cache, dens = gen.prefill([prompt])
    del cache
    for t, d in zip(per_layer, np.asarray(dens)):
      seen[t].append(float(d))
  taus = np.array(THRESHOLD_GRID)
  curve = np.maximum.accumulate([np.mean(seen[t]) for t in THRESHOLD_GRID])  # monotone in tau (SPEC §2.6)
  gen.set_thresholds()
  found = {t: float(np.interp(t, curve, taus, left=0.0, right=1.0)) for t in targets}
  return dict(grid=taus.tolist(), densities=[round(float(c), 4) for c in curve], thresholds=found)


def refine_threshold(gen: Generator, prompt, search: dict, target: float, steps: int, tolerance: float = 0.005):
  """Newton steps from the interpolated tau with the same flat tau in every layer (the grid run mixes layers, and
  density is not linear in tau): measure, step by (target - density) / slope of the grid curve there. Returns
  (tau, [(tau, density) measured])."""
  taus, curve = np.array(search["grid"]), np.array(search["densities"])
  tau, tried = search["thresholds"][target], []
  for _ in range(steps):
    gen.set_thresholds(tau)
    _, cache, dens = gen.prefill([prompt])
    del cache
    dens = np.asarray(dens)
    density = float(dens[dens >= 0].mean())
    tried.append((round(tau, 4), round(density, 4)))
    if abs(density - target) <= tolerance:
      break
    i = int(np.clip(np.searchsorted(taus, tau), 1, len(taus) - 1))
    slope = max((curve[i] - curve[i - 1]) / (taus[i] - taus[i - 1]), 1e-3)
    tau = float(np.clip(tau + (target - density) / slope, 0.0, 1.0))
  gen.set_thresholds()
  return tau, tried


def random_qkv(cfg, length: int):
  """Random bf16 q, k, v of the model's attention shape at B=1."""
  kq, kk, kv = jax.random.split(jax.random.key(length), 3)
  q = jax.random.normal(kq, (1, length, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  k = jax.random.normal(kk, (1, length, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  v = jax.random.normal(kv, (1, length, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  return q, k, v


def estimator_ms(args, cfg, length: int, stride: int) -> float:
  """One layer's antidiagonal scoring at `stride` on random inputs (for a row whose stride is not --stride)."""
  q, k, _ = random_qkv(cfg, length)
  est = jax.jit(lambda q, k: xa.antidiagonal_scores(q, k, stride=stride))
  return timed(est, q, k, repeats=max(3, args.op_repeats))["ms"]


def profile_prefill(gen: Generator, prompt, row: dict, top: int, label: str) -> None:
  """Where one prefill's device time goes (`device_op_times`: the `top` largest ops per profile line), into row."""

  def run_once():
    logits, cache, _ = gen.prefill([prompt])
    jax.block_until_ready(logits)
    del cache
    return logits

  row["profile"] = device_op_times(run_once, top=top, warmup=False)
  for op in row["profile"]:
    print(f"{label} profile: {op['ms']:9.3f} ms {op['count']:6.0f}x {op['line']}: {op['name'][:120]}", flush=True)


def op_times(args, cfg, length: int, densities) -> dict:
  """Per-layer attention times on random inputs of the model's attention shape (B=1, bf16, causal); dense is the call
  the dense model's prefill makes (`xattn_jax.dense_attention` with one traced lengths array for queries and keys),
  and `dense_route` names the attention kernel its compiled program holds ("cudnn", "mosaic_gpu" or "xla"), next
  to the route `xattn_jax.dense_route` picks for it (`dense_route_picked`)."""
  N, H = cfg.num_heads, cfg.head_dim
  q, k, v = random_qkv(cfg, length)
  kl = jax.random.key(length + 1)
  repeats = max(3, args.op_repeats)
  dense = jax.jit(
    lambda q, k, v, n: xa.dense_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n)
  )
  lengths = jnp.full((1,), length, jnp.int32)
  dense = dense.lower(q, k, v, lengths).compile()  # compiled once: timed, and read for its attention kernel
  out = dict(
    dense_ms=timed(dense, q, k, v, lengths, repeats=repeats)["ms"],
    dense_route=attention_kernel(dense),
    dense_route_picked=xa.dense_route(
      platform=jax.default_backend(),
      dtype=q.dtype,
      batch=1,
      q_len=length,
      kv_len=length,
      num_heads=N,
      head_dim=H,
      causal=True,
      aligned=True,
    ).value,
  )
  if jax.default_backend() == "gpu":  # what else the dense model could run: the data for dense_route's choice
    alternatives = dict(
      cudnn_without_lengths=jax.jit(
        lambda q, k, v, n: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      ),
      block_kernel=jax.jit(
        lambda q, k, v, n: xa.dense_attention(
          q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n, implementation="pallas_mosaic_gpu"
        )
      ),
    )
    out["dense_alternatives_ms"] = {
      name: timed(fn, q, k, v, lengths, repeats=repeats)["ms"] for name, fn in alternatives.items()
    }
  est = jax.jit(lambda q, k: xa.antidiagonal_scores(q, k, stride=args.stride))
  out["estimator_ms"] = timed(est, q, k, repeats=repeats)["ms"]
  scores = est(q, k)
  select = jax.jit(lambda s: xa.select_blocks(s, q_len=length, kv_len=length, threshold=0.5))
  out["selection_ms"] = timed(select, scores, repeats=repeats)["ms"]
  del scores
  sparse = jax.jit(lambda q, k, v, layout: xa.block_sparse_attention(q, k, v, layout, causal=True))
  out["sparse_ms"] = {}
  for d in densities:
    layout = fixed_density_layout(kl, batch=1, heads=N, length=length, density=d)
    out["sparse_ms"][round(d, 4)] = timed(sparse, q, k, v, layout, repeats=repeats)["ms"]
    del layout
  return out


def _route(ops: dict) -> str:
  """The dense call's compiled kernel, and the route dense_route picked where one says cuDNN and the other does not
  (older files hold the picked route alone)."""
  compiled, picked = ops["dense_route"], ops.get("dense_route_picked", ops["dense_route"])
  return compiled if (compiled == "cudnn") == (picked == "cudnn") else f"{compiled}; dense_route picked {picked}"


def attention_kernel(compiled) -> str:
  """Which attention kernel a compiled program holds: "cudnn", "mosaic_gpu" or "xla"."""
  text = compiled.as_text()
  return "cudnn" if "cudnn" in text.lower() else "mosaic_gpu" if "mosaic_gpu" in text else "xla"


def prefill_section(args, model, result, write):
  rng = np.random.default_rng(args.seed)
  layers = model.config.num_layers
  dense_model = model.with_attention(AttentionConfig())
  for length in args.lengths:
    prompt = rng.integers(0, model.config.vocab_size, size=length).tolist()
    chunk = args.chunk_size or min(length // 4, 32768)
    base = dict(T=length, layers=layers)
    rows = {}

    def record(name, gen, **extra):
      r = time_prefill(gen, prompt, args.repeats if length <= 131072 else 1)
      logits = r.pop("logits")
      if "dense one-shot" in rows and "logits" in rows["dense one-shot"]:
        ref = rows["dense one-shot"]["logits"]
        r["max_logit_diff_vs_dense"] = float(np.max(np.abs(logits - ref)))
      row = dict(base, what=name, chunk=gen.chunk_size, **r, **extra)
      result["prefill"].append(row)
      rows[name] = dict(row, logits=logits)
      print(
        f"{length:>7} {name:<34} TTFT {r['ttft_s']:7.3f} s  density {r['density']:.3f}  compile "
        f"{r['compile_s']:5.1f} s  temps {r['temp_gib']:6.2f} GiB  peak {r['peak_gib']:6.1f} GiB",
        flush=True,
      )
      write()
      return row

    modes = [(mode, size) for mode, size in (("one-shot", length), ("chunked", chunk)) if mode in args.modes]
    for mode, size in modes if "dense" in args.kinds else ():
      gen = Generator(dense_model, max_len=length, chunk_size=size, bucket=128)
      row = record(f"dense {mode}", gen)
      if args.prefill_profile and mode == "one-shot":
        profile_prefill(gen, prompt, row, args.prefill_profile, f"{length:>7} dense")
      del gen
    ops = None
    strides = [args.stride] + ([args.extra_stride] if args.extra_stride else [])
    for stride, (mode, size) in itertools.product(strides, modes if "xattention" in args.kinds else ()):
      extra = stride != args.stride  # the extra stride: first target density only, its own estimator time
      gen = Generator(
        model.with_attention(xattention_config(args, args.threshold, stride)),
        max_len=length,
        chunk_size=size,
        bucket=128,
      )
      if args.natural and not extra:
        record(f"xattention {mode} tau={args.threshold:g}", gen)
      targets = args.target_densities[:1] if extra else args.target_densities
      if mode == modes[0][0]:  # one search per stride, reused by the other mode
        search = search_thresholds(gen, prompt, layers, targets)
        result["threshold_search"].append(dict(base, stride=stride, **search))
        print(f"{length:>7} threshold search s={stride}: {search}", flush=True)
      for target in targets:
        tau, tried = refine_threshold(gen, prompt, search, target, args.refine)
        label = f" s={stride}" if extra else ""
        print(f"{length:>7} refine {mode}{label} ~{target:.0%}: {tried} -> tau {tau:.3f}", flush=True)
        gen.set_thresholds(tau)
        row = record(
          f"xattention {mode}{label} ~{target:.0%} (tau={tau:.3f})",
          gen,
          target_density=target,
          threshold=tau,
          stride=stride,
          refine=tried,
        )
        if ops is None:  # at the densities the one-shot rows reached
          reached = [r["density"] for r in result["prefill"] if r["T"] == length and r["what"].startswith("xatt")]
          ops = op_times(args, model.config, length, reached + [t for t in args.target_densities if t not in reached])
          result["ops"].append(
            dict(
              base,
              **{k: v for k, v in ops.items() if k != "sparse_ms"},
              sparse_ms={str(k): v for k, v in ops["sparse_ms"].items()},
            )
          )
        own = ops
        if extra:
          key = f"estimator_ms_s{stride}"
          if key not in result["ops"][-1]:
            result["ops"][-1][key] = estimator_ms(args, model.config, length, stride)
          own = dict(ops, estimator_ms=result["ops"][-1][key])
        if "dense one-shot" in rows:
          row.update(predict(rows["dense one-shot"], own, row["density"], layers))
        if args.prefill_profile and mode == "one-shot" and target == targets[0]:
          profile_prefill(gen, prompt, row, args.prefill_profile, f"{length:>7} xattention s={stride}")
        write()
      gen.set_thresholds()
      del gen
    for name, row in rows.items():
      row.pop("logits", None)


def predict(dense_row, ops, density: float, layers: int) -> dict:
  """TTFT from op-level times: the dense model's non-attention time plus XAttention's ops at this density."""
  known = sorted(ops["sparse_ms"])
  nearest = min(known, key=lambda d: abs(d - density))
  sparse_ms = ops["sparse_ms"][nearest] * (density / nearest if nearest > 0 else 1.0)
  other_s = dense_row["ttft_s"] - layers * ops["dense_ms"] / 1e3
  attn_s = layers * (ops["estimator_ms"] + ops["selection_ms"] + sparse_ms) / 1e3
  return dict(predicted_ttft_s=other_s + attn_s, non_attention_s=other_s, predicted_attention_s=attn_s)


def measured_bandwidth() -> dict:
  """HBM bytes/s measured here on a 4 GiB array (256 MiB off a GPU): a copy (read + write counted) and a max over
  its rows (read only). A decode step only reads, and reads can stream faster than a copy (on the H200 2.96 TB/s
  copying, the decode attention's cache reads 3.4 TB/s), so the roofline uses the larger."""
  rows = 2048 if jax.default_backend() == "gpu" else 128  # 4 GiB on a GPU, 256 MiB on a host
  x = jax.random.normal(jax.random.key(0), (rows, 1024, 1024), jnp.bfloat16)
  nbytes = x.size * x.dtype.itemsize
  copy = timed(jax.jit(lambda x: x + jnp.bfloat16(1.0)), x, repeats=20)["ms"] / 1e3
  read = timed(jax.jit(lambda x: jnp.max(x, axis=0)), x, repeats=20)["ms"] / 1e3
  return dict(copy=2 * nbytes / copy, read=nbytes / read)


def decode_section(args, model, result, write):
  cfg = model.config
  params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  embed = cfg.vocab_size * cfg.d_model * 2 if not cfg.tie_embeddings else 0  # a lookup reads B rows, not the table
  measured = measured_bandwidth()
  bandwidth = max(measured.values())
  result.update(copy_bandwidth_tb_s=measured["copy"] / 1e12, read_bandwidth_tb_s=measured["read"] / 1e12)
  free = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 139 * GiB) - params
  dense_model = model.with_attention(AttentionConfig())
  for context, batch, align in itertools.product(args.decode_contexts, args.decode_batches, args.cache_aligns):
    max_len = context + 2 * args.decode_tokens
    max_len = -(-max_len // 128) * 128
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    gen = Generator(dense_model, max_len=max_len, chunk_size=128, bucket=128, cache_align=align)
    cache_bytes = batch * gen.cache_len * kv_per_token
    row = dict(context=context, batch=batch, cache_align=align, cache_len=gen.cache_len, cache_gib=cache_bytes / GiB)
    if cache_bytes > 0.9 * free:
      row["note"] = f"does not fit: the cache needs {cache_bytes / GiB:.0f} GiB, {free / GiB:.0f} GiB free"
      result["decode"].append(row)
      print(f"decode {context:>7} x{batch}: {row['note']}", flush=True)
      write()
      continue
    # A random cache, one array at a time (an 8B model at 32K and B = 8: 64 arrays of 0.5 GiB), the previous one freed
    # first. Filling an `init_cache` cache in one donated program ran out of memory at 32K, B = 8 on an 80 GB card
    # (34.6 GB of cache next to 16 GB of weights; why the donation did not bound it was not established).
    shape = (batch, gen.cache_len, cfg.num_kv_heads, cfg.head_dim)
    normal = jax.jit(lambda key, shape=shape: jax.random.normal(key, shape, dense_model.dtype))

    def fill(seed, shape=shape, normal=normal, batch=batch, context=context):
      arrays = [normal(jax.random.fold_in(jax.random.key(seed), i)) for i in range(2 * cfg.num_layers)]
      layers = tuple(LayerCache(arrays[2 * i], arrays[2 * i + 1]) for i in range(cfg.num_layers))
      return KVCache(layers, jnp.full((batch,), context, jnp.int32))

    logits = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)
    steps_s = []
    for rep in range(args.repeats + 1):  # the first run compiles and warms up
      cache = None  # the previous step's cache, freed before the next is made
      cache = fill(rep)
      jax.block_until_ready(cache)
      start = time.perf_counter()
      given = cache
      out, steps, cache = gen.decode(logits, cache, max_new_tokens=args.decode_tokens)
      jax.block_until_ready(out)
      row["cache_donated"] = bool(given.layers[0].k.is_deleted())
      del given
      if rep:
        steps_s.append((time.perf_counter() - start) / int(steps))
    step = statistics.median(steps_s)
    read = params - embed + batch * cfg.d_model * 2 + batch * context * kv_per_token
    roofline_step = read / bandwidth
    row.update(
      step_ms=step * 1e3,
      tokens_per_s=batch / step,
      roofline_step_ms=roofline_step * 1e3,
      fraction_of_roofline=roofline_step / step,
      bytes_per_step_gb=read / 1e9,
      datasheet_fraction=(read / 4.8e12) / step,
      decode_compiles=gen.compiled_count("decode"),
      decode_temp_gib=gen.compile_log[-1].temp_bytes / GiB,
    )
    result["decode"].append(row)
    print(
      f"decode {context:>7} x{batch} cache {gen.cache_len}: {step * 1e3:7.2f} ms/step  {batch / step:8.1f} tok/s  "
      f"roofline {roofline_step * 1e3:6.2f} ms ({row['fraction_of_roofline']:.0%} of it)",
      flush=True,
    )
    if args.decode_profile:
      cache = None
      cache = fill(0)
      run_once = functools.partial(gen.decode, max_new_tokens=args.decode_tokens)
      row["profile"] = device_op_times(
        run_once, logits, cache, divide_by=args.decode_tokens, top=args.decode_profile, warmup=False
      )
      for op in row["profile"]:
        where = f"{op['ms']:8.4f} ms {op['count']:6.1f}x {op['line']}: {op['name']}"
        print(f"decode {context:>7} x{batch} per step: {where}", flush=True)
    write()
    del cache, gen


def bandwidth_words(result: dict) -> str:
  """The bandwidths a result measured for its decode roofline, in words (runs before the read kernel have the copy
  only)."""
  copy, read = result.get("copy_bandwidth_tb_s"), result.get("read_bandwidth_tb_s")
  if copy is not None and read is not None:
    return f"the larger of a copy's {copy:.2f} TB/s and a max's {read:.2f} TB/s"
  if copy is not None:
    return f"a copy's {copy:.2f} TB/s"
  return "none recorded"


def to_markdown(result: dict) -> str:
  lines = [
    f"# Model prefill and decode: {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    result["model"],
    "",
  ]
  if result["prefill"]:
    lines += [
      "## Time to first token",
      "",
      "| T | what | chunk | TTFT s | vs dense one-shot | predicted s | density | compile s | XLA temps GiB | "
      "peak GiB (so far) | max logit diff vs dense |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = {r["T"]: r["ttft_s"] for r in result["prefill"] if r["what"] == "dense one-shot"}
    for r in result["prefill"]:
      speed = f"{dense[r['T']] / r['ttft_s']:.2f}x" if r["T"] in dense else "(no dense row)"
      pred = f"{r['predicted_ttft_s']:.3f}" if "predicted_ttft_s" in r else ""
      diff = f"{r['max_logit_diff_vs_dense']:.3f}" if "max_logit_diff_vs_dense" in r else ""
      lines.append(
        f"| {r['T']} | {r['what']} | {r['chunk']} | {r['ttft_s']:.3f} | {speed} | {pred} | "
        f"{r['density']:.3f} | {r['compile_s']:.1f} | {r['temp_gib']:.2f} | {r['peak_gib']:.1f} | {diff} |"
      )
    lines += ["", "Threshold search (density against tau, one prefill with the grid over the layers):", ""]
    for s in result["threshold_search"]:
      lines.append(
        f"- T={s['T']}: "
        + ", ".join(f"{t:g}: {d:.3f}" for t, d in zip(s["grid"], s["densities"]))
        + "; chosen "
        + ", ".join(f"~{float(k):.0%}: tau {v:.3f}" for k, v in s["thresholds"].items())
      )
    lines += ["", "Op-level times per layer (random inputs, same shapes, same process):", ""]
    for o in result["ops"]:
      lines.append(
        f"- T={o['T']}: dense ({_route(o)}) {o['dense_ms']:.2f} ms, estimator "
        f"{o['estimator_ms']:.2f} ms, selection "
        f"{o['selection_ms']:.2f} ms, sparse kernel "
        + ", ".join(f"d={d}: {ms:.2f} ms" for d, ms in o["sparse_ms"].items())
        + "".join(
          f"; dense alternative {name.replace('_', ' ')}: {ms:.2f} ms"
          for name, ms in o.get("dense_alternatives_ms", {}).items()
        )
      )
  if result["decode"]:
    lines += [
      "",
      "## Decode",
      "",
      "Roofline: bytes read per step (weights, and the KV cache of the context) over the HBM bandwidth "
      f"measured here ({bandwidth_words(result)}); the datasheet's 4.8 TB/s in the last column.",
      "",
      "| context | batch | ms/step | tokens/s | roofline ms | of roofline | of datasheet roofline | GB/step | note |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decode"]:
      if "step_ms" not in r:
        lines.append(f"| {r['context']} | {r['batch']} | | | | | | | {r['note']} |")
        continue
      lines.append(
        f"| {r['context']} | {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | "
        f"{r['roofline_step_ms']:.2f} | {r['fraction_of_roofline']:.0%} | {r['datasheet_fraction']:.0%} | "
        f"{r['bytes_per_step_gb']:.1f} | decode compiled {r['decode_compiles']}x"
        + (f"; cache of {r['cache_len']} tokens" if "cache_len" in r else "")
        + " |"
      )
  return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  names = []
  for r in result["prefill"]:
    key = r["what"].split(" (tau")[0]
    if key not in names:
      names.append(key)
  for name in names:
    pts = sorted((r["T"], r["ttft_s"]) for r in result["prefill"] if r["what"].split(" (tau")[0] == name)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("prompt tokens")
  ax.set_ylabel("time to first token (s)")
  ax.set_title(f"{result['card']}: {result['model']}", fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@without_traced_checks  # production dispatch: no checkify effects in the timed programs
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ints, floats = csv_of(int), csv_of(float)
  parser.add_argument("--sections", default="prefill", help="comma separated: prefill, decode")
  parser.add_argument("--lengths", type=ints, default=[8192, 32768, 131072])
  parser.add_argument("--chunk-size", type=int, default=None, help="default: min(T / 4, 32768)")
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_1_8b")
  parser.add_argument("--checkpoint", default=None, help="Hugging Face directory or .gguf (default: random weights)")
  parser.add_argument("--threshold", type=float, default=0.9, help="XAttention's natural-density threshold")
  parser.add_argument("--target-densities", type=floats, default=[0.10, 0.25])
  parser.add_argument(
    "--refine", type=int, default=2, help="flat-tau prefills per target density that correct the searched tau (0: none)"
  )
  parser.add_argument("--kinds", type=csv_of(str), default=["dense", "xattention"])
  parser.add_argument("--modes", type=csv_of(str), default=["one-shot", "chunked"])
  parser.add_argument(
    "--no-natural",
    dest="natural",
    action="store_false",
    help="skip XAttention at --threshold (slow at long lengths: random weights keep ~half)",
  )
  parser.add_argument("--stride", type=int, default=8)
  parser.add_argument(
    "--query-chunk-size",
    type=int,
    default=None,
    help="XAttention's query chunk (a multiple of 128; default: from its table budget, e.g. 4 chunks of 32K at 128K "
    "and stride 8): each chunk slices q and writes its output rows, one copy each per layer",
  )
  parser.add_argument(
    "--extra-stride",
    type=int,
    default=None,
    help="also XAttention rows (every --modes) with this stride at the first target density",
  )
  parser.add_argument(
    "--prefill-profile",
    type=int,
    default=0,
    help="after the dense one-shot row and the first one-shot row of each stride: the N largest ops of one prefill",
  )
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--op-repeats", type=int, default=5)
  parser.add_argument("--decode-contexts", type=ints, default=[32768, 131072])
  parser.add_argument("--decode-batches", type=ints, default=[1, 8])
  parser.add_argument("--decode-tokens", type=int, default=64)
  parser.add_argument(
    "--cache-aligns", type=ints, default=[CACHE_ALIGN], help="decode: the Generator's cache_align values to compare"
  )
  parser.add_argument(
    "--decode-profile", type=int, default=0, help="after timing, where one step's device time goes: the N largest ops"
  )
  parser.add_argument("--seed", type=int, default=0)
  add_output_args(parser)
  args = parser.parse_args(argv)
  sections = set(args.sections.split(","))
  if not sections <= {"prefill", "decode"}:
    parser.error(f"--sections {args.sections}: choose from prefill, decode")
  if "decode" not in sections:
    args.decode_contexts = []
  model = make_model(args)
  result = dict(
    metadata(SCRIPT, argv),
    model=(
      f"{args.checkpoint or args.shape + ' shape, random bf16 weights'}, {model.config.num_layers} "
      f"layers, XAttention stride {args.stride}, block 128"
    ),
    prefill=[],
    threshold_search=[],
    ops=[],
    decode=[],
  )

  def write():
    return write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)

  if "prefill" in sections:
    prefill_section(args, model, result, write)
    plot(result, stem_file(write(), ".png"))
  if "decode" in sections:
    decode_section(args, model, result, write)
  stem = write()
  print(to_markdown(result))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
