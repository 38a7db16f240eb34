"""Regenerates the markdown of benchmark results from their json: writes the .md next to each FILE.json.

    python -m benchmarks.render benchmarks/results/attention_speed/NVIDIA_H200/2026-11-28-v3.json [...]
    python -m benchmarks.render --check benchmarks/results/*/*/*.json   # compare only; exit 1 if an .md differs

The script whose `to_markdown(result)` renders a file is named by the json's "script" field, else by the folder the
file sits in (<script>/<card>/<date>-<tag>.json: results written before the field existed). A json with neither a
"script" field nor an .md beside it is a run's side file (niah.py's RUN-fidelity.json and calibrated thresholds), not a
result: it is skipped, with a line saying so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

if __name__ == "__main__" and not __package__:  # `python benchmarks/render.py`: the package from the repository root
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

BENCHMARKS = pathlib.Path(__file__).resolve().parent


def script_of(path: pathlib.Path, result) -> str:
  if isinstance(result, dict) and "script" in result:
    return result["script"]
  name = path.resolve().parent.parent.name
  if (BENCHMARKS / f"{name}.py").exists():
    return name
  raise ValueError(f"{path}: no 'script' field, and not in a <script>/<card>/ folder of a benchmark script")


def render(path) -> str:
  """The markdown of the result file `path`, from its json alone."""
  path = pathlib.Path(path)
  result = json.loads(path.read_text())
  module = importlib.import_module(f"benchmarks.{script_of(path, result)}")
  return module.to_markdown(result)


def markdown_path(path) -> pathlib.Path:
  path = pathlib.Path(path)
  return path.with_name(path.name.removesuffix(".json") + ".md")


def is_side_file(path) -> bool:
  """A json that no script renders: no "script" field and no .md beside it (see the module docstring)."""
  path = pathlib.Path(path)
  if markdown_path(path).exists():  # a result: the json is read once, by `render`
    return False
  result = json.loads(path.read_text())
  return not (isinstance(result, dict) and "script" in result)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("files", nargs="+", type=pathlib.Path, help="result json files")
  parser.add_argument("--check", action="store_true", help="write nothing; list the .md files that differ")
  args = parser.parse_args(argv)
  differ = []
  for path in args.files:
    if is_side_file(path):
      print(f"skipped: {path} (a side file: no 'script' field and no .md)")
      continue
    text, md = render(path), markdown_path(path)
    if args.check:
      if not md.exists() or md.read_text() != text:
        differ.append(md)
        print(f"differs: {md}")
    else:
      md.write_text(text)
      print(f"wrote {md}")
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main())
