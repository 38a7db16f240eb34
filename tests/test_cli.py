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
