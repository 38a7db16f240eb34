"""Where does the copy task's loss plateau come from (issue #18)? Loads a checkpoint of train_long_context.py and
measures, on fresh copy batches:

1. The per-token loss and error rate of the copied half by the predicting query's offset inside its query block
   (logits at t predict token t + 1, whose copy source is token t + 1 - D: the query at t must read key t + 1 - D,
   distance D - 1, not D), with the model's own XAttention layout and with the same weights under dense attention.
2. Per layer and query head (the residual stream of the XAttention forward): the dense attention's mass at token
   distances D - 1 and D, whether the key block holding key t + 1 - D is selected for query t (recall of the
   source), and the dense mass that the selected blocks keep -- all split by the query's offset in its block; and per
   query block, the share of the "minor" source block (the second key block that some of its rows read, when their
   sources straddle two) in the estimate and in the dense attention's exact block masses, and how often it is
   selected by the estimator's layout and by the same selection rule given the exact masses.
3. Interventions on the layout only (--interventions): the same forward with the minor source block added to every
   copy query block ("minor"), or with both neighbours of every selected block added ("halo").

    python benchmarks/probe_copy_plateau.py benchmarks/results/checkpoints/xattention --block-size 64 \
        --estimator alternating

Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if __name__ == "__main__" and not __package__:
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import xattn_jax as xa
from benchmarks.train_long_context import PRESETS, copy_batch, model_config
from xattn_jax.geometry import cdiv
from xattn_jax.models.config import AttentionConfig
from xattn_jax.models.transformer import Transformer


def load_model(path: pathlib.Path, preset: dict, xcfg: xa.XAttentionConfig) -> Transformer:
  import orbax.checkpoint as ocp

  config = model_config(preset, AttentionConfig(kind="xattention", xattention=xcfg))
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path.resolve())
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return model


def token_stats(logits, tokens, mask):
  """nll and wrong (argmax != target) [B, T] at the predicting position t (target t + 1), masked rows NaN."""
  log_p = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  targets = tokens[:, 1:]
  nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
  wrong = (jnp.argmax(log_p, axis=-1) != targets).astype(jnp.float32)
  m = np.asarray(mask[:, 1:])
  nll, wrong = np.where(m, np.asarray(nll), np.nan), np.where(m, np.asarray(wrong), np.nan)
  return nll, wrong


def confusions(logits, tokens, wrong, top: int = 4) -> dict:
  """The most frequent (target -> predicted) token pairs among the wrong predictions: errors of one token value
  (an embedding that training left confused with another) are not errors of attention."""
  b, t = np.nonzero(np.nan_to_num(wrong) > 0)
  pred = np.asarray(jnp.argmax(logits[:, :-1], axis=-1))[b, t]
  pairs = collections.Counter(zip(np.asarray(tokens)[b, t + 1].tolist(), pred.tolist()))
  return {f"{a} -> {p}": n for (a, p), n in pairs.most_common(top)}


def by_offset(x, blk):
  """x [..., T-1] per predicting position t -> mean over everything but t mod blk: [blk]."""
  T1 = x.shape[-1]
  offs = np.arange(T1) % blk
  return np.array([np.nanmean(x[..., offs == o]) for o in range(blk)])


def layer_probe(model: Transformer, tokens, *, distance: int, xcfg: xa.XAttentionConfig):
  """Per layer: dense probabilities' mass at distances D-1 and D, source recall and kept mass, by query offset."""
  B, T = tokens.shape
  blk = xcfg.block_size
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h = model.embedder(tokens)
  t = np.arange(T)
  src = t + 1 - distance  # the key query t must read
  copy = (src >= 1) & (t <= T - 2)  # queries whose target is a copied token (the loss mask's rows)
  rows = []
  for li, block in enumerate(model.layers):
    attn = block.attn
    x = block.attn_norm(h)
    N, K, H = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.project(x, positions)
    _, layout = xa.xattention(
      q,
      k,
      v,
      is_causal=True,
      threshold=attn.threshold.get_value(),
      stride=xcfg.stride,
      block_size=blk,
      estimator=xcfg.estimator,
      keep_top_neighbors=xcfg.keep_top_neighbors,
      return_block_layout=True,
    )
    sel = np.asarray(layout.to_dense())  # [B, N, nQb, nKb]
    scores = np.asarray(
      xa.antidiagonal_scores(q, k, stride=xcfg.stride, block_size=blk, causal=True, estimator=xcfg.estimator)
    )
    share = scores / scores.sum(-1, keepdims=True)  # [B, N, nQb, nKb]: a query block's estimated mass per key block
    kr = jnp.repeat(k, N // K, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, kr, precision=jax.lax.Precision.HIGHEST) / np.sqrt(H)
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    p = np.asarray(jax.nn.softmax(logits, axis=-1))  # [B, N, T, T]
    qb = t // blk
    # An oracle estimator: the dense attention's exact mass per (query block, key block), through the same selection
    nqb = cdiv(T, blk)
    pad = nqb * blk - T  # a ragged last block (block 96 at 1024 tokens)
    exact = np.pad(p, ((0, 0), (0, 0), (0, pad), (0, pad))).reshape(B, N, nqb, blk, nqb, blk).sum((3, 5))
    oracle = np.asarray(
      xa.select_blocks(
        jnp.asarray(exact), q_len=T, kv_len=T, threshold=attn.threshold.get_value(), block_size=blk
      ).to_dense()
    )
    exact_share = exact / exact.sum(-1, keepdims=True)
    # Query blocks wholly in the copied half: the key block holding most of its rows' sources ("major") and the one
    # holding the rest ("minor", none when the sources fill one block)
    pairs = source_blocks(T, blk, distance)
    major = [(r, c, n) for r, c, n, _, _ in pairs]
    minor = [(r, c, n) for r, _, _, c, n in pairs if c is not None]
    est = {
      name: (
        np.mean([share[:, :, r, c] for r, c, _ in pairs], axis=0),  # [B, N]
        np.mean([sel[:, :, r, c] for r, c, _ in pairs], axis=0),
        np.mean([n for _, _, n in pairs]),
        np.mean([exact_share[:, :, r, c] for r, c, _ in pairs], axis=0),
        np.mean([oracle[:, :, r, c] for r, c, _ in pairs], axis=0),
      )
      for name, pairs in (("major", major), ("minor", minor))
      if pairs
    }
    key_sel = sel[:, :, qb][..., np.arange(T) // blk]  # [B, N, T, T]: key block of s selected for query t
    kept = (p * key_sel).sum(-1)  # [B, N, T]
    tc = t[copy]
    at_src = p[:, :, tc, src[copy]]  # mass on key t + 1 - D
    at_d = p[:, :, tc, tc - distance]  # mass on key t - D
    recall = sel[:, :, qb[tc], src[copy] // blk].astype(np.float32)  # [B, N, copy queries]
    kept_src = p[:, :, tc, src[copy]] * recall
    for n in range(N):
      full = lambda a: np.pad(a[:, n], ((0, 0), (T - 1 - a.shape[-1], 0)), constant_values=np.nan)
      rows.append(
        dict(
          layer=li,
          head=n,
          mass_src=by_offset(full(at_src), blk),
          mass_d=by_offset(full(at_d), blk),
          recall=by_offset(full(recall), blk),
          kept_src=by_offset(full(kept_src), blk),
          kept=by_offset(full(kept[:, :, tc]), blk),
          density=float(sel[:, n].sum() / max(1, np.tril(np.ones(sel.shape[2:])).sum() * B)),
          estimate={name: tuple(float(x[:, n].mean()) if np.ndim(x) else x for x in e) for name, e in est.items()},
        )
      )
    h, _, _ = block(h, positions=positions, q_lengths=jnp.full((B,), T, jnp.int32))
  return rows


def source_blocks(T: int, blk: int, distance: int):
  """Per query block r wholly in the copied half: (r, major key block, its rows, minor key block or None, its rows),
  the key blocks holding the sources t + 1 - D of the block's rows (major: most of them)."""
  out = []
  for r in range(cdiv(distance, blk), T // blk):
    blocks = (np.arange(r * blk, (r + 1) * blk) + 1 - distance) // blk
    ids, n_rows = np.unique(blocks, return_counts=True)
    order = np.argsort(-n_rows)
    minor = (ids[order[1]], n_rows[order[1]]) if len(ids) > 1 else (None, 0)
    out.append((r, ids[order[0]], n_rows[order[0]]) + minor)
  return out


@contextlib.contextmanager
def extra_blocks(kind: str, *, distance: int):
  """Inside: every XAttention layer of a model adds key blocks to its own selection before attending.
  kind "minor": the minor source block of each copy query block (an oracle: what the plateau lacks if the layout is
  the cause); "halo": the neighbours c - 1 and c + 1 of every selected block c (what a layout-side rule could add)."""
  original = xa.xattention

  def patched(q, k, v, **kw):
    out, layout = original(q, k, v, **kw)
    sel = layout.to_dense()  # [B, N, nQb, nKb]
    B, N, nqb, nkb = sel.shape
    blk = layout.block_size
    if kind == "minor":
      add = np.zeros(sel.shape, bool)
      for r, _, _, c, _ in source_blocks(q.shape[1], blk, distance):
        if c is not None:
          add[:, :, r, c] = True
      add = jnp.asarray(add)
    else:
      pad = jnp.zeros(sel.shape[:3] + (1,), bool)
      add = jnp.concatenate([pad, sel[..., :-1]], -1) | jnp.concatenate([sel[..., 1:], pad], -1)
    allowed = xa.allowed_blocks(q_len=q.shape[1], kv_len=k.shape[1], block_size=blk, causal=True)
    layout = xa.BlockLayout.from_dense(sel | add, block_size=blk, allowed=allowed)
    out = xa.block_sparse_attention(
      q,
      k,
      v,
      layout,
      causal=True,
      query_seq_lengths=kw.get("query_seq_lengths"),
      key_value_seq_lengths=kw.get("key_value_seq_lengths"),
    )
    DENSITIES.append(float(layout.density()))
    return out, layout

  xa.xattention = patched
  try:
    yield
  finally:
    xa.xattention = original


DENSITIES: list = []


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("checkpoint", type=pathlib.Path)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
  parser.add_argument("--block-size", type=int, default=None)
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--estimator", default="antidiagonal")
  parser.add_argument("--copy-shift", type=int, default=0)
  parser.add_argument("--keep-top-neighbors", action="store_true", help="the checkpoint's runs used SPEC 2.7's rule")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seed", type=int, default=777)
  parser.add_argument(
    "--interventions",
    default="minor,halo",
    type=lambda x: [k for k in x.split(",") if k],
    help="comma separated, from minor, halo (see extra_blocks); empty for none",
  )
  args = parser.parse_args(argv)
  preset = dict(PRESETS[args.preset])
  if args.block_size:
    preset["block_size"] = args.block_size
  blk, T = preset["block_size"], preset["length"]
  D = T // 2 + args.copy_shift
  xcfg = xa.XAttentionConfig(
    threshold=args.threshold,
    stride=preset["stride"],
    block_size=blk,
    estimator=args.estimator,
    keep_top_neighbors=args.keep_top_neighbors,
  )
  model = load_model(args.checkpoint, preset, xcfg)
  dense = model.with_attention(AttentionConfig())
  tokens, mask = copy_batch(
    np.random.default_rng(args.seed), batch=args.batch, length=T, vocab=preset["vocab"], shift=args.copy_shift
  )
  print(
    f"checkpoint {args.checkpoint}, block {blk}, estimator {args.estimator}, tau {args.threshold}, D = {D}"
    + (", keep_top_neighbors" if args.keep_top_neighbors else "")
  )
  print(f"source of query t (predicting t + 1): key t + 1 - D = t - {D - 1}")
  stats = {}
  for name, m in (("xattention", model), ("dense attn, same weights", dense)):
    logits = m(tokens)
    nll, wrong = token_stats(logits, tokens, mask)
    stats[name] = (by_offset(nll, blk), by_offset(wrong, blk))
    print(f"{name:>26}: loss {np.nanmean(nll):.4f}, wrong {np.nanmean(wrong):.4f} of copied tokens")
    print(f"{'':>26}  wrong tokens as (target -> predicted): count: {confusions(logits, tokens, wrong)}")
  for kind in args.interventions:
    DENSITIES.clear()
    with extra_blocks(kind, distance=D):
      nll, wrong = token_stats(model(tokens), tokens, mask)
    name = f"xattention + {kind} blocks"
    stats[name] = (by_offset(nll, blk), by_offset(wrong, blk))
    print(
      f"{name:>26}: loss {np.nanmean(nll):.4f}, wrong {np.nanmean(wrong):.4f} of copied tokens; density per layer "
      + " / ".join(f"{d:.2f}" for d in DENSITIES)
    )
  worst = np.argsort(-stats["xattention"][0])[:6]
  print("query offset in block (t mod blk): loss / wrong per forward: " + ", ".join(stats))
  for o in sorted(set(worst) | {0, 1, blk - 2, blk - 1}):
    print(f"  {o:3d}: " + "   ".join(f"{x[0][o]:.4f} / {x[1][o]:.3f}" for x in stats.values()))
  # The offsets whose source lies in the minor key block (the same offsets in every query block)
  shifts = np.floor_divide(np.arange(blk) + 1 - D, blk)
  values, counts = np.unique(shifts, return_counts=True)
  minor_rows = shifts != values[np.argmax(counts)]
  for name, (loss, wrong) in stats.items():
    print(
      f"  {name}: offsets with the source in the minor block {np.flatnonzero(minor_rows).tolist()}: loss "
      f"{loss[minor_rows].mean() if minor_rows.any() else np.nan:.4f}, wrong "
      f"{wrong[minor_rows].mean() if minor_rows.any() else np.nan:.3f}, share of the loss "
      f"{loss[minor_rows].sum() / loss.sum():.2f}; other offsets: loss {loss[~minor_rows].mean():.4f}, wrong "
      f"{wrong[~minor_rows].mean():.4f}"
    )
  rows = layer_probe(model, tokens[:2], distance=D, xcfg=xcfg)
  print(
    "per layer / head (probe batch of 2; copy-half queries): dense mass on key t+1-D (the source) and on t-D; "
    "recall = source's key block selected; kept = dense mass in the selected blocks. 'last' = offset blk-1, "
    "'first' = offset 0, 'rest' = the other offsets"
  )
  for r in rows:
    mid = slice(1, blk - 1)
    print(
      f"  L{r['layer']} h{r['head']} density {r['density']:.2f}: mass src {np.nanmean(r['mass_src']):.3f} "
      f"(t-D {np.nanmean(r['mass_d']):.3f}); recall rest {np.nanmean(r['recall'][mid]):.3f} "
      f"first {r['recall'][0]:.3f} last {r['recall'][-1]:.3f}; kept rest {np.nanmean(r['kept'][mid]):.3f} "
      f"first {r['kept'][0]:.3f} last {r['kept'][-1]:.3f}; src mass first {r['mass_src'][0]:.3f} "
      f"last {r['mass_src'][-1]:.3f}"
    )
    for name, (sh, rec, n_rows, ex, orc) in r["estimate"].items():
      print(
        f"      {name} source block ({n_rows:.0f} rows' sources): estimated share {sh:.3f}, selected {rec:.3f}; "
        f"exact (dense) share {ex:.3f}, selected by the exact masses {orc:.3f}"
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
