"""Accuracy of XAttention on RULER-style long-context tasks with a real model, against dense attention.

    python benchmarks/niah.py --model smollm2 --lengths 2048,4096 --tasks single,multikey --samples 10 \
        --configs dense,s8_t0.9,cal0.9 --tag first

Tasks (`xattn_jax.evaluation.haystack`, generated offline and seeded): single needle, multi-key (4 needles, one asked),
multi-value (one key, 4 values, all asked), variable tracking (a 5-variable chain, all asked); haystacks: RULER's
noise sentences and CPython's pydoc_data.topics prose; depths cycle over 0.1 .. 0.9. Scoring: RULER's
string_match_all (fraction of expected values found in the greedy answer).

Configs (--configs, comma separated):
  dense            jax.nn.dot_product_attention
  s{S}_t{TAU}      XAttention, stride S, one threshold TAU for every head (e.g. s8_t0.9, s16_t0.95)
  cal{T}           XAttention with per-(layer, head) thresholds calibrated to cover T of the exact attention mass
                   (`xattn_jax.evaluation.calibration.calibrate`, --cal-method, --cal-stride, max over the
                   calibration prompts; cached in the output directory); calmean{T}: the same with the mean over
                   the prompts
  min{TAU}         XAttention, stride --cal-stride, per-layer thresholds from the paper's minimum-threshold search:
                   starting at TAU, each layer's thresholds are lowered by --search-factor while the accuracy on
                   --search-prompts dev prompts (another seed) holds
                   (`xattn_jax.evaluation.calibration.search_thresholds`; cached)
  file:PATH        XAttention with the thresholds of a file written by `xattn-jax calibrate`
  ..._alt          any XAttention config above with the alternating estimator (SPEC §1.7) instead of the paper's
                   antidiagonal, e.g. s8_t0.9_alt, cal0.9_alt, min0.9_alt
  ..._nb           a flat or searched config with keep_top_neighbors (SPEC §2.7), e.g. s8_t0.9_nb, s8_t0.9_alt_nb
Default: dense, s{8,16} x t{0.8,0.9,0.95}, cal0.9.

The files of a run are <out-dir>/niah/<card>/<date>-<tag>* (RUN below), dated by the run's first call.
Resumable: every (sample, config) result is one line of RUN.jsonl, and a rerun with the same tag skips the lines
already there, so a run can be stopped and continued (on a later day too), or extended with more samples, lengths,
tasks or configs. Then it writes:
  RUN.json / RUN.md            accuracy per task x length x config (samples, binomial standard error, the paired
                               difference to dense and its standard error), block density per config, timings, the
                               fidelity summary; the .md is generated from the .json (`benchmarks.render`)
  RUN-accuracy-density.png     accuracy vs measured block density
  RUN-masks.png                the selected block masks of a few heads (one prompt) as heat maps
  RUN-fidelity.json            per layer and head: exact attention mass inside the selected blocks (recall) and
                               relative error of the attention output vs dense, on real activations
`--report-only` rebuilds the outputs from the JSONL without running the model (on any card: it finds the run's
folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import time

import numpy as np

if __name__ == "__main__" and not __package__:  # `python benchmarks/<script>.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from benchmarks.result_files import add_output_args, card_dir, csv_of, metadata, result_stem, stem_file, write_result

SCRIPT = "niah"

DEFAULT_CONFIGS = ("dense", "s8_t0.8", "s8_t0.9", "s8_t0.95", "s16_t0.8", "s16_t0.9", "s16_t0.95", "cal0.9")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  name: str
  kind: str  # "dense", "flat", "calibrated" (mass coverage per head), "searched" (minimum-threshold search)
  stride: int = 8
  threshold: float | None = None  # flat
  target: float | None = None  # calibrated: mass to cover; searched: the flat tau the search starts from
  aggregate: str = "max"  # calibrated: over the calibration prompts
  path: str | None = None  # calibrated from a file
  estimator: str = "antidiagonal"  # SPEC §1.7
  top_neighbors: bool = False  # SPEC §2.7

  def stride_of(self, runner) -> int:
    return runner.settings(self)[0] if self.kind == "calibrated" else self.stride


def parse_config(name: str, *, cal_stride: int) -> RunConfig:
  if name == "dense":
    return RunConfig(name, "dense")
  if name.endswith("_nb"):
    config = parse_config(name[:-3], cal_stride=cal_stride)
    if config.kind not in ("flat", "searched"):
      raise ValueError(f"config {name!r}: _nb (keep_top_neighbors) applies to s<stride>_t<tau> and min<tau> configs")
    return dataclasses.replace(config, name=name, top_neighbors=True)
  if name.endswith("_alt") and name != "dense_alt" and not name.startswith("file:"):
    return dataclasses.replace(parse_config(name[:-4], cal_stride=cal_stride), name=name, estimator="alternating")
  if m := re.fullmatch(r"s(\d+)_t([0-9.]+)", name):
    return RunConfig(name, "flat", stride=int(m[1]), threshold=float(m[2]))
  if m := re.fullmatch(r"cal(mean)?([0-9.]+)", name):
    return RunConfig(name, "calibrated", stride=cal_stride, target=float(m[2]), aggregate="mean" if m[1] else "max")
  if m := re.fullmatch(r"min([0-9.]+)", name):
    return RunConfig(name, "searched", stride=cal_stride, target=float(m[1]))
  if name.startswith("file:"):
    return RunConfig(name, "calibrated", path=name[5:])
  raise ValueError(
    f"config {name!r}: expected dense, s<stride>_t<tau>, cal<target>, calmean<target>, min<tau> or file:<path>, "
    "the XAttention ones optionally ending in _alt"
  )


# --------------------------------------------------------------------------------------------------------------------
# Scoring and statistics (pure functions; tested)


def cell_stats(scores) -> dict:
  """Mean score with the binomial standard error sqrt(p (1 - p) / n) (RULER scores are 0/1 for single-answer
  tasks; for multi-answer tasks the same formula bounds the error of a mean of values in [0, 1] from above)."""
  n = len(scores)
  p = float(np.mean(scores)) if n else float("nan")
  return dict(n=n, accuracy=p, se=math.sqrt(p * (1 - p) / n) if n else float("nan"))


def paired_stats(scores, reference) -> dict:
  """Mean of score - reference over the same samples, its standard error, and how many samples differ."""
  d = np.asarray(scores, float) - np.asarray(reference, float)
  n = len(d)
  return dict(
    n=n,
    diff=float(d.mean()) if n else float("nan"),
    se=float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
    discordant=int(np.sum(d != 0)),
  )


def samples_needed(delta: float, *, p: float = 0.9, discordance: float | None = None, z: float = 2.0) -> int:
  """Samples per config for a difference `delta` to stand `z` standard errors out: unpaired binomial
  (2 p (1 - p) / n per difference), or paired with a discordance rate d (variance <= d / n)."""
  var = discordance if discordance is not None else 2 * p * (1 - p)
  return math.ceil(var * (z / delta) ** 2)


# --------------------------------------------------------------------------------------------------------------------
# Running


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interrupted run: its sample is simply redone
          pass
  return records


def run_stem(out_dir, tag: str, card: str, *, any_card: bool = False) -> pathlib.Path:
  """The files of run `tag` without their suffixes: <out-dir>/niah/<card>/<date>-<tag>, with the date of the run's
  JSONL if it has one (the latest, if several), else today's. any_card: a run found under another card's folder
  also counts (--report-only rebuilds a GPU run's report on any machine)."""
  root = pathlib.Path(out_dir) / SCRIPT
  pattern = re.compile(rf"\d{{4}}-\d{{2}}-\d{{2}}-{re.escape(tag)}\.jsonl")
  runs = lambda folder: sorted(p for p in folder.glob("*.jsonl") if pattern.fullmatch(p.name))
  found = runs(root / card_dir(card))
  if not found and any_card and root.is_dir():
    found = sorted((p for folder in root.iterdir() if folder.is_dir() for p in runs(folder)), key=lambda p: p.name)
  if found:
    return found[-1].with_name(found[-1].name.removesuffix(".jsonl"))
  return result_stem(out_dir, script=SCRIPT, card=card, date=datetime.date.today().isoformat(), tag=tag)


class Runner:
  def __init__(self, args, stem: pathlib.Path):
    import jax.numpy as jnp

    from xattn_jax.models.loading import from_pretrained, load_tokenizer

    self.args = args
    self.model = from_pretrained(args.model, dtype={"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype])
    self.tok = load_tokenizer(args.model)
    self.stem = stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    self.thresholds: dict[str, dict] = {}
    self._generators: dict = {}
    self._compiled: set = set()
    self.configs = [parse_config(c, cal_stride=args.cal_stride) for c in args.configs]

  def path(self, suffix: str) -> pathlib.Path:
    return stem_file(self.stem, suffix)

  def count_tokens(self, sample) -> int:
    from xattn_jax.evaluation.calibration import prompt_ids

    return len(prompt_ids(self.tok, sample))

  # -- thresholds ---------------------------------------------------------------------------------------------------

  def threshold_record(self, config: RunConfig) -> dict:
    from xattn_jax.evaluation.calibration import calibrate, task_prompts
    from xattn_jax.calibration import load_thresholds, save_thresholds

    if config.name in self.thresholds:
      return self.thresholds[config.name]
    if config.path:
      record = load_thresholds(config.path)
    elif config.kind == "searched":
      record = self.searched_record(config)
    else:
      a = self.args
      path = self.path(f"-thresholds-{config.name}-s{config.stride}.json")
      want = dict(
        target=config.target,
        method=a.cal_method,
        prompts=a.cal_prompts,
        length=a.cal_length,
        aggregate=config.aggregate,
        stride=config.stride,
        block_size=a.block_size,
        estimator=config.estimator,
      )
      record = load_thresholds(path) if path.exists() else None
      if record is None or any(record.get(k) != v for k, v in want.items()):
        _log(f"calibrating {config.name}: {a.cal_prompts} prompts of {a.cal_length} tokens, method {a.cal_method}")
        start = time.perf_counter()
        samples = task_prompts(self.tok, n=a.cal_prompts, length=a.cal_length, tasks=a.cal_tasks)
        from xattn_jax.evaluation.calibration import prompt_ids

        result = calibrate(
          self.model,
          [prompt_ids(self.tok, s) for s in samples],
          target=config.target,
          stride=config.stride,
          block_size=a.block_size,
          method=a.cal_method,
          aggregate=config.aggregate,
          progress=_log,
          estimator=config.estimator,
        )
        record = save_thresholds(
          path,
          result.thresholds,
          stride=config.stride,
          block_size=a.block_size,
          target=config.target,
          estimator=config.estimator,
          method=a.cal_method,
          aggregate=config.aggregate,
          prompts=a.cal_prompts,
          length=a.cal_length,
          model=a.model,
          calibration_samples=[s.id for s in samples],
          seconds=round(time.perf_counter() - start, 1),
        )
        _log(f"wrote {path} (mean tau {np.mean(result.thresholds):.3f})")
    self.thresholds[config.name] = record
    return record

  def searched_record(self, config: RunConfig) -> dict:
    """Per-layer thresholds from the paper's minimum-threshold search
    (`xattn_jax.evaluation.calibration.search_thresholds`), starting from flat tau = config.target, on
    --search-prompts dev prompts (their own seed); cached as JSON."""
    from xattn_jax.evaluation.calibration import search_thresholds, task_prompts
    from xattn_jax.calibration import load_thresholds, save_thresholds

    a = self.args
    path = self.path(f"-thresholds-{config.name}-s{config.stride}.json")
    want = dict(
      start=config.target,
      factor=a.search_factor,
      tolerance=a.search_tolerance,
      prompts=a.search_prompts,
      length=a.search_length,
      stride=config.stride,
      block_size=a.block_size,
      estimator=config.estimator,
    )
    if config.top_neighbors:  # only then: older files (without the key) stay valid for the other configs
      want["top_neighbors"] = True
    record = load_thresholds(path) if path.exists() else None
    if record is not None and all(record.get(k) == v for k, v in want.items()):
      return record
    if a.search_length > max(a.lengths):
      raise ValueError(f"--search-length {a.search_length} must be <= the longest --lengths {max(a.lengths)}")
    _log(f"minimum-threshold search {config.name}: {a.search_prompts} prompts of {a.search_length} tokens")
    start = time.perf_counter()
    samples = task_prompts(self.tok, n=a.search_prompts, length=a.search_length, tasks=a.tasks, seed=3000)
    gen = self.generator(
      RunConfig(
        config.name,
        "flat",
        stride=config.stride,
        threshold=config.target,
        estimator=config.estimator,
        top_neighbors=config.top_neighbors,
      )
    )
    table, history = search_thresholds(
      gen,
      self.tok,
      samples,
      config.target,
      factor=a.search_factor,
      tolerance=a.search_tolerance,
      max_evals=a.search_evals,
      batch=a.batch,
      progress=_log,
    )
    record = save_thresholds(
      path,
      table,
      seconds=round(time.perf_counter() - start, 1),
      model=a.model,
      search_samples=[s.id for s in samples],
      history=history,
      **want,
    )
    _log(f"wrote {path} (mean tau {np.mean(table):.3f}, {len(history)} evaluations)")
    return record

  def settings(self, config: RunConfig):
    """(stride, thresholds, estimator) for the fidelity metrics."""
    if config.kind == "flat":
      return config.stride, config.threshold, config.estimator
    record = self.threshold_record(config)
    return record["stride"], np.asarray(record["layer_thresholds"]), record.get("estimator", config.estimator)

  # -- samples ------------------------------------------------------------------------------------------------------

  def samples(self, length: int, indices):
    from xattn_jax.evaluation.haystack import ruler_sample

    a = self.args
    return [
      ruler_sample(
        task,
        haystack=hay,
        length=length,
        index=i,
        count_tokens=self.count_tokens,
        seed=a.seed,
        max_new_tokens=a.max_new_tokens,
      )
      for i in indices
      for task in a.tasks
      for hay in a.haystacks
    ]

  def generator(self, config: RunConfig):
    """One Generator per kind (dense, or XAttention of one stride) for every length: prefill compiles once per
    length bucket and the decode loop once; thresholds are set per config at run time (model state)."""
    import xattn_jax as xa
    from xattn_jax.models.config import AttentionConfig
    from xattn_jax.models.generate import Generator

    if config.kind == "dense":
      key = "dense"
    else:
      key = (config.stride_of(self), self.settings(config)[2], config.top_neighbors)
    if key not in self._generators:
      attention = (
        AttentionConfig()
        if config.kind == "dense"
        else AttentionConfig(
          kind="xattention",
          xattention=xa.XAttentionConfig(
            stride=key[0],
            block_size=self.args.block_size,
            implementation=self.args.implementation,
            estimator=key[1],
            keep_top_neighbors=key[2],
          ),
        )
      )
      lengths = sorted(self.args.lengths)
      bucket = lengths[0]
      for L in lengths:
        bucket = math.gcd(bucket, L)
      self._generators[key] = Generator(
        self.model.with_attention(attention), max_len=lengths[-1], chunk_size=lengths[-1], bucket=bucket
      )
    gen = self._generators[key]
    if config.kind != "dense":
      gen.set_thresholds(self.settings(config)[1])
    return gen

  def run(self) -> None:
    import jax

    from xattn_jax.evaluation.calibration import generate_in_batches, prompt_ids
    from xattn_jax.evaluation.haystack import string_match_all

    jsonl = self.path(".jsonl")
    done = {(r["id"], r["config"]) for r in _load_jsonl(jsonl)}
    for config in self.configs:  # calibrate up front (cached), so that a long run fails early if it cannot
      if config.kind in ("calibrated", "searched"):
        self.threshold_record(config)
    device = jax.devices()[0].device_kind
    size = self.args.batch
    # Rounds of --round-size sample indices over every length and config: a run stopped early stays balanced.
    rounds = [
      range(i, min(i + self.args.round_size, self.args.samples))
      for i in range(0, self.args.samples, self.args.round_size)
    ]
    for indices, length in ((r, L) for r in rounds for L in self.args.lengths):
      samples = self.samples(length, indices)
      ids = {s.id: prompt_ids(self.tok, s) for s in samples}
      todo = [(s, c) for c in self.configs for s in samples if (s.id, c.name) not in done]
      _log(
        f"length {length}, samples {indices.start}..{indices.stop - 1}: {len(samples)} prompts x "
        f"{len(self.configs)} configs, {len(todo)} to run"
      )
      start_all, finished = time.perf_counter(), 0
      for config in self.configs:
        mine = [s for s, c in todo if c is config]
        if not mine:
          continue
        gen = self.generator(config)
        for b, result, seconds in generate_in_batches(
          gen,
          [ids[s.id] for s in mine],
          batch=size,
          max_new_tokens=self.args.max_new_tokens,
          stop_tokens=self.tok.stop_token_ids,
        ):
          batch = mine[b : b + size]
          compiled_key = (config.kind, config.stride, config.estimator, config.top_neighbors, length)
          first = compiled_key not in self._compiled
          self._compiled.add(compiled_key)
          layer_density = [float(d) for d in result.densities]
          density = 1.0 if config.kind == "dense" else float(np.mean([d for d in layer_density if d >= 0]))
          lines = []
          for sample, out_ids in zip(batch, result.tokens):
            output = self.tok.decode(out_ids)
            lines.append(
              dict(
                id=sample.id,
                config=config.name,
                task=sample.task,
                haystack=sample.haystack,
                length=length,
                depth=sample.depth,
                prompt_tokens=len(ids[sample.id]),
                answers=list(sample.answers),
                output=output,
                score=string_match_all(output, sample.answers),
                density=density,
                layer_density=[round(d, 4) for d in layer_density],
                batch=size,
                seconds=round(seconds / size, 4),
                prefill_seconds=round(result.prefill_seconds / size, 4),
                decode_steps=result.decode_steps,
                compiled=first,
                device=device,
              )
            )
          with open(jsonl, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in lines))
          finished += len(batch)
          elapsed = time.perf_counter() - start_all
          _log(
            f"{length} {finished}/{len(todo)} {config.name} x{len(batch)}: mean score "
            f"{np.mean([r['score'] for r in lines]):.2f} density {density:.3f} {seconds:.1f}s "
            f"(eta {elapsed / finished * (len(todo) - finished) / 60:.0f} min) {lines[-1]['output'].strip()[:50]!r}"
          )

  # -- fidelity and masks -------------------------------------------------------------------------------------------

  def fidelity(self) -> None:
    from xattn_jax.evaluation.calibration import fidelity, prompt_ids, task_prompts

    a = self.args
    path = self.path("-fidelity.json")
    sparse = [c for c in self.configs if c.kind != "dense"]
    if any(c.top_neighbors for c in sparse):
      raise ValueError("--fidelity-prompts: the fidelity metrics do not apply keep_top_neighbors (_nb configs); pass 0")
    settings = {c.name: self.settings(c) for c in sparse}
    if path.exists():
      old = json.loads(path.read_text())
      if (
        old.get("prompts") == a.fidelity_prompts
        and old.get("length") == a.fidelity_length
        and set(old["configs"]) >= set(settings)
      ):
        _log(f"{path} is up to date")
        return
    samples = task_prompts(self.tok, n=a.fidelity_prompts, length=a.fidelity_length, tasks=a.tasks, seed=2000)
    _log(f"fidelity: {len(samples)} prompts of {a.fidelity_length} tokens, {len(settings)} settings")
    start = time.perf_counter()
    result = fidelity(self.model, [prompt_ids(self.tok, s) for s in samples], settings, block_size=a.block_size)
    record = dict(
      prompts=a.fidelity_prompts,
      length=a.fidelity_length,
      samples=[s.id for s in samples],
      seconds=round(time.perf_counter() - start, 1),
      configs={},
    )
    for name, metrics in result.items():
      record["configs"][name] = {m: np.round(v.mean(axis=0), 5).tolist() for m, v in metrics.items()}  # [L, N]
    path.write_text(json.dumps(record, indent=1) + "\n")
    _log(f"wrote {path} ({record['seconds']} s)")

  def masks(self) -> None:
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import xattn_jax as xa
    from xattn_jax.evaluation.calibration import iter_layer_qkv, prompt_ids, task_prompts

    a = self.args
    sparse = [c for c in self.configs if c.kind != "dense"][:3]
    if not sparse:
      return
    sample = task_prompts(self.tok, n=1, length=a.fidelity_length, tasks=a.tasks[:1], seed=2000)[0]
    ids = prompt_ids(self.tok, sample)
    L, N = self.model.config.num_layers, self.model.config.num_heads
    heads = a.mask_heads or [(0, 0), (L // 3, N // 2), (2 * L // 3, N - 1), (L - 1, 1 % N)]
    wanted = {layer for layer, _ in heads}
    masks = {}
    for layer in iter_layer_qkv(self.model, jnp.asarray([ids], jnp.int32)):
      if layer.layer not in wanted:
        continue
      for config in sparse:
        stride, tau, estimator = self.settings(config)
        tau = np.asarray(tau, np.float32)
        tau = tau[layer.layer] if tau.ndim == 2 else np.full((N,), tau, np.float32)
        _, layout = xa.xattention(
          layer.q,
          layer.k,
          layer.v,
          is_causal=True,
          threshold=jnp.asarray(tau),
          stride=stride,
          block_size=a.block_size,
          estimator=estimator,
          keep_top_neighbors=config.top_neighbors,
          return_block_layout=True,
        )
        dense = np.asarray(layout.to_dense()[0])
        for l, h in heads:
          if l == layer.layer:
            masks[(config.name, l, h)] = (dense[h], float(tau[h]))
    fig, axes = plt.subplots(len(sparse), len(heads), figsize=(3 * len(heads), 3 * len(sparse)), squeeze=False)
    for i, config in enumerate(sparse):
      for j, (l, h) in enumerate(heads):
        mask, tau = masks[(config.name, l, h)]
        nq = mask.shape[0]
        allowed = np.tril(np.ones_like(mask, bool))
        ax = axes[i, j]
        ax.imshow(
          np.where(allowed, mask.astype(float), np.nan), cmap="Blues", vmin=0, vmax=1.2, interpolation="nearest"
        )
        ax.set_title(f"{config.name} L{l} H{h} tau={tau:.2f}\ndensity {mask.sum() / allowed.sum():.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
          ax.set_ylabel(f"query block (of {nq})", fontsize=8)
    fig.suptitle(f"Selected blocks ({len(ids)}-token {sample.task} prompt, block {a.block_size})", fontsize=10)
    fig.tight_layout()
    fig.savefig(self.path("-masks.png"), dpi=110)
    plt.close(fig)
    _log(f"wrote {self.path('-masks.png')}")


# --------------------------------------------------------------------------------------------------------------------
# Report


def summarize(records: list[dict], configs: list[str]) -> dict:
  by = {}
  for r in records:
    by.setdefault((r["task"], r["length"], r["config"]), []).append(r)
  tasks = sorted({r["task"] for r in records})
  lengths = sorted({r["length"] for r in records})
  configs = [c for c in configs if any(r["config"] == c for r in records)] + sorted(
    {r["config"] for r in records} - set(configs)
  )
  dense_scores = {r["id"]: r["score"] for r in records if r["config"] == "dense"}

  def block(rs):
    stats = cell_stats([r["score"] for r in rs])
    stats["density"] = float(np.mean([r["density"] for r in rs])) if rs else float("nan")
    common = [r for r in rs if r["id"] in dense_scores]
    if common and rs and rs[0]["config"] != "dense":
      stats["vs_dense"] = paired_stats([r["score"] for r in common], [dense_scores[r["id"]] for r in common])
    timed = [r for r in rs if not r.get("compiled")]
    if timed:
      stats["seconds_median"] = statistics.median(r["seconds"] for r in timed)
      stats["prefill_seconds_median"] = statistics.median(r["prefill_seconds"] for r in timed)
    return stats

  cells = []
  for task in tasks + ["all"]:
    for length in lengths:
      for config in configs:
        rs = [r for r in records if r["config"] == config and r["length"] == length and task in ("all", r["task"])]
        if rs:
          cells.append(dict(task=task, length=length, config=config, **block(rs)))
  per_config = {c: block([r for r in records if r["config"] == c]) for c in configs}
  for c in configs:
    layers = [r["layer_density"] for r in records if r["config"] == c and c != "dense"]
    if layers:
      per_config[c]["layer_density"] = np.round(np.mean(layers, axis=0), 4).tolist()
  return dict(
    tasks=tasks,
    lengths=lengths,
    configs=configs,
    cells=cells,
    per_config=per_config,
    within_dense=lowest_density_within(cells, WITHIN_DENSE),
  )


WITHIN_DENSE = 0.02  # the issue's accuracy target: within 2 points of dense (pooled over tasks, paired)


def estimator_of(config: str) -> str:
  return parse_config(config, cal_stride=8).estimator  # the estimator does not depend on the calibration stride


def lowest_density_within(cells: list[dict], margin: float) -> list[dict]:
  """Per length and estimator: of the XAttention configs whose pooled accuracy is at most `margin` below dense's
  (the paired difference on the same samples), the one of lowest density; config None where none is."""
  rows = []
  pooled = [c for c in cells if c["task"] == "all" and "vs_dense" in c]
  for length in sorted({c["length"] for c in pooled}):
    for estimator in ("antidiagonal", "alternating"):
      mine = [c for c in pooled if c["length"] == length and estimator_of(c["config"]) == estimator]
      if not mine:
        continue
      ok = [c for c in mine if c["vs_dense"]["diff"] >= -margin]
      best = min(ok, key=lambda c: c["density"]) if ok else None
      rows.append(
        dict(
          length=length,
          estimator=estimator,
          configs=len(mine),
          config=best and best["config"],
          density=best and best["density"],
          diff=best and best["vs_dense"]["diff"],
          se=best and best["vs_dense"]["se"],
        )
      )
  return rows


def _fmt_acc(c) -> str:
  return f"{100 * c['accuracy']:.1f} ± {100 * c['se']:.1f} (n={c['n']})"


def fidelity_summary(fidelity: dict | None) -> dict | None:
  """What the report shows of the fidelity file: per config, over layers x heads, the mean and worst recall and
  relative error, and the mean density."""
  if not fidelity:
    return None
  configs = {}
  for name, m in fidelity["configs"].items():
    r, e, d = (np.asarray(m[k]) for k in ("recall", "rel_error", "density"))
    configs[name] = dict(
      recall_mean=float(r.mean()),
      recall_min=float(r.min()),
      rel_error_mean=float(e.mean()),
      rel_error_max=float(e.max()),
      density_mean=float(d.mean()),
    )
  return dict(prompts=fidelity["prompts"], length=fidelity["length"], configs=configs)


def to_markdown(result: dict) -> str:
  """The report of a run's json: accuracy tables per task, time per sample, and the fidelity summary if recorded
  (reports written before it was part of the json show no fidelity section)."""
  env, run_args, summary, fidelity = result["env"], result["args"], result, result.get("fidelity")
  lines = (
    [
      f"# RULER-style accuracy, dense vs XAttention: {env['model']}, {env['device']}",
      "",
      f"Date {env['date']}; jax {env['jax']}; host {env['host']}.",
      "",
      f"Command: `{env['command']}`",
      "",
    ]
    + ([f"Table rebuilt from the JSONL by: `{env['rebuilt_by']}`", ""] if "rebuilt_by" in env else [])
    + [
      f"Settings: {json.dumps(run_args)}",
      "",
      "Accuracy in % (RULER string_match_all), ± the binomial standard error, n samples; Δ = paired difference "
      "to dense on the same samples (± its standard error, [discordant samples]); density = selected / allowed "
      "causal blocks of each generate call's batch, mean over layers and batches.",
      "",
    ]
  )
  configs, lengths = summary["configs"], summary["lengths"]
  for task in summary["tasks"] + ["all"]:
    lines += [
      f"## {task}",
      "",
      "| config | " + " | ".join(f"{L} acc | {L} Δ vs dense | {L} density" for L in lengths) + " |",
      "|---|" + "---|---|---|" * len(lengths),
    ]
    for config in configs:
      row = [config]
      for L in lengths:
        c = next((c for c in summary["cells"] if (c["task"], c["length"], c["config"]) == (task, L, config)), None)
        if c is None:
          row += ["not run", "", ""]
          continue
        v = c.get("vs_dense")
        delta = (
          f"{100 * v['diff']:+.1f} ± {100 * v['se']:.1f} [{v['discordant']}]"
          if v
          else "(reference)"
          if config == "dense"
          else "n/a (no dense run on these samples)"
        )
        row += [_fmt_acc(c), delta, f"{c['density']:.3f}"]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  within = summary.get("within_dense")  # reports written before this section have none
  if within:
    lines += [
      f"## Lowest density within {100 * WITHIN_DENSE:.0f} points of dense (all tasks pooled, paired difference)",
      "",
      "| length | estimator | configs run | config | density | Δ vs dense |",
      "|---|---|---|---|---|---|",
    ]
    for w in within:
      found = w["config"] is not None
      lines.append(
        f"| {w['length']} | {w['estimator']} | {w['configs']} | {w['config'] if found else 'none of them'} | "
        + (f"{w['density']:.3f} | {100 * w['diff']:+.1f} ± {100 * w['se']:.1f} |" if found else " | |")
      )
    lines.append("")
  lines += [
    f"## Time per sample (median, compilation excluded; prompt + answer, {run_args['dtype']}, batches of "
    f"{run_args.get('batch', 1)} on this device)",
    "",
    "| config | " + " | ".join(f"{L} total (s) | {L} prefill (s)" for L in lengths) + " |",
    "|---|" + "---|---|" * len(lengths),
  ]
  for config in configs:
    row = [config]
    for L in lengths:
      c = next((c for c in summary["cells"] if (c["task"], c["length"], c["config"]) == ("all", L, config)), None)
      row += (
        [f"{c['seconds_median']:.2f}", f"{c['prefill_seconds_median']:.2f}"]
        if c and "seconds_median" in c
        else ["", ""]
      )
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  if fidelity:
    lines += [
      f"## Fidelity on real activations ({fidelity['prompts']} prompt(s) of {fidelity['length']} tokens; "
      "each layer on the dense model's own q/k/v)",
      "",
      "recall = exact attention mass inside the selected blocks; rel. error = ||out - dense|| / ||dense|| "
      "of the attention output; over layers x heads: mean, and the worst head.",
      "",
      "| config | recall mean | recall min | rel. error mean | rel. error max | density mean |",
      "|---|---|---|---|---|---|",
    ]
    for name, m in fidelity["configs"].items():
      lines.append(
        f"| {name} | {m['recall_mean']:.4f} | {m['recall_min']:.4f} | {m['rel_error_mean']:.4f} | "
        f"{m['rel_error_max']:.4f} | {m['density_mean']:.3f} |"
      )
    lines.append("")
  return "\n".join(lines) + "\n"


def plot_estimators(path: pathlib.Path, summary: dict) -> None:
  """One panel per length: pooled accuracy against density, one line per estimator through its configs (in order
  of density), dense's accuracy and the 2-point band below it."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lengths = summary["lengths"]
  fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False)
  pooled = [c for c in summary["cells"] if c["task"] == "all"]
  for ax, length in zip(axes[0], lengths):
    here = [c for c in pooled if c["length"] == length]
    dense = next((c for c in here if c["config"] == "dense"), None)
    if dense is not None:
      ax.axhline(100 * dense["accuracy"], color="black", lw=1, label="dense")
      ax.axhspan(100 * (dense["accuracy"] - WITHIN_DENSE), 100 * dense["accuracy"], color="grey", alpha=0.2)
    for estimator, marker in (("antidiagonal", "o"), ("alternating", "s")):
      mine = sorted(
        (c for c in here if c["config"] != "dense" and estimator_of(c["config"]) == estimator),
        key=lambda c: c["density"],
      )
      if not mine:
        continue
      line = ax.errorbar(
        [c["density"] for c in mine],
        [100 * c["accuracy"] for c in mine],
        yerr=[100 * c["se"] for c in mine],
        marker=marker,
        capsize=2,
        label=estimator,
      )
      for c in mine:
        ax.annotate(
          c["config"].removesuffix("_alt"),
          (c["density"], 100 * c["accuracy"]),
          fontsize=6,
          color=line[0].get_color(),
          xytext=(3, 3),
          textcoords="offset points",
        )
    ax.set_title(f"{length} tokens")
    ax.set_xlabel("block density")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("accuracy (%), all tasks pooled")
  axes[0][0].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_accuracy_density(path: pathlib.Path, summary: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # Colour = prompt length, marker = config, each named once in a legend (labels next to the points overlapped).
  from matplotlib.lines import Line2D

  fig, ax = plt.subplots(figsize=(8, 4.8))
  markers = "osv^DPX*<>hpd"
  configs = summary["configs"]
  colors = {}
  for L in summary["lengths"]:
    for i, config in enumerate(configs):
      c = next((c for c in summary["cells"] if (c["task"], c["length"], c["config"]) == ("all", L, config)), None)
      if c is None:
        continue
      line = ax.errorbar(
        [c["density"]],
        [100 * c["accuracy"]],
        yerr=[100 * c["se"]],
        fmt=markers[i % len(markers)],
        capsize=3,
        color=colors.get(L),
        alpha=0.85,
      )
      colors.setdefault(L, line[0].get_color())
  ax.set_xlabel("selected block density (fraction of causal blocks)")
  ax.set_ylabel("accuracy (%), all tasks pooled")
  ax.set_title("RULER-style accuracy vs XAttention block density")
  ax.grid(alpha=0.3)
  lengths = ax.legend(
    [Line2D([], [], color=col, marker="o", linestyle="") for col in colors.values()],
    [f"{L} tokens" for L in colors],
    fontsize=8,
    loc="lower right",
    title="length",
  )
  ax.add_artist(lengths)
  ax.legend(
    [Line2D([], [], color="grey", marker=markers[i % len(markers)], linestyle="") for i in range(len(configs))],
    configs,
    fontsize=7,
    loc="center left",
    bbox_to_anchor=(1.01, 0.5),
    title="config",
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(args, env: dict, stem: pathlib.Path, argv=None) -> dict:
  records = _load_jsonl(stem_file(stem, ".jsonl"))
  if not records:
    raise SystemExit(f"no results in {stem_file(stem, '.jsonl')}")
  summary = summarize(records, list(args.configs))
  fid_path = stem_file(stem, "-fidelity.json")
  fidelity = json.loads(fid_path.read_text()) if fid_path.exists() else None
  run_args = dict(
    tasks=args.tasks,
    haystacks=args.haystacks,
    lengths=args.lengths,
    samples=args.samples,
    configs=args.configs,
    block_size=args.block_size,
    seed=args.seed,
    cal_method=args.cal_method,
    cal_prompts=args.cal_prompts,
    cal_length=args.cal_length,
    dtype=args.dtype,
    batch=args.batch,
    max_new_tokens=args.max_new_tokens,
    implementation=args.implementation,
  )
  # The run's card, jax and date (its folder and file name), not those of a --report-only rebuild's machine.
  result = dict(
    metadata(SCRIPT, argv),
    card=records[-1].get("device", env["device"]),
    jax=env["jax"],
    date=stem.name[:10],
    env=env,
    args=run_args,
    **summary,
    fidelity=fidelity_summary(fidelity),
  )
  stem = write_result(result, script=SCRIPT, tag=args.tag, out_dir=args.out_dir, to_markdown=to_markdown)
  plot_accuracy_density(stem_file(stem, "-accuracy-density.png"), summary)
  if any(estimator_of(c) == "alternating" for c in summary["configs"]):
    plot_estimators(stem_file(stem, "-estimators.png"), summary)
  _log(f"wrote {stem}.json, .md, -accuracy-density.png")
  return summary


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help='"smollm2", a Hugging Face directory or a .gguf file')
  p.add_argument("--tasks", type=csv_of(str), default=["single", "multikey", "multivalue", "vartrack"])
  p.add_argument("--haystacks", type=csv_of(str), default=["noise", "prose"])
  p.add_argument("--lengths", type=csv_of(int), default=[2048, 4096, 8192])
  p.add_argument("--samples", type=int, default=10, help="samples per task x haystack x length")
  p.add_argument("--round-size", type=int, default=5, help="sample indices per round over lengths and configs")
  p.add_argument("--batch", type=int, default=8, help="prompts per generate call (one length, one config)")
  p.add_argument(
    "--max-new-tokens",
    type=int,
    default=64,
    help="answer budget of every task (the prompt fills the rest of the length)",
  )
  p.add_argument("--configs", type=csv_of(str), default=list(DEFAULT_CONFIGS))
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--implementation",
    default=None,
    help="XAttention backend(s), comma separated (default: the best for the platform). The semantics "
    "are the same everywhere; 'xla' compiles a 30-layer model faster than the Pallas kernels",
  )
  p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  p.add_argument("--cal-method", choices=["reference", "selection"], default="selection")
  p.add_argument("--cal-stride", type=int, default=8)
  p.add_argument("--cal-prompts", type=int, default=4)
  p.add_argument("--cal-length", type=int, default=4096)
  p.add_argument("--cal-tasks", type=csv_of(str), default=["single", "multikey"])
  p.add_argument("--search-prompts", type=int, default=40, help="dev prompts of the min<tau> threshold search")
  p.add_argument("--search-length", type=int, default=4096)
  p.add_argument("--search-factor", type=float, default=0.9, help="each step lowers a layer's thresholds by this")
  p.add_argument("--search-tolerance", type=float, default=0.0, help="accuracy a step may lose and be kept")
  p.add_argument("--search-evals", type=int, default=90, help="at most this many accuracy evaluations")
  p.add_argument("--fidelity-prompts", type=int, default=1, help="0 skips the fidelity section")
  p.add_argument("--fidelity-length", type=int, default=4096)
  p.add_argument(
    "--mask-heads",
    type=lambda s: [tuple(int(x) for x in hh.split(":")) for hh in s.split(",")],
    default=None,
    help="layer:head pairs for the mask heat maps (default: four spread over the model)",
  )
  p.add_argument("--no-masks", dest="masks", action="store_false")
  add_output_args(p)
  p.add_argument("--report-only", action="store_true", help="rebuild the table and plots from the JSONL")
  p.add_argument(
    "--require-equal",
    type=csv_of(str),
    default=[],
    help="configs whose answers must equal dense's on every sample (exit 1 otherwise), e.g. s8_t1.0",
  )
  args = p.parse_args(argv)
  if args.implementation:
    args.implementation = tuple(args.implementation.split(","))
  for c in args.configs:
    parse_config(c, cal_stride=args.cal_stride)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax

  env = dict(
    model=args.model,
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
    date=datetime.date.today().isoformat(),
    host=f"{platform.machine()}, {os.cpu_count()} CPUs",
    command="python benchmarks/niah.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
  )
  stem = run_stem(args.out_dir, args.tag, env["device"], any_card=args.report_only)
  previous = stem_file(stem, ".json")
  if args.report_only and previous.exists():  # the table describes the runs that made the JSONL, not this host
    env = json.loads(previous.read_text())["env"] | dict(rebuilt_by=env["command"])
  if not args.report_only:
    runner = Runner(args, stem)
    if args.fidelity_prompts > 0:  # first: cheap, and kept if a long run is stopped
      runner.fidelity()
    if args.masks:
      runner.masks()
    runner.run()
  summary = report(args, env, stem, argv)
  if args.require_equal:
    check_equal_answers(_load_jsonl(stem_file(stem, ".jsonl")), args.require_equal)
  return summary


def check_equal_answers(records: list[dict], configs) -> None:
  """Raises SystemExit(1) unless each config's answer equals dense's on every sample both ran."""
  dense = {r["id"]: r["output"] for r in records if r["config"] == "dense"}
  for config in configs:
    mine = {r["id"]: r["output"] for r in records if r["config"] == config}
    common = sorted(set(mine) & set(dense))
    if not common:
      raise SystemExit(f"--require-equal {config}: no sample ran with both {config} and dense")
    differ = [i for i in common if mine[i] != dense[i]]
    if differ:
      print(
        f"{config}: {len(differ)} of {len(common)} answers differ from dense: "
        + "; ".join(f"{i}: {mine[i]!r} vs {dense[i]!r}" for i in differ[:5]),
        file=sys.stderr,
      )
      raise SystemExit(1)
    _log(f"{config}: all {len(common)} answers equal dense's")


if __name__ == "__main__":
  main()
