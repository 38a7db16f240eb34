"""Does XAttention train like dense attention? Trains the same model from the same initialisation twice on a
synthetic long-context task, once with dense attention and once with XAttention in the forward and the backward.

    python benchmarks/train_long_context.py --preset cpu-small --out-dir benchmarks/results
    python benchmarks/train_long_context.py --preset gpu --out-dir benchmarks/results     # on the GPU machine

Task ("copy"): each sequence is T/2 random tokens followed by the same T/2 tokens again; the loss counts the second
half. Solving it needs attention T/2 tokens back -- a long-range, block-sparse pattern (one off-diagonal band) that
the estimator has to find, while early in training attention is diffuse (high density). Logged every
--log-every steps: loss, gradient norm, step time, and the selected block density per layer (a prefill of a batch).
Writes <out-dir>/train-<preset>-<card>-<date>.json/.md and a PNG of the loss curves; saves the final parameters of
each run with orbax under <out-dir>/checkpoints/ (skipped with --no-checkpoint).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xattn_jax as xa
from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.generate import Generator
from xattn_jax.models.training import TrainConfig, Trainer
from xattn_jax.models.transformer import Transformer

PRESETS = {
    "cpu-small": dict(length=1024, batch=8, steps=300, d_model=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                      vocab=32, block_size=64, stride=8, lr=1e-2, warmup=20),
    "gpu": dict(length=8192, batch=8, steps=1000, d_model=512, layers=6, heads=8, kv_heads=4, head_dim=64,
                vocab=1024, block_size=128, stride=8, lr=1e-3, warmup=100),
}


def copy_batch(rng: np.random.Generator, *, batch: int, length: int, vocab: int, shift: int = 0):
  """length // 2 random tokens, `shift` zeros, then the first tokens again: token t + D copies token t, with
  D = length // 2 + shift. The loss mask covers the copy (its first token is not predictable)."""
  half = length // 2
  first = rng.integers(1, vocab, size=(batch, half))
  tokens = np.zeros((batch, length), np.int32)
  tokens[:, :half] = first
  tokens[:, half + shift:] = first[:, :length - half - shift]
  mask = np.zeros((batch, length), bool)
  mask[:, half + shift + 1:] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


def threshold_schedule(tau: float, dense_steps: int, ramp_steps: int):
  """step -> tau: 1.0 (every causal block, dense gradients) up to `dense_steps`, then linearly down to `tau` over
  `ramp_steps` steps, then `tau`."""
  def schedule(step: int) -> float:
    if step <= dense_steps:
      return 1.0
    if step >= dense_steps + ramp_steps:
      return tau
    return 1.0 + (tau - 1.0) * (step - dense_steps) / ramp_steps
  return schedule


def run(preset: dict, attention: AttentionConfig, *, seed: int, log_every: int, checkpoint_dir: pathlib.Path | None,
        name: str, schedule=None, shift: int = 0) -> dict:
  """schedule: optional step -> tau for an XAttention run (thresholds are state: no recompilation)."""
  config = ModelConfig(vocab_size=preset["vocab"], d_model=preset["d_model"], num_layers=preset["layers"],
                       num_heads=preset["heads"], num_kv_heads=preset["kv_heads"], head_dim=preset["head_dim"],
                       mlp_dim=4 * preset["d_model"], max_seq_len=preset["length"], attention=attention)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  model = Transformer(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
  trainer = Trainer(model, TrainConfig(learning_rate=preset["lr"], warmup_steps=preset["warmup"],
                                       total_steps=preset["steps"]))
  state = trainer.init()
  rng = np.random.default_rng(seed)
  probe_tokens, _ = copy_batch(np.random.default_rng(12345), batch=2, length=preset["length"], vocab=preset["vocab"],
                               shift=shift)
  log, tau = [], None
  for step in range(1, preset["steps"] + 1):
    if schedule is not None and schedule(step) != tau:
      tau = schedule(step)
      state = trainer.set_thresholds(state, tau)
    tokens, mask = copy_batch(rng, batch=preset["batch"], length=preset["length"], vocab=preset["vocab"], shift=shift)
    start = time.perf_counter()
    state, metrics = trainer.step(state, tokens, mask)
    loss = float(metrics["loss"])  # blocks until the step is done
    step_s = time.perf_counter() - start
    if step % log_every == 0 or step == 1:
      gen = Generator(trainer.model(state), max_len=preset["length"], chunk_size=preset["length"],
                      bucket=preset["block_size"])
      densities = np.asarray(gen.prefill([list(map(int, row)) for row in np.asarray(probe_tokens)])[2])
      log.append(dict(step=step, loss=loss, grad_norm=float(metrics["grad_norm"]), step_s=step_s,
                      densities=[float(d) for d in densities], tau=tau))
      dens = " ".join("dense" if d < 0 else f"{d:.2f}" for d in densities)
      print(f"{name:>10} step {step:5d}  loss {loss:.4f}  {step_s * 1e3:8.1f} ms/step  density {dens}", flush=True)
  if checkpoint_dir is not None:
    import orbax.checkpoint as ocp

    path = (checkpoint_dir / name).resolve()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, nnx.to_pure_dict(state.params), force=True)
  return dict(name=name, log=log, median_step_s=float(np.median([r["step_s"] for r in log[1:]] or [np.nan])))


