"""Sharded XAttention and model prefill on all local GPUs vs one GPU, checked and timed in one process.

    python benchmarks/multi_gpu.py --out-dir benchmarks/results

Op: B=2, T=S=16384, 32 query / 8 kv heads, head dim 128, bf16, causal, synthetic LLM-like input, tau 0.9; mesh
(data=1, tensor=#GPUs) and (data=#GPUs, tensor=1). Model: a random 8-layer Llama-like model (d 2048, 32/8 heads)
prefilling 2 x 8192 tokens with XAttention. Median of --repeats calls after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xattn_jax as xa
from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.generate import Generator
from xattn_jax.models.sharding import make_mesh
from xattn_jax.models.transformer import Transformer
from xattn_jax.synthetic import llm_like_qkv

from attention_speed import timed  # run as `python benchmarks/multi_gpu.py`: benchmarks/ is on the path


def main(argv=None) -> int:
  with xa.traced_checks(False):  # the ops timed without the dispatch cost of traced checks
    return _main(argv)


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--length", type=int, default=16384)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out-dir", default="benchmarks/results")
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
    err = float(jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
    ms = timed(sharded, q, k, v, repeats=args.repeats)['ms']
    rows.append(dict(what=f"op, mesh data={data} tensor={tensor}", ms=ms, rel_err=err))
  config = ModelConfig(vocab_size=32000, d_model=2048, num_layers=8, num_heads=32, num_kv_heads=8, head_dim=64,
                       mlp_dim=5632, attention=AttentionConfig(kind="xattention"))
  prompt_len, max_len = 8192, 16384
  if args.smoke:
    config = ModelConfig(vocab_size=500, d_model=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                         mlp_dim=256, attention=config.attention)
    prompt_len, max_len = 512, 1024
  model = Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  prompts = [list(np.random.default_rng(i).integers(1, config.vocab_size, size=prompt_len)) for i in range(2)]
  results = {}
  for name, mesh in (("model prefill, 1 GPU", None), (f"model prefill, mesh data=1 tensor={n}", make_mesh(1, n)),
                     (f"model prefill, mesh data={n} tensor=1", make_mesh(n, 1))):
    gen = Generator(model, max_len=max_len, chunk_size=prompt_len, mesh=mesh)
    logits = gen.prefill(prompts)[0]
    results[name] = np.asarray(logits, np.float32)
    ms = timed(lambda: gen.prefill(prompts)[0], repeats=args.repeats)['ms']
    base = results["model prefill, 1 GPU"]
    rows.append(dict(what=name, ms=ms, rel_err=float(np.linalg.norm(results[name] - base) / np.linalg.norm(base)),
                     same_argmax=bool(np.all(results[name].argmax(-1) == base.argmax(-1)))))
  result = dict(card=jax.devices()[0].device_kind, gpus=n, jax=jax.__version__, date=datetime.date.today().isoformat(),
                command=" ".join(["multi_gpu.py"] + sys.argv[1:]), rows=rows)
  lines = [f"# Multi-GPU: {n} x {result['card']}, jax {result['jax']}, {result['date']}", "",
           f"Command: `python benchmarks/{result['command']}`", "", "| what | ms (median) | rel. err vs 1 GPU |",
           "|---|---|---|"] + [f"| {r['what']} | {r['ms']:.2f} | {r['rel_err']:.2e} |" for r in rows]
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"multi_gpu-{n}x{result['card'].replace(' ', '_')}-{result['date']}"
  (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
