"""The `xattn-jax` command line on small inputs (the tiny Hugging Face fixture stands in for a real model)."""

from __future__ import annotations

import pathlib

import pytest

from xattn_jax import cli

TINY_LLAMA = pathlib.Path(__file__).parent / "fixtures" / "tiny_llama"


def test_op(capsys):
  assert (
    cli.main(
      [
        "op",
        "--seq-len",
        "512",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--block-size",
        "64",
        "--repeats",
        "1",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "xattention" in out and "density" in out


def test_needle_prompt_then_generate_and_prefill_bench(tmp_path, capsys):
  pytest.importorskip("safetensors")
  prompt = tmp_path / "needle.txt"
  assert cli.main(["needle-prompt", "--out", str(prompt), "--chars", "1500", "--depth", "0.3"]) == 0
  assert "special magic number" in prompt.read_text()
  common = [
    "--model",
    str(TINY_LLAMA),
    "--prompt-file",
    str(prompt),
    "--block-size",
    "16",
    "--stride",
    "4",
    "--chunk-size",
    "512",
    "--max-new-tokens",
    "4",
  ]
  assert cli.main(["generate", *common, "--attention", "xattention"]) == 0
  err = capsys.readouterr().err
  assert "prefill:" in err and "selected block density per layer:" in err
  assert cli.main(["prefill-bench", *common, "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "speedup" in out and "max |logit difference|" in out


MODEL = ["--model", str(TINY_LLAMA)]


def _bad_invocations(tmp_path):
  """(argv, words the one-line error must contain): the everyday mistakes, each caught before a model loads."""
  prompt = tmp_path / "p.txt"
  prompt.write_text("Hello there.")
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  bad_thresholds = tmp_path / "t.json"
  bad_thresholds.write_text("{}")
  folder = tmp_path / "docs"
  folder.mkdir()
  p = ["--prompt-file", str(prompt)]
  return [
    (["generate", *MODEL, "--prompt-file", str(tmp_path / "missing.txt")], "argument --prompt-file: "),
    (["generate", "--model", "smollm3", *p], "argument --model: smollm3 does not exist"),
    (["generate", "--model", str(folder), *p], "without config.json"),
    (["generate", "--model", "HuggingFaceTB/SmolLM2-135M", *p], "repo ids are not accepted"),
    (["generate", *MODEL, *p, "--thresholds", str(tmp_path / "none.json")], "argument --thresholds: "),
    (["generate", *MODEL, *p, "--thresholds", str(bad_thresholds)], "not a file written by `xattn-jax calibrate`"),
    (["generate", *MODEL, *p, "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is outside [1, inf)"),
    (["generate", *MODEL, *p, "--chunk-size", "100"], "--chunk-size 100 must be a multiple of 128"),
    (["generate", *MODEL, *p, "--threshold", "-1"], "tau >= 1 keeps every block"),
    (["generate", *MODEL, *p, "--threshold", "nan"], "argument --threshold: nan is outside"),
    (["generate", *MODEL, *p, "--top-p", "0"], "argument --top-p: 0 is outside (0.0, 1.0]"),
    (["generate", *MODEL, "--prompt-file", str(empty)], "is empty"),
    (["generate", *MODEL, *p, "--implementation", "pallas_tpu"], "pallas_tpu needs a TPU"),
    (["generate", *MODEL, *p, "--implementation", "triton"], "'triton' is not one of auto, xla"),
    (["prefill-bench", *MODEL, *p, "--repeats", "0"], "argument --repeats: 0 is outside [1, inf)"),
    (["needle-prompt", "--out", "/nonexistent/x.txt"], "the directory /nonexistent does not exist"),
    (["needle-prompt", "--out", str(tmp_path / "n.txt"), "--depth", "1.5"], "argument --depth: 1.5 is outside"),
    (["op", "--kv-heads", "3"], "--heads 8 must be a multiple of --kv-heads 3"),
    (["op", "--seq-len", "256", "--stride", "3"], "--stride 3 must divide --block-size 128"),
    (["op", "--seq-len", "abc"], "argument --seq-len: 'abc' is not an integer"),
    (["calibrate", *MODEL, "--out", str(tmp_path / "c.json"), "--target", "1.5"], "argument --target: 1.5"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
  ]


def test_mistakes_end_in_one_line_and_status_2(tmp_path, capsys, monkeypatch):
  from xattn_jax.models import loading

  def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")

  monkeypatch.setattr(loading, "from_pretrained", no_loading)
  for argv, words in _bad_invocations(tmp_path):
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xattn-jax: error: ") and words in lines[0], (argv, err)


def test_help_version_and_quiet(capsys):
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out.startswith("xattn-jax ")
  for command in ("op", "generate", "prefill-bench", "calibrate", "needle-prompt"):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default:" in text and "--quiet" in text
  assert cli.main(["--help"]) == 0
  text = capsys.readouterr().out
  assert all(c in text for c in ("calibrate", "needle-prompt", "prefill-bench", "generate", "tau >= 1"))
  assert (
    cli.main(
      [
        "op",
        "-q",
        "--seq-len",
        "256",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--block-size",
        "64",
        "--repeats",
        "1",
      ]
    )
    == 0
  )
  captured = capsys.readouterr()
  assert captured.err == "" and "rel. error" in captured.out


def test_errors_while_running_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
  def fails(args):
    raise ValueError("threshold file from another model")

  monkeypatch.setattr(cli, "_needle_prompt", fails)
  argv = ["needle-prompt", "--out", str(tmp_path / "n.txt")]
  assert cli.main(argv) == 2
  assert capsys.readouterr().err == (
    "xattn-jax: error: threshold file from another model (--debug shows the traceback)\n"
  )
  with pytest.raises(ValueError, match="another model"):
    cli.main(argv + ["--debug"])


def test_calibrate_then_generate_with_the_thresholds(tmp_path, capsys):
  pytest.importorskip("safetensors")
  from xattn_jax.calibration import load_thresholds

  prompt = tmp_path / "p.txt"
  assert cli.main(["needle-prompt", "--out", str(prompt), "--chars", "1200", "--haystack", "noise"]) == 0
  out = tmp_path / "thresholds.json"
  assert (
    cli.main(
      [
        "calibrate",
        "--model",
        str(TINY_LLAMA),
        "--out",
        str(out),
        "--prompt-file",
        str(prompt),
        "--target",
        "0.8",
        "--stride",
        "4",
        "--block-size",
        "16",
      ]
    )
    == 0
  )
  record = load_thresholds(out)
  assert len(record["layer_thresholds"]) == 2 and record["stride"] == 4 and record["target"] == 0.8
  assert all(0 <= t <= 1 for row in record["layer_thresholds"] for t in row)
  capsys.readouterr()
  assert (
    cli.main(
      [
        "generate",
        "--model",
        str(TINY_LLAMA),
        "--prompt-file",
        str(prompt),
        "--thresholds",
        str(out),
        "--chunk-size",
        "512",
        "--max-new-tokens",
        "2",
      ]
    )
    == 0
  )
  densities = capsys.readouterr().err.split("selected block density per layer:")[1].split()
  assert len(densities) == 2 and all(0 < float(d) < 1 for d in densities)
