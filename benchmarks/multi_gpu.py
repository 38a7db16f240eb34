"""Sharded XAttention and model prefill on all local GPUs vs one GPU, checked and timed in one process.

    python benchmarks/multi_gpu.py --tag 2gpu

Op: B=2, T=S=16384, 32 query / 8 kv heads, head dim 128, bf16, causal, synthetic LLM-like input, tau 0.9; mesh
(data=1, tensor=#GPUs) and (data=#GPUs, tensor=1). Model: a random 8-layer Llama-like model (d 2048, 32/8 heads)
prefilling 2 x 8192 tokens with XAttention. Median of --repeats calls after warm-up.
Writes <out-dir>/multi_gpu/<card>/<date>-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.common import rel_err, timed, without_traced_checks
from benchmarks.result_files import add_output_args, metadata, write_result
from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.generate import Generator
from xattn_jax.models.sharding import make_mesh
from xattn_jax.models.transformer import Transformer
from xattn_jax.synthetic import llm_like_qkv

SCRIPT = "multi_gpu"


def to_markdown(result: dict) -> str:
  lines = [
    f"# Multi-GPU: {result['gpus']} x {result['card']}, jax {result['jax']}, {result['date']}",
    "",
    f"Command: `python benchmarks/{result['command']}`",
    "",
    "| what | ms (median) | rel. err vs 1 GPU |",
    "|---|---|---|",
  ] + [f"| {r['what']} | {r['ms']:.2f} | {r['rel_err']:.2e} |" for r in result["rows"]]
  return "\n".join(lines) + "\n"


@without_traced_checks  # the ops timed without the dispatch cost of traced checks
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--length", type=int, default=16384)
  parser.add_argument("--repeats", type=int, default=10)
  add_output_args(parser)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on CPU devices")
  args = parser.parse_args(argv)
  n = jax.device_count()
  rows = []
  q, k, v = llm_like_qkv(jax.random.key(0), batch=2, seq_len=args.length, num_heads=32, num_kv_heads=8, head_dim=128)
  kw = dict(is_causal=True, threshold=0.9, stride=8)
  one = jax.jit(lambda q, k, v: xa.xattention(q, k, v, **kw))
  want = one(q, k, v)
  t_one = timed(one, q, k, v, repeats=args.repeats)['ms']
  rows.append(dict(what="op, 1 GPU", ms=t_one, rel_err=0.0))
  for data, tensor in ((1, n), (n, 1)):
    mesh = make_mesh(data, tensor)
    sharded = jax.jit(lambda q, k, v, mesh=mesh: xa.sharded_xattention(q, k, v, mesh=mesh, **kw))
    got = sharded(q, k, v)
    err = rel_err(got, want)
    ms = timed(sharded, q, k, v, repeats=args.repeats)['ms']
    rows.append(dict(what=f"op, mesh data={data} tensor={tensor}", ms=ms, rel_err=err))
  config = ModelConfig(
    vocab_size=32000,
    d_model=2048,
    num_layers=8,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=5632,
    attention=AttentionConfig(kind="xattention"),
  )
  prompt_len, max_len = 8192, 16384
  if args.smoke:
    config = ModelConfig(
      vocab_size=500,
      d_model=128,
      num_layers=2,
      num_heads=8,
      num_kv_heads=4,
      head_dim=16,
      mlp_dim=256,
      attention=config.attention,
    )
    prompt_len, max_len = 512, 1024
  model = Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  prompts = [list(np.random.default_rng(i).integers(1, config.vocab_size, size=prompt_len)) for i in range(2)]
  results = {}
  for name, mesh in (
    ("model prefill, 1 GPU", None),
    (f"model prefill, mesh data=1 tensor={n}", make_mesh(1, n)),
    (f"model prefill, mesh data={n} tensor=1", make_mesh(n, 1)),
  ):
    gen = Generator(model, max_len=max_len, chunk_size=prompt_len, mesh=mesh)
    logits = gen.prefill(prompts)[0]
    results[name] = np.asarray(logits, np.float32)
    ms = timed(lambda: gen.prefill(prompts)[0], repeats=args.repeats)['ms']
    base = results["model prefill, 1 GPU"]
    rows.append(
      dict(
        what=name,
        ms=ms,
        rel_err=float(np.linalg.norm(results[name] - base) / np.linalg.norm(base)),
        same_argmax=bool(np.all(results[name].argmax(-1) == base.argmax(-1))),
      )
    )
  result = dict(metadata(SCRIPT, argv), gpus=n, rows=rows)
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  print(to_markdown(result))
  print(f"wrote {stem}.json, .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
