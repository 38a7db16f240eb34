"""The benchmarks package's result files: the shared writer's layout and metadata, and `benchmarks.render`
regenerating the same markdown from the json (in process and as `python benchmarks/render.py`)."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys

import jax

from benchmarks import attention_speed, render
from benchmarks.result_files import result_stem, stem_file, write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = dict(
  B=1,
  T=256,
  N=4,
  K=2,
  H=64,
  what="sparse kernel",
  density=0.5,
  ms=1.25,
  min_ms=1.2,
  spread_ms=0.01,
  ratio=0.6,
  target_ratio=0.575,
  tflops=1.0,
)


def _result():
  return dict(
    command="attention_speed.py --lengths 256", rows=[ROW], heads=4, head_dim=64, traced_checks="off", pipeline=1
  )


def test_write_result_layout_metadata_and_render(tmp_path):
  stem = write_result(
    _result(), script="attention_speed", tag="cal0.9", out_dir=tmp_path, to_markdown=attention_speed.to_markdown
  )
  today = datetime.date.today().isoformat()
  assert stem == tmp_path / "attention_speed" / "cpu" / f"{today}-cal0.9"  # a dot in the tag stays in the name
  assert sorted(p.name for p in stem.parent.iterdir()) == [f"{today}-cal0.9.json", f"{today}-cal0.9.md"]
  result = json.loads(stem_file(stem, ".json").read_text())
  assert {k: result[k] for k in ("script", "card", "jax", "date")} == dict(
    script="attention_speed", card="cpu", jax=jax.__version__, date=today
  )
  assert result["command"] == "attention_speed.py --lengths 256" and result["rows"] == [ROW]
  md = stem_file(stem, ".md").read_text()
  assert md == render.render(stem_file(stem, ".json")) and "| 256 | 2 | sparse kernel | 0.500 | 1.250 |" in md
  assert render.main(["--check", str(stem_file(stem, ".json"))]) == 0
  stem_file(stem, ".md").write_text(md.replace("1.250", "9.999"))  # an edited table is found, and rewritten
  assert render.main(["--check", str(stem_file(stem, ".json"))]) == 1
  assert render.main([str(stem_file(stem, ".json"))]) == 0 and stem_file(stem, ".md").read_text() == md


def test_render_names_the_script_by_folder_for_old_files(tmp_path):
  """Result files written before the "script" field: the <script>/<card>/ folder names it; as a script too."""
  stem = result_stem(tmp_path, script="attention_speed", card="NVIDIA H200", date="2026-11-28", tag="old")
  assert stem.parent.name == "NVIDIA_H200"
  stem.parent.mkdir(parents=True)
  old = dict(_result(), card="NVIDIA H200", jax="0.11.2", date="2026-11-28")
  stem_file(stem, ".json").write_text(json.dumps(old))
  stem_file(stem, ".md").write_text(attention_speed.to_markdown(old))
  script = [sys.executable, str(ROOT / "benchmarks" / "render.py")]
  proc = subprocess.run(
    script + ["--check", str(stem_file(stem, ".json"))], capture_output=True, text=True, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
