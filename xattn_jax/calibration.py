"""Per-head threshold calibration and fidelity metrics at the level of one attention call (no model needed).

For causal self-attention (a prefill from position 0: T == S, query t at position t, right padding by lengths):

- `block_attention_mass`: the exact attention mass of every (query block, key block), i.e. the dense softmax
  probabilities summed over the block's queries and keys. A real query block's row sums to the number of its real
  queries.
- `attention_fidelity`: for one XAttention setting, per head, the fraction of the exact attention mass inside the
  selected blocks (recall) and the relative error of the attention output against dense attention.
- `head_thresholds`: per head, the threshold tau that keeps the blocks needed to cover a target fraction of the
  exact attention mass, by one of two rules:
    "reference": the profiling heuristic of the XAttention reference code. Per query block row, take the fewest
      blocks that hold `target` of the row's EXACT mass; the smallest ESTIMATED (antidiagonal) score among them is
      the row's cut; every block whose estimate reaches the cut is kept. The head's tau is the estimated mass of the
      kept blocks over the estimated mass of all blocks, summed over the head's rows.
    "selection": the smallest tau (bisection, resolution 2**-bisection_steps) whose actual selection (SPEC §2,
      forced blocks included) holds `target` of the head's exact mass, summed over its rows.
  Both are monotone in `target` (a larger target never lowers a head's tau) and lie in [0, 1].
- `save_thresholds` / `load_thresholds`: the small JSON file that `xattn_jax.evaluation.calibration.attention_config`
  turns into `AttentionConfig.layer_thresholds`.

The model-level driver (capturing q/k/v of every layer, aggregating over prompts, the CLI) is
`models/calibration.py`; this module stays free of the model so that any caller of `xattention` can calibrate.
"""

from __future__ import annotations

import datetime
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xattn_jax import ops
from xattn_jax.geometry import cdiv

FORMAT = "xattn-jax-thresholds/1"
METHODS = ("reference", "selection")


def _lengths(lengths, B: int, T: int) -> jax.Array:
  return jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)


