"""What a benchmark run shares outside its measurement: list and output flags, its metadata (card, jax version, date,
command line) and its result files.

A run writes <out-dir>/<script>/<card>/<date>-<tag>.json and, generated from that json by the script's own
`to_markdown(result)`, the .md next to it; the run's other files (plots) share the stem. `python -m benchmarks.render`
regenerates the .md from the json, so the markdown is always derived from the data.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shlex
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def csv_of(kind):
  """An argparse type: "a,b,c" -> [kind("a"), kind("b"), kind("c")], empty items skipped."""
  return lambda s: [kind(x) for x in s.split(",") if x]


def add_output_args(parser, *, tag: str = "run") -> None:
  """--out-dir and --tag (also spelled --name, its old name in some scripts)."""
  parser.add_argument(
    "--out-dir", default=str(RESULTS), help="results go to <out-dir>/<script>/<card>/<date>-<tag>.json and .md"
  )
  parser.add_argument("--tag", "--name", dest="tag", default=tag, help="the run's name in its file names")


def card_dir(card: str) -> str:
  """The folder of a card's results: its device kind with spaces as underscores ("NVIDIA H200" -> NVIDIA_H200)."""
  return card.replace(" ", "_")


def metadata(script: str, argv=None) -> dict:
  """script, card (device kind of the first device), jax version, today's date and the command line
  ("<script>.py ARGS", ARGS = argv, or the process's arguments when None)."""
  import jax  # here: a script's flags parse before JAX loads

  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  return dict(
    script=script,
    card=jax.devices()[0].device_kind,
    jax=jax.__version__,
    date=datetime.date.today().isoformat(),
    command=shlex.join([f"{script}.py", *argv]),
  )


def result_stem(out_dir, *, script: str, card: str, date: str, tag: str) -> pathlib.Path:
  """<out-dir>/<script>/<card>/<date>-<tag> (just <date> for an empty tag), without a suffix."""
  return pathlib.Path(out_dir) / script / card_dir(card) / (f"{date}-{tag}" if tag else date)


def stem_file(stem: pathlib.Path, suffix: str) -> pathlib.Path:
  """<stem><suffix> ("-masks.png", ".json"); unlike `with_suffix`, safe for tags with a dot (cal0.9)."""
  return stem.with_name(stem.name + suffix)


def write_result(result: dict, *, script: str, tag: str, out_dir, to_markdown) -> pathlib.Path:
  """Writes `result` as <stem>.json, with the metadata (`metadata(script)`) it lacks filled in, and
  to_markdown(that json read back) as <stem>.md, so that the markdown equals what `benchmarks.render` regenerates.
  The stem comes from the result's own card and date (a run that writes after every row keeps one file). Returns
  the stem, for the run's other files."""
  record = {**metadata(script), **result, "script": script}
  stem = result_stem(out_dir, script=script, card=record["card"], date=record["date"], tag=tag)
  stem.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(record, indent=1) + "\n"
  stem_file(stem, ".json").write_text(text)
  stem_file(stem, ".md").write_text(to_markdown(json.loads(text)))
  return stem
