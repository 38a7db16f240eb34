"""`xattn-jax` command line. Subcommands:

  generate       load a model (Hugging Face directory, .gguf, or "smollm2") and answer a prompt file, printing the
                 answer, prefill time, decode tokens/s and the selected block density per layer
  prefill-bench  dense vs XAttention prefill of one prompt: time, density, max logit difference
  needle-prompt  write a needle-in-a-haystack prompt (offline, from Python's own documentation)
  op             the bare op on LLM-like synthetic inputs next to dense attention
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import xattn_jax as xa
from xattn_jax.synthetic import llm_like_qkv


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _op(args) -> int:
  dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[args.dtype]
  q, k, v = llm_like_qkv(jax.random.key(args.seed), batch=args.batch, seq_len=args.seq_len, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=dtype)
  config = xa.XAttentionConfig(stride=args.stride, threshold=args.threshold, block_size=args.block_size,
                               implementation=args.implementation)
  sparse = jax.jit(lambda q, k, v: xa.xattention(
      q, k, v, is_causal=True, threshold=config.threshold, stride=config.stride, block_size=config.block_size,
      implementation=config.implementation, return_block_layout=True))
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  out, layout = sparse(q, k, v)
  ref = dense(q, k, v)
  err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
  t_sparse = _time(sparse, q, k, v, repeats=args.repeats)
  t_dense = _time(dense, q, k, v, repeats=args.repeats)
  print(f"device: {jax.devices()[0].device_kind}   jax {jax.__version__}")
  print(f"shape: B={args.batch} T=S={args.seq_len} N={args.heads} K={args.kv_heads} H={args.head_dim} {args.dtype}, "
        f"causal, stride={args.stride}, threshold={args.threshold}")
  print(f"{'':12}{'time (ms)':>12}{'density':>10}{'rel. error':>12}")
  print(f"{'dense':12}{t_dense * 1e3:12.2f}{1.0:10.3f}{0.0:12.2e}")
  print(f"{'xattention':12}{t_sparse * 1e3:12.2f}{float(layout.density()):10.3f}{err:12.2e}")
  return 0


def _progress(label: str, done: int, total: int) -> None:
  width = 30
  filled = width * done // max(total, 1)
  print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="" if done < total else "\n",
        file=sys.stderr, flush=True)


def _attention_config(args, attention: str):
  from models.config import AttentionConfig

  if attention == "dense":
    return AttentionConfig()
  if getattr(args, "thresholds", None):  # a calibration file: its stride, block size and per-head thresholds
    from models.calibration import attention_config

    return attention_config(args.thresholds, implementation=args.implementation)
  return AttentionConfig(kind="xattention", dense_layers=args.dense_layers, xattention=xa.XAttentionConfig(
      stride=args.stride, threshold=args.threshold, block_size=args.block_size, implementation=args.implementation))


def _load(args, attention: str):
  from models.loading import from_pretrained, load_tokenizer

  dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
  model = from_pretrained(args.model, dtype=dtype, attention=_attention_config(args, attention))
  return model, load_tokenizer(args.model)


def _prompt_ids(args, tokenizer) -> list[int]:
  with open(args.prompt_file, encoding="utf-8") as f:
    text = f.read()
  if args.chat:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
  return tokenizer.encode(text)


def _max_len(n_prompt: int, args) -> int:
  chunk = args.chunk_size
  return max(chunk, -(-(n_prompt + args.max_new_tokens) // chunk) * chunk)


def _generate(args) -> int:
  from models.generate import Generator

  model, tokenizer = _load(args, args.attention)
  ids = _prompt_ids(args, tokenizer)
  gen = Generator(model, max_len=_max_len(len(ids), args), chunk_size=args.chunk_size)
  result = gen.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        stop_tokens=tokenizer.stop_token_ids, seed=args.seed)
  print(tokenizer.decode(result.tokens[0]).strip())
  print(f"\nprompt: {len(ids)} tokens; attention: {args.attention}; device: {jax.devices()[0].device_kind}",
        file=sys.stderr)
  print(f"prefill: {result.prefill_seconds:.2f} s (includes compilation); decode: {result.decode_steps} steps, "
        f"{result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)
  dens = " ".join("dense" if d < 0 else f"{d:.2f}" for d in result.densities)
  print(f"selected block density per layer: {dens}", file=sys.stderr)
  return 0


def _prefill_bench(args) -> int:
  from models.generate import Generator

  rows = []
  last = {}
  for attention in ("dense", "xattention"):
    model, tokenizer = _load(args, attention)
    ids = _prompt_ids(args, tokenizer)
    gen = Generator(model, max_len=_max_len(len(ids), args), chunk_size=args.chunk_size)
    times = []
    for i in range(args.repeats + 1):  # the first run compiles
      _progress(f"{attention:>10} prefill", i, args.repeats + 1)
      start = time.perf_counter()
      logits, _, densities = gen.prefill([ids])
      jax.block_until_ready(logits)
      times.append(time.perf_counter() - start)
    _progress(f"{attention:>10} prefill", args.repeats + 1, args.repeats + 1)
    last[attention] = logits[0]
    dens = [float(d) for d in densities if d >= 0]
    rows.append((attention, statistics.median(times[1:]), times[0], sum(dens) / len(dens) if dens else 1.0))
  diff = float(jnp.max(jnp.abs(last["dense"] - last["xattention"])))
  same = int(jnp.argmax(last["dense"])) == int(jnp.argmax(last["xattention"]))
  print(f"model {args.model}, prompt {len(ids)} tokens, {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"{'attention':12}{'prefill (s)':>13}{'first run (s)':>15}{'density':>9}")
  for name, t, first, d in rows:
    print(f"{name:12}{t:13.3f}{first:15.3f}{d:9.3f}")
  print(f"speedup {rows[0][1] / rows[1][1]:.2f}x; max |logit difference| at the last token {diff:.3e}; "
        f"same next token: {same}")
  return 0


def _needle_prompt(args) -> int:
  from models.haystack import needle_prompt

  prompt = needle_prompt(chars=args.chars, depth=args.depth, haystack=args.haystack, seed=args.seed)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(prompt.text)
  print(f"wrote {args.out}: {len(prompt.text)} characters, needle at depth {prompt.depth}; expected answer "
        f"{prompt.answer}")
  return 0


def _calibrate(args) -> int:
  from models.calibration import calibrate, prompt_ids, task_prompts
  from models.loading import from_pretrained, load_tokenizer
  from xattn_jax.calibration import save_thresholds

  dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
  model, tokenizer = from_pretrained(args.model, dtype=dtype), load_tokenizer(args.model)
  if args.prompt_file:
    prompts, source = [], []
    for path in args.prompt_file:
      with open(path, encoding="utf-8") as f:
        text = f.read()
      prompts.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}])))
      source.append(path)
  else:  # RULER-style samples (models.haystack), seeded apart from the benchmark's
    samples = task_prompts(tokenizer, n=args.prompts, length=args.length)
    prompts, source = [prompt_ids(tokenizer, s) for s in samples], [s.id for s in samples]
  start = time.perf_counter()
  result = calibrate(model, prompts, target=args.target, stride=args.stride, block_size=args.block_size,
                     method=args.method, aggregate=args.aggregate,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
  save_thresholds(args.out, result.thresholds, stride=args.stride, block_size=args.block_size, target=args.target,
                  method=args.method, aggregate=args.aggregate, model=str(args.model), prompts=len(prompts),
                  calibration_prompts=source, prompt_tokens=[len(p) for p in prompts],
                  seconds=round(time.perf_counter() - start, 1))
  t = result.thresholds
  print(f"wrote {args.out}: thresholds [{t.shape[0]} layers, {t.shape[1]} heads], mean {t.mean():.3f}, min "
        f"{t.min():.3f}, max {t.max():.3f} (target {args.target} of the exact attention mass, method {args.method})")
  print(f"use it: xattn-jax generate --model {args.model} --thresholds {args.out} ...  or  "
        f"models.calibration.attention_config({args.out!r})")
  return 0


def _model_args(p, *, attention: bool) -> None:
  p.add_argument("--model", required=True, help='Hugging Face directory, .gguf file, or "smollm2"')
  p.add_argument("--prompt-file", required=True)
  if attention:
    p.add_argument("--attention", choices=["dense", "xattention"], default="xattention")
  p.add_argument("--stride", type=int, default=8)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--thresholds", default=None,
                 help="a file of `xattn-jax calibrate` (per-head thresholds; overrides --stride/--threshold)")
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--dense-layers", type=int, default=0, help="keep the first n layers dense")
  p.add_argument("--implementation", default=None)
  p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  p.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk (prompts longer than this are chunked)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
  p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="xattn-jax", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  op = sub.add_parser("op", help="run xattention on synthetic LLM-like inputs next to dense attention")
  op.add_argument("--seq-len", type=int, default=4096)
  op.add_argument("--batch", type=int, default=1)
  op.add_argument("--heads", type=int, default=8)
  op.add_argument("--kv-heads", type=int, default=2)
  op.add_argument("--head-dim", type=int, default=64)
  op.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="f32")
  op.add_argument("--stride", type=int, default=8)
  op.add_argument("--threshold", type=float, default=0.9)
  op.add_argument("--block-size", type=int, default=128)
  op.add_argument("--implementation", default=None)
  op.add_argument("--repeats", type=int, default=3)
  op.add_argument("--seed", type=int, default=0)
  op.set_defaults(run=_op)
  gen = sub.add_parser("generate", help="answer a prompt file with a model")
  _model_args(gen, attention=True)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--top-p", type=float, default=1.0)
  gen.set_defaults(run=_generate)
  bench = sub.add_parser("prefill-bench", help="dense vs XAttention prefill of one prompt")
  _model_args(bench, attention=False)
  bench.add_argument("--repeats", type=int, default=3)
  bench.set_defaults(run=_prefill_bench)
  cal = sub.add_parser("calibrate", help="per-(layer, head) thresholds covering a target of the attention mass")
  cal.add_argument("--model", required=True, help='Hugging Face directory, .gguf file, or "smollm2"')
  cal.add_argument("--out", required=True, help="thresholds JSON to write")
  cal.add_argument("--target", type=float, default=0.9, help="fraction of the exact attention mass to keep")
  cal.add_argument("--stride", type=int, default=8)
  cal.add_argument("--block-size", type=int, default=128)
  cal.add_argument("--method", choices=["selection", "reference"], default="selection",
                   help="selection: bisection on our selection; reference: the reference code's profiling rule")
  cal.add_argument("--aggregate", choices=["max", "mean"], default="max", help="over the calibration prompts")
  cal.add_argument("--prompt-file", action="append", default=[],
                   help="calibration prompt (repeatable); default: --prompts RULER-style samples of --length tokens")
  cal.add_argument("--prompts", type=int, default=4)
  cal.add_argument("--length", type=int, default=4096)
  cal.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  cal.set_defaults(run=_calibrate)
  needle = sub.add_parser("needle-prompt", help="write a needle-in-a-haystack prompt file")
  needle.add_argument("--out", required=True)
  needle.add_argument("--chars", type=int, default=12000, help="haystack size (about 4 characters per token)")
  needle.add_argument("--depth", type=float, default=0.5)
  needle.add_argument("--haystack", choices=["prose", "noise"], default="prose")
  needle.add_argument("--seed", type=int, default=0)
  needle.set_defaults(run=_needle_prompt)
  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, NotImplementedError) as e:
    print(f"xattn-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
