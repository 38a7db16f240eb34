"""The `xattn-jax` command line on small inputs (the tiny Hugging Face fixture stands in for a real model)."""

from __future__ import annotations

import pathlib

import pytest

from xattn_jax import cli

TINY_LLAMA = pathlib.Path(__file__).parent / "fixtures" / "tiny_llama"


def test_op(capsys):
  assert cli.main(["op", "--seq-len", "512", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                   "--block-size", "64", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "xattention" in out and "density" in out


def test_needle_prompt_then_generate_and_prefill_bench(tmp_path, capsys):
  pytest.importorskip("safetensors")
  prompt = tmp_path / "needle.txt"
  assert cli.main(["needle-prompt", "--out", str(prompt), "--chars", "1500", "--depth", "0.3"]) == 0
  assert "special magic number" in prompt.read_text()
  common = ["--model", str(TINY_LLAMA), "--prompt-file", str(prompt), "--block-size", "16", "--stride", "4",
            "--chunk-size", "512", "--max-new-tokens", "4"]
  assert cli.main(["generate", *common, "--attention", "xattention"]) == 0
  err = capsys.readouterr().err
  assert "prefill:" in err and "selected block density per layer:" in err
  assert cli.main(["prefill-bench", *common, "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "speedup" in out and "max |logit difference|" in out


def test_bad_arguments_are_reported(capsys):
  assert cli.main(["op", "--seq-len", "256", "--stride", "3"]) == 2
  assert "stride=3 must divide block_size=128" in capsys.readouterr().err


def test_calibrate_then_generate_with_the_thresholds(tmp_path, capsys):
  pytest.importorskip("safetensors")
  from xattn_jax.calibration import load_thresholds

  prompt = tmp_path / "p.txt"
  assert cli.main(["needle-prompt", "--out", str(prompt), "--chars", "1200", "--haystack", "noise"]) == 0
  out = tmp_path / "thresholds.json"
  assert cli.main(["calibrate", "--model", str(TINY_LLAMA), "--out", str(out), "--prompt-file", str(prompt),
                   "--target", "0.8", "--stride", "4", "--block-size", "16"]) == 0
  record = load_thresholds(out)
  assert len(record["layer_thresholds"]) == 2 and record["stride"] == 4 and record["target"] == 0.8
  assert all(0 <= t <= 1 for row in record["layer_thresholds"] for t in row)
  capsys.readouterr()
  assert cli.main(["generate", "--model", str(TINY_LLAMA), "--prompt-file", str(prompt), "--thresholds", str(out),
                   "--chunk-size", "512", "--max-new-tokens", "2"]) == 0
  densities = capsys.readouterr().err.split("selected block density per layer:")[1].split()
  assert len(densities) == 2 and all(0 < float(d) < 1 for d in densities)
  with pytest.raises(FileNotFoundError):
    cli.main(["generate", "--model", str(TINY_LLAMA), "--prompt-file", str(prompt), "--thresholds",
              str(tmp_path / "missing.json")])
