"""Per-(layer, head) XAttention thresholds for a model, and fidelity of XAttention on the model's real activations.

    model = from_pretrained("smollm2")
    result = calibrate(model, [prompt_ids, ...], target=0.9, stride=8)      # thresholds [layers, heads]
    save_thresholds("thresholds.json", result.thresholds, stride=8, block_size=128, target=0.9, ...)
    model = from_pretrained("smollm2", attention=attention_config("thresholds.json"))

Why here and not in `xattn_jax`: calibration needs every layer's queries and keys on real prompts, which only the
model can produce. The per-head math (exact block mass, the threshold rules, recall and output error) is
`xattn_jax.calibration` and needs no model; this module captures q/k/v layer by layer, aggregates over prompts,
and adds the paper's "minimum threshold" search, which needs task accuracy.

Capture is non-invasive: `iter_layer_qkv` runs the dense model block by block, recomputing each layer's q, k, v
from the block's own parameters and modules (the same projections and RoPE as `Attention.__call__`) and advancing
the hidden state with the block's own call, so the model's outputs are unchanged (a test checks both the captured
q/k/v against the block's attention output and the final logits against `model(tokens)`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xattn_jax import XAttentionConfig
from xattn_jax import calibration as xcal
from xattn_jax.models.config import AttentionConfig
from xattn_jax.models.layers import apply_rope, rope_frequencies
from xattn_jax.models.transformer import Transformer


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _layer_step(graphdef, state, h, positions, lengths):
  block = nnx.merge(graphdef, state)
  attn = block.attn
  x = block.attn_norm(h)
  B, T, _ = x.shape
  N, K, H = attn.num_heads, attn.num_kv_heads, attn.head_dim
  inv_freq = rope_frequencies(*attn.rope)
  q = apply_rope(attn.q_proj(x).reshape(B, T, N, H), positions, inv_freq)
  k = apply_rope(attn.k_proj(x).reshape(B, T, K, H), positions, inv_freq).astype(q.dtype)
  v = attn.v_proj(x).reshape(B, T, K, H).astype(q.dtype)
  h, _, _ = block(h, positions=positions, q_lengths=lengths, cache=None, offsets=None, self_attention=True)
  return h, q, k, v


@dataclasses.dataclass(frozen=True)
class LayerQKV:
  layer: int
  q: jax.Array  # [B, T, N, H], RoPE applied
  k: jax.Array  # [B, T, K, H], RoPE applied
  v: jax.Array  # [B, T, K, H]
  hidden: jax.Array  # [B, T, D], the block's output


def iter_layer_qkv(model: Transformer, tokens, lengths=None) -> Iterator[LayerQKV]:
  """Each layer's q, k, v for a prefill of `tokens` int [B, T] (right padded to `lengths`) through the DENSE model.

  One layer at a time (memory: one layer's activations); every block compiles once (all blocks of the dense model
  share one structure).
  """
  dense = model.with_attention(AttentionConfig())
  tokens = jnp.asarray(tokens, jnp.int32)
  B, T = tokens.shape
  lengths = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h = _embed(*nnx.split(dense.embedder), tokens)
  for i, block in enumerate(dense.layers):
    graphdef, state = nnx.split(block)
    h, q, k, v = _layer_step(graphdef, state, h, positions, lengths)
    yield LayerQKV(i, q, k, v, h)


def _padded(prompts: Sequence[Sequence[int]], bucket: int):
  """Each prompt alone as ([1, T] tokens padded to a multiple of bucket, [1] length)."""
  for ids in prompts:
    T = -(-len(ids) // bucket) * bucket
    tokens = np.zeros((1, T), np.int32)
    tokens[0, : len(ids)] = ids
    yield jnp.asarray(tokens), jnp.asarray([len(ids)], jnp.int32)


@dataclasses.dataclass
class Calibration:
  thresholds: np.ndarray  # [L, N], aggregated over prompts
  per_prompt: np.ndarray  # [P, L, N]
  target: float
  method: str
  aggregate: str
  stride: int
  block_size: int
  estimator: str = "antidiagonal"


def calibrate(
  model: Transformer,
  prompts: Sequence[Sequence[int]],
  *,
  target: float = 0.9,
  stride: int = 8,
  block_size: int = 128,
  method: str = "reference",
  aggregate: str = "max",
  bucket: int = 512,
  progress: Callable[[str], None] | None = None,
  estimator: str = "antidiagonal",
) -> Calibration:
  """Per-(layer, head) thresholds that keep the blocks covering `target` of the exact attention mass.

  Args:
    model: the model (its attention config is ignored: q/k come from a dense prefill).
    prompts: token id lists (a few thousand tokens each is typical).
    target: fraction of the exact attention mass to cover, in [0, 1].
    stride, block_size, estimator: the XAttention settings the thresholds are for (the estimate depends on them).
    method: "reference" (the reference code's profiling rule) or "selection" (bisection on our own selection);
      see `xattn_jax.calibration`.
    aggregate: "max" over prompts (the reference's choice: every calibration prompt reaches the target) or "mean".
    bucket: prompts are padded to a multiple of this (fewer compilations).
  """
  if not 0 <= target <= 1:
    raise ValueError(f"{target=} must lie in [0, 1]")
  if aggregate not in ("max", "mean"):
    raise ValueError(f"{aggregate=} must be 'max' or 'mean'")
  if not prompts:
    raise ValueError("calibration needs at least one prompt")
  per_prompt = []
  for p, (tokens, lengths) in enumerate(_padded(prompts, max(bucket, block_size))):
    rows = []
    for layer in iter_layer_qkv(model, tokens, lengths):
      tau = xcal.head_thresholds(
        layer.q,
        layer.k,
        target,
        stride=stride,
        block_size=block_size,
        lengths=lengths,
        method=method,
        estimator=estimator,
      )
      rows.append(np.asarray(tau[0]))
    per_prompt.append(np.stack(rows))
    if progress:
      progress(f"calibration prompt {p + 1}/{len(prompts)}: mean tau {per_prompt[-1].mean():.3f}")
  per_prompt = np.stack(per_prompt)
  table = per_prompt.max(axis=0) if aggregate == "max" else per_prompt.mean(axis=0)
  return Calibration(
    np.clip(table, 0.0, 1.0), per_prompt, float(target), method, aggregate, stride, block_size, estimator
  )


def fidelity(
  model: Transformer,
  prompts: Sequence[Sequence[int]],
  settings: Mapping[str, tuple[int, object]],
  *,
  block_size: int = 128,
  bucket: int = 512,
) -> dict[str, dict[str, np.ndarray]]:
  """Recall (exact attention mass inside the selected blocks) and output error vs dense, per layer and head.

  Each layer is measured on the dense model's own q/k/v (so errors do not compound across layers: this is the
  per-layer fidelity of the op on real activations).

  Args:
    settings: name -> (stride, thresholds) or (stride, thresholds, estimator), thresholds a float or an array-like
      [L, N] (e.g. a calibration); the estimator defaults to the paper's antidiagonal.

  Returns:
    name -> {"recall", "rel_error", "density"}: float arrays [P, L, N] (prompt, layer, head).
  """
  out = {name: {m: [] for m in ("recall", "rel_error", "density")} for name in settings}
  for tokens, lengths in _padded(prompts, max(bucket, block_size)):
    rows = {name: {m: [] for m in ("recall", "rel_error", "density")} for name in settings}
    for layer in iter_layer_qkv(model, tokens, lengths):
      mass = xcal.block_attention_mass(layer.q, layer.k, block_size=block_size, lengths=lengths)
      N = layer.q.shape[2]
      for name, (stride, thresholds, *estimator) in settings.items():
        tau = np.asarray(thresholds, np.float32)
        tau = np.broadcast_to(tau[layer.layer] if tau.ndim == 2 else tau, (N,))
        result = xcal.attention_fidelity(
          layer.q,
          layer.k,
          layer.v,
          jnp.asarray(tau),
          stride=stride,
          block_size=block_size,
          lengths=lengths,
          mass=mass,
          estimator=estimator[0] if estimator else "antidiagonal",
        )
        for m in rows[name]:
          rows[name][m].append(np.asarray(result[m][0]))
    for name in settings:
      for m in rows[name]:
        out[name][m].append(np.stack(rows[name][m]))
  return {name: {m: np.stack(v) for m, v in metrics.items()} for name, metrics in out.items()}


def minimum_threshold_search(
  thresholds,
  evaluate: Callable[[np.ndarray], float],
  *,
  factor: float = 0.9,
  tolerance: float = 0.0,
  per: str = "layer",
  max_evals: int | None = None,
  progress: Callable[[str], None] | None = None,
):
  """The paper's "minimum threshold" search, greedy: lower one group's tau by `factor` while accuracy holds.

  Round after round, each group (a layer's heads together with per="layer", one head with per="head") has its
  thresholds multiplied by `factor`; the change is kept if `evaluate(table)` stays >= the starting accuracy minus
  `tolerance`. Stops when a round keeps nothing or after `max_evals` evaluations.

  Returns:
    (thresholds [L, N], history: list of dicts with the group tried, its accuracy and whether it was kept).
  """
  if not 0 < factor < 1:
    raise ValueError(f"{factor=} must lie in (0, 1)")
  if per not in ("layer", "head"):
    raise ValueError(f"{per=} must be 'layer' or 'head'")
  table = np.array(thresholds, np.float64)
  baseline = float(evaluate(table))
  history = [dict(group=None, accuracy=baseline, kept=True)]
  groups = [(l,) for l in range(table.shape[0])] if per == "layer" else list(np.ndindex(table.shape))
  budget = np.inf if max_evals is None else max_evals
  kept_any = True
  while kept_any and len(history) < budget:
    kept_any = False
    for group in groups:
      if len(history) >= budget:
        break
      candidate = table.copy()
      candidate[group] *= factor
      accuracy = float(evaluate(candidate))
      kept = accuracy >= baseline - tolerance
      history.append(dict(group=[int(g) for g in group], accuracy=accuracy, kept=kept))
      if kept:
        table, kept_any = candidate, True
      if progress:
        progress(f"min-threshold search: group {group} -> accuracy {accuracy:.3f} ({'kept' if kept else 'undone'})")
  return table, history


def attention_config(thresholds: str | os.PathLike | Mapping, **xattention_overrides) -> AttentionConfig:
  """The AttentionConfig of a thresholds file (or its loaded dict): XAttention with the file's stride, block size
  and estimator (the paper's where the file predates the choice) and its per-layer, per-head thresholds
  (AttentionConfig.layer_thresholds)."""
  record = thresholds if isinstance(thresholds, Mapping) else xcal.load_thresholds(thresholds)
  xattention = XAttentionConfig(
    **(
      dict(stride=record["stride"], block_size=record["block_size"], estimator=record.get("estimator", "antidiagonal"))
      | xattention_overrides
    )
  )
  return AttentionConfig(
    kind="xattention", xattention=xattention, layer_thresholds=tuple(tuple(row) for row in record["layer_thresholds"])
  )


def prompt_ids(tokenizer, sample) -> list[int]:
  """A `xattn_jax.evaluation.haystack.TaskSample` as the model sees it: the chat template around the question, then
  the answer prefix (the start of the assistant's turn)."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": sample.context}]) + sample.answer_prefix
  return tokenizer.encode(text)


def task_prompts(
  tokenizer,
  *,
  n: int,
  length: int,
  tasks: Sequence[str] = ("single", "multikey"),
  haystacks: Sequence[str] = ("noise", "prose"),
  seed: int = 1000,
):
  """n RULER-style samples (`xattn_jax.evaluation.haystack`) cycling over tasks and haystacks, fitted to `length`
  tokens.

  The default seed differs from the benchmark's (0), so calibration never sees a benchmark prompt.
  """
  from xattn_jax.evaluation.haystack import ruler_sample

  count = lambda s: len(prompt_ids(tokenizer, s))
  combos = [(t, h) for t in tasks for h in haystacks]
  return [
    ruler_sample(
      combos[i % len(combos)][0],
      haystack=combos[i % len(combos)][1],
      length=length,
      index=i // len(combos),
      count_tokens=count,
      seed=seed,
    )
    for i in range(n)
  ]


def generate_in_batches(generator, prompts, *, batch: int, max_new_tokens: int, stop_tokens=()):
  """Greedy answers to token-id `prompts`, `batch` at a time; the last batch is padded with copies of its last
  prompt to the same shape (no recompilation). Yields (index of the batch's first prompt, the GenerationResult with
  the padding rows dropped, seconds of the generate call)."""
  import time

  for i in range(0, len(prompts), batch):
    part = list(prompts[i : i + batch])
    start = time.perf_counter()
    result = generator.generate(
      part + [part[-1]] * (batch - len(part)), max_new_tokens=max_new_tokens, stop_tokens=stop_tokens
    )
    yield i, dataclasses.replace(result, tokens=result.tokens[: len(part)]), time.perf_counter() - start


def task_accuracy(generator, tokenizer, samples, *, batch: int = 8, max_new_tokens: int | None = None) -> float:
  """Mean RULER score (string_match_all) of `generator`'s greedy answers to `samples`
  (xattn_jax.evaluation.haystack.TaskSample), in batches of `batch` prompts (`generate_in_batches`)."""
  from xattn_jax.evaluation.haystack import string_match_all

  if not samples:
    raise ValueError("task_accuracy needs at least one sample")
  new = max_new_tokens or max(s.max_new_tokens for s in samples)
  scores = []
  for i, result, _ in generate_in_batches(
    generator,
    [prompt_ids(tokenizer, s) for s in samples],
    batch=batch,
    max_new_tokens=new,
    stop_tokens=tokenizer.stop_token_ids,
  ):
    scores += [string_match_all(tokenizer.decode(ids), s.answers) for s, ids in zip(samples[i:], result.tokens)]
  return float(np.mean(scores))


def search_thresholds(
  generator,
  tokenizer,
  samples,
  start,
  *,
  factor: float = 0.9,
  tolerance: float = 0.0,
  per: str = "layer",
  max_evals: int | None = None,
  batch: int = 8,
  progress: Callable[[str], None] | None = None,
):
  """The paper's minimum-threshold search on task accuracy: `minimum_threshold_search` from `start` ([L, N] or a
  float), each candidate table set on `generator` (an XAttention model's Generator: thresholds are state, so no
  evaluation recompiles) and scored on `samples`. Returns (thresholds [L, N], history)."""
  L, N = generator.config.num_layers, generator.config.num_heads
  table = np.broadcast_to(np.asarray(start, np.float64), (L, N)).copy()

  def evaluate(candidate):
    generator.set_thresholds(candidate)
    return task_accuracy(generator, tokenizer, samples, batch=batch)

  try:
    return minimum_threshold_search(
      table, evaluate, factor=factor, tolerance=tolerance, per=per, max_evals=max_evals, progress=progress
    )
  finally:
    generator.set_thresholds()