@functools.partial(jax.jit, static_argnames=("block_size",))
def block_attention_mass(q: jax.Array, k: jax.Array, *, block_size: int = 128, lengths=None) -> jax.Array:
  """Exact causal attention mass per block: float32 [B, N, ceil(T/blk), ceil(T/blk)].

  q [B, T, N, H], k [B, T, K, H] (self-attention, N % K == 0), lengths int [B] (real tokens, right padding; default
  T). Computed one query block at a time (memory O(N * blk * T)); padded queries contribute nothing.
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  blk = block_size
  nb = cdiv(T, blk)
  lengths = _lengths(lengths, B, T)
  pad = nb * blk - T
  qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  qp = qp.reshape(B, nb, blk, K, G, H).transpose(1, 0, 3, 4, 2, 5)  # [nb, B, K, G, blk, H]
  kk = kp.transpose(0, 2, 1, 3)  # [B, K, S, H]
  key_pos = jnp.arange(nb * blk)
  scale = 1.0 / np.sqrt(H)

  def one_block(args):
    qb, r = args  # [B, K, G, blk, H]
    logits = jnp.einsum("bkgth,bksh->bkgts", qb, kk) * scale
    q_pos = r * blk + jnp.arange(blk)
    valid_key = (key_pos[None, :] <= q_pos[:, None])[None] & (key_pos[None, None, :] < lengths[:, None, None])
    valid_key = valid_key[:, None, None]  # [B, 1, 1, blk, S]
    logits = jnp.where(valid_key, logits, -jnp.inf)
    real_q = (q_pos[None, :] < lengths[:, None])[:, None, None, :, None]  # [B, 1, 1, blk, 1]
    probs = jax.nn.softmax(jnp.where(real_q, logits, 0.0), axis=-1)  # padded rows: harmless uniform, zeroed next
    probs = jnp.where(real_q & valid_key, probs, 0.0)
    mass = probs.sum(axis=-2).reshape(B, K, G, nb, blk).sum(axis=-1)  # [B, K, G, nKb]
    return mass.reshape(B, N, nb)

  rows = lax.map(one_block, (qp, jnp.arange(nb)))  # [nQb, B, N, nKb]
  return rows.transpose(1, 2, 0, 3)


def _recall(mass: jax.Array, selected: jax.Array) -> jax.Array:
  """Per (b, n): exact mass inside the selected blocks over all exact mass."""
  inside = jnp.sum(jnp.where(selected, mass, 0.0), axis=(-1, -2))
  return inside / jnp.maximum(jnp.sum(mass, axis=(-1, -2)), 1e-30)


@functools.partial(jax.jit, static_argnames=("stride", "block_size", "keep_sink", "implementation", "estimator"))
def attention_fidelity(
  q,
  k,
  v,
  threshold,
  *,
  stride: int = 8,
  block_size: int = 128,
  lengths=None,
  keep_sink: bool = True,
  implementation=None,
  mass=None,
  estimator: str = "antidiagonal",
) -> dict:
  """How close XAttention stays to dense causal self-attention on these inputs.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H].
    threshold: tau, a float or float [N] (traced: new values do not recompile).
    stride, block_size, keep_sink, implementation, estimator: the XAttention settings.
    lengths: int [B] real tokens (right padding); default T.
    mass: `block_attention_mass(q, k, ...)` if already computed (it does not depend on the setting).

  Returns:
    dict of float32 [B, N]: "recall" (exact attention mass inside the selected blocks / all of it; 1 when every
    allowed block is selected), "rel_error" (||out - dense|| / ||dense|| over the real queries), "density"
    (selected / allowed blocks).
  """
  B, T, N, _ = q.shape
  lengths = _lengths(lengths, B, T)
  if mass is None:
    mass = block_attention_mass(q, k, block_size=block_size, lengths=lengths)
  out, layout = ops.xattention(
    q,
    k,
    v,
    is_causal=True,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    threshold=jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (N,)),
    stride=stride,
    block_size=block_size,
    keep_sink=keep_sink,
    implementation=implementation,
    estimator=estimator,
    return_block_layout=True,
  )
  dense = jax.nn.dot_product_attention(
    q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths
  )
  real = (jnp.arange(T)[None, :] < lengths[:, None])[:, :, None, None]
  diff = jnp.where(real, (out - dense).astype(jnp.float32), 0.0)
  ref = jnp.where(real, dense.astype(jnp.float32), 0.0)
  rel = jnp.sqrt(jnp.sum(diff**2, axis=(1, 3))) / jnp.maximum(jnp.sqrt(jnp.sum(ref**2, axis=(1, 3))), 1e-30)
  return dict(recall=_recall(mass, layout.to_dense()), rel_error=rel, density=layout.density(axis=(2,)))


def _reference_rule(scores, mass, target):
  """The reference profiling rule (module docstring) -> tau [B, N]."""
  C = scores.shape[-1]
  order = jnp.argsort(-mass, axis=-1, stable=True)
  mass_sorted = jnp.take_along_axis(mass, order, axis=-1)
  cum = jnp.cumsum(mass_sorted, axis=-1)
  total = cum[..., -1:]
  need = jnp.sum(cum < target * total, axis=-1) + 1  # fewest blocks holding target of the exact mass
  in_need = jnp.arange(C) < need[..., None]
  cut = jnp.min(jnp.where(in_need, jnp.take_along_axis(scores, order, axis=-1), jnp.inf), axis=-1)
  real_row = total[..., 0] > 0
  kept = (scores >= cut[..., None]) & real_row[..., None]
  est_total = jnp.sum(jnp.where(real_row[..., None], scores, 0.0), axis=(-1, -2))
  tau = jnp.sum(jnp.where(kept, scores, 0.0), axis=(-1, -2)) / jnp.maximum(est_total, 1e-30)
  return jnp.clip(jnp.where(target >= 1.0, 1.0, tau), 0.0, 1.0)


@functools.partial(
  jax.jit,
  static_argnames=("stride", "block_size", "method", "bisection_steps", "keep_sink", "implementation", "estimator"),
)
def head_thresholds(
  q,
  k,
  target,
  *,
  stride: int = 8,
  block_size: int = 128,
  lengths=None,
  method: str = "reference",
  bisection_steps: int = 12,
  keep_sink: bool = True,
  implementation=None,
  mass=None,
  estimator: str = "antidiagonal",
) -> jax.Array:
  """Per-head tau that keeps the blocks covering `target` of the exact attention mass: float32 [B, N] in [0, 1].

  q [B, T, N, H], k [B, T, K, H] (causal self-attention); target in [0, 1] (traced); `method` is "reference" or
  "selection" (module docstring). `mass` may pass a precomputed `block_attention_mass`.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} must be one of {METHODS}")
  B, T, N, _ = q.shape
  lengths = _lengths(lengths, B, T)
  if mass is None:
    mass = block_attention_mass(q, k, block_size=block_size, lengths=lengths)
  scores = ops.antidiagonal_scores(
    q,
    k,
    stride=stride,
    block_size=block_size,
    causal=True,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    implementation=implementation,
    estimator=estimator,
  )
  target = jnp.asarray(target, jnp.float32)
  if method == "reference":
    return _reference_rule(scores, mass, target)

  from xattn_jax.selection import select_blocks

  def coverage(tau):  # [B, N]: recall of the selection with per-head tau [B, N]
    def one(b):
      layout = select_blocks(
        scores[b : b + 1],
        q_len=T,
        kv_len=T,
        threshold=tau[b],
        block_size=block_size,
        keep_sink=keep_sink,
        query_seq_lengths=lengths[b : b + 1],
        key_value_seq_lengths=lengths[b : b + 1],
      )
      return _recall(mass[b : b + 1], layout.to_dense())[0]

    return jnp.stack([one(b) for b in range(B)])

  def step(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = coverage(mid) >= target
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  lo, hi = lax.fori_loop(0, bisection_steps, step, (jnp.zeros((B, N)), jnp.ones((B, N))))
  # hi always reaches the target (tau = 1 selects every allowed block: recall 1); the smallest one found.
  return jnp.where(target >= 1.0, 1.0, hi)


def save_thresholds(path: str | os.PathLike, thresholds, *, stride: int, block_size: int, **meta) -> dict:
  """Writes the per-layer, per-head thresholds (array-like [L, N] in [0, 1]) and how they were made as JSON."""
  table = np.asarray(thresholds, np.float64)
  if table.ndim != 2 or not np.all((table >= 0) & (table <= 1)):
    raise ValueError(f"thresholds must be [layers, heads] in [0, 1], got shape {table.shape}")
  record = dict(
    format=FORMAT,
    stride=int(stride),
    block_size=int(block_size),
    layer_thresholds=[[round(float(x), 6) for x in row] for row in table],
    created=datetime.date.today().isoformat(),
    **meta,
  )
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  return record


def load_thresholds(path: str | os.PathLike) -> dict:
  """Reads a file written by `save_thresholds` (validated): a dict with layer_thresholds, stride, block_size, ..."""
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  if record.get("format") != FORMAT:
    raise ValueError(f"{path}: not an xattn-jax thresholds file (format {record.get('format')!r}, want {FORMAT!r})")
  table = record.get("layer_thresholds")
  if (
    not isinstance(table, list)
    or not table
    or not all(isinstance(r, list) and r for r in table)
    or len({len(r) for r in table}) != 1
  ):
    raise ValueError(f"{path}: layer_thresholds must be a non-empty [layers][heads] list")
  if not all(isinstance(x, (int, float)) and 0 <= x <= 1 for r in table for x in r):
    raise ValueError(f"{path}: thresholds must lie in [0, 1]")
  return record