def main(argv=None) -> int:
  with xa.traced_checks(False):  # production dispatch: no checkify effects in the timed programs
    return _main(argv)



def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--threshold", type=float, default=0.9)
  parser.add_argument("--log-every", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out-dir", default="benchmarks/results")
  parser.add_argument("--no-checkpoint", action="store_true")
  parser.add_argument("--runs", default="dense,xattention",
                      help="comma separated: dense, xattention (tau fixed), schedule (XAttention with tau 1.0 for "
                           "--dense-steps steps, then down to --threshold over --ramp-steps)")
  parser.add_argument("--dense-steps", type=int, default=100)
  parser.add_argument("--ramp-steps", type=int, default=50)
  parser.add_argument("--name", default="", help="suffix of the result files")
  parser.add_argument("--copy-shift", type=int, default=0,
                      help="zeros between the two halves: the copy distance is T/2 + shift. With stride s (even), the "
                           "antidiagonal estimator never samples a diagonal whose distance is a multiple of s "
                           "(query offset s-1-a meets key offset a only at a = (s-1)/2), so shift 0 hides the copy "
                           "source from it; an odd shift does not")
  args = parser.parse_args(argv)
  preset = dict(PRESETS[args.preset])
  if args.steps:
    preset["steps"] = args.steps
    preset["warmup"] = min(preset["warmup"], args.steps // 10)
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  checkpoints = None if args.no_checkpoint else out / "checkpoints"
  xcfg = xa.XAttentionConfig(threshold=args.threshold, stride=preset["stride"], block_size=preset["block_size"])
  sparse = AttentionConfig(kind="xattention", xattention=xcfg)
  choices = {"dense": (AttentionConfig(), None), "xattention": (sparse, None),
             "schedule": (sparse, threshold_schedule(args.threshold, args.dense_steps, args.ramp_steps))}
  names = [n for n in args.runs.split(",") if n]
  if not names or any(n not in choices for n in names):
    parser.error(f"--runs {args.runs!r}: choose from {sorted(choices)}")
  runs = [run(preset, choices[name][0], seed=args.seed, log_every=args.log_every, checkpoint_dir=checkpoints,
              name=name, schedule=choices[name][1], shift=args.copy_shift) for name in names]
  card = jax.devices()[0].device_kind
  result = dict(card=card, jax=jax.__version__, date=datetime.date.today().isoformat(), preset=args.preset,
                settings=preset, threshold=args.threshold, dense_steps=args.dense_steps, ramp_steps=args.ramp_steps,
                copy_shift=args.copy_shift,
                command=" ".join(["train_long_context.py"] + (argv if argv is not None else sys.argv[1:])), runs=runs)
  stem = f"train-{args.preset}-{card.replace(' ', '_')}-{result['date']}" + (f"-{args.name}" if args.name else "")
  (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
  lines = [f"# Training dense vs XAttention: {args.preset}, {card}, jax {jax.__version__}, {result['date']}", "",
           f"Command: `python benchmarks/{result['command']}`", "",
           f"Settings: {preset}, tau {args.threshold}, copy distance T/2 + {args.copy_shift}", "",
           "| step | " + " | ".join(f"{r['name']} loss" for r in runs) + " | "
           + " | ".join(f"{r['name']} tau, density per layer" for r in runs if r["name"] != "dense") + " |",
           "|---|" + "---|" * (len(runs) + sum(r["name"] != "dense" for r in runs))]
  for rows in zip(*(r["log"] for r in runs)):
    cells = [f"{x['loss']:.4f}" for x in rows]
    cells += [f"{x['tau'] if x['tau'] is not None else args.threshold:.3g}: "
              + " ".join(f"{d:.2f}" for d in x["densities"]) for r, x in zip(runs, rows) if r["name"] != "dense"]
    lines.append(f"| {rows[0]['step']} | " + " | ".join(cells) + " |")
  lines += ["", "Median step time: " + ", ".join(f"{r['name']} {r['median_step_s'] * 1e3:.1f} ms" for r in runs)
            + "."]
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
      ax1.plot([x["step"] for x in r["log"]], [x["loss"] for x in r["log"]], label=r["name"])
    ax1.set(xlabel="step", ylabel="loss (copied half)", yscale="log", title="training loss")
    ax1.legend()
    for r in runs:
      if r["name"] == "dense":
        continue
      xr = r["log"]
      for layer in range(len(xr[0]["densities"])):
        ax2.plot([x["step"] for x in xr], [x["densities"][layer] for x in xr], label=f"{r['name']} layer {layer}")
    ax2.set(xlabel="step", ylabel="selected block density", title=f"XAttention density (tau {args.threshold})")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=100)
  except ImportError:
    print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
