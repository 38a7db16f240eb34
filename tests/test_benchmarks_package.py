"""The benchmarks package's result files: the shared writer's layout and metadata, and `benchmarks.render`
regenerating the same markdown from the json (in process and as `python benchmarks/render.py`); attention_speed.py
end to end at a toy size, and the block mask it hands to the PyTorch peers (tests/test_peers_torch.py checks those
where torch imports)."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xattn_jax as xa
from benchmarks import attention_speed, render
from benchmarks.common import BLOCK, block_mask_of, fixed_density_layout
from benchmarks.result_files import result_stem, stem_file, write_result
from tests import oracle

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


def test_every_result_in_the_repository_matches_its_markdown():
  """Each benchmarks/results json renders to the .md beside it (no hand edit of a table, no stale renderer); a run's
  side files (niah.py's fidelity and thresholds json: no "script" field, no .md) are skipped, not rendered."""
  files = sorted((ROOT / "benchmarks" / "results").glob("*/*/*.json"))
  assert len(files) > 50 and any(render.is_side_file(f) for f in files)
  assert render.main(["--check", *map(str, files)]) == 0


def test_render_skips_side_files(tmp_path, capsys):
  side = tmp_path / "niah" / "cpu" / "2026-12-07-run-fidelity.json"
  side.parent.mkdir(parents=True)
  side.write_text(json.dumps({"prompts": 1, "configs": {}}))
  assert render.main(["--check", str(side)]) == 0 and "skipped" in capsys.readouterr().out
  assert not side.with_suffix(".md").exists()
  side.with_suffix(".md").write_text("")  # with an .md beside it, it is a result again
  assert not render.is_side_file(side)


TOY = ["--lengths", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--implementation", "xla"]
TOY += ["--dense-implementation", "xla", "--repeats", "2"]


def test_attention_speed_runs_without_peers(tmp_path):
  """The sparse section at a toy size with XLA on both sides (the GPU run uses cuDNN and the Mosaic GPU kernel);
  no --peers: no torch rows, no torch import."""
  args = TOY + ["--densities", "50,100", "--sections", "sparse", "--out-dir", str(tmp_path), "--tag", "toy"]
  assert attention_speed.main(args) == 0
  (result_file,) = tmp_path.glob("attention_speed/*/*-toy.json")
  result = json.loads(result_file.read_text())
  assert [r["what"] for r in result["rows"]] == ["dense xla"] + ["sparse kernel"] * 2
  assert result["rows"][-1]["density"] == 1.0 and result["rows"][-1]["rel_err_vs_cudnn"] < 2e-2  # all == dense
  assert "torch" not in result and "torch" not in sys.modules
  assert result_file.with_suffix(".md").read_text() == attention_speed.to_markdown(result)


def test_attention_speed_peers_flags():
  with pytest.raises(SystemExit, match="2"):
    attention_speed.main(TOY + ["--peers", "flash"])  # not a peer
  with pytest.raises(SystemExit, match="2"):
    attention_speed.main(TOY + ["--peers", "flex", "--sections", "estimator"])  # flex needs the sparse layouts
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(SystemExit, match="2"):  # a parser error naming torch, before any JAX work
      attention_speed.main(TOY + ["--peers", "flex"])


def test_markdown_of_peer_rows():
  flex = dict(ROW, what="torch flex_attention", ms=1.0, vs_ours=0.8, event_ms=0.9, rel_err_vs_ours=1e-3)
  result = dict(_result(), card="NVIDIA H100", jax="0.11.2", date="2026-12-06", rows=[ROW, flex])
  result.update(torch="2.11.0", torch_device="cuda", peers=["flex"])
  md = attention_speed.to_markdown(result)
  assert "torch 2.11.0 on cuda" in md
  assert "rel_err_vs_ours=1.00e-03, flex/ours=0.800, events 0.900 ms |" in md


def test_block_mask_handed_to_peers_is_what_the_kernel_runs():
  """block_mask_of(layout) -> the SPEC §4 oracle (token mask: the selected blocks, causal) == our kernel on the
  layout; the torch test runs FlexAttention against the same oracle from the same kind of block mask."""
  B, T, N, K, H = 1, 512, 4, 2, 64
  layout = fixed_density_layout(jax.random.key(3), batch=B, heads=N, length=T, density=0.5)
  mask = block_mask_of(layout)
  nb = T // BLOCK
  assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == (B, N, nb, nb)
  assert (mask[..., np.arange(nb), np.arange(nb)]).all() and not np.triu(mask, 1).any()  # diagonal, causal blocks
  np.testing.assert_array_equal(mask.sum(-1), np.asarray(layout.counts))
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
  k, v = (jax.random.normal(key, (B, T, K, H), jnp.float32) for key in (kk, kv))
  got = xa.block_sparse_attention(q, k, v, layout, causal=True, implementation="xla")
  want, _ = oracle.attention(q, k, v, mask, block_size=BLOCK, causal=True)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_model_decode_section_at_a_toy_size(tmp_path):
  """model_prefill.py's decode section on the tiny shape: one row per cache alignment (the Generator's cache_len),
  one compilation each, and --decode-profile's per-op rows (the host's XLA threads on a CPU)."""
  from benchmarks import model_prefill

  args = ["--sections", "decode", "--shape", "tiny", "--layers", "2", "--decode-contexts", "256", "--decode-batches"]
  args += ["2", "--decode-tokens", "8", "--cache-aligns", "128,512", "--decode-profile", "3", "--repeats", "1"]
  assert model_prefill.main(args + ["--out-dir", str(tmp_path), "--tag", "toy"]) == 0
  (result_file,) = tmp_path.glob("model_prefill/*/*-toy.json")
  rows = json.loads(result_file.read_text())["decode"]
  assert [(r["cache_align"], r["cache_len"], r["decode_compiles"]) for r in rows] == [(128, 384, 1), (512, 512, 1)]
  assert all(r["step_ms"] > 0 and 0 < len(r["profile"]) and r["cache_donated"] for r in rows)
  assert "cache of 512 tokens" in result_file.with_suffix(".md").read_text()


def test_sharded_model_prefill_at_a_toy_size(tmp_path):
  """model_prefill_sharded.py on CPU devices: one GPU's row, then sequence- and head-split rows per kind, whose
  logits match the one-device row's and whose XAttention selects the same density; meshes that cannot hold the model
  or the one prompt are refused before anything runs."""
  from benchmarks import model_prefill_sharded

  args = ["--shape", "tiny", "--layers", "2", "--length", "512", "--meshes", "1x2x1,1x1x2", "--repeats", "1"]
  assert model_prefill_sharded.main(args + ["--out-dir", str(tmp_path), "--tag", "toy"]) == 0
  (result_file,) = tmp_path.glob("model_prefill_sharded/*/*-toy.json")
  rows = json.loads(result_file.read_text())["rows"]
  assert [(r["kind"], r["mesh"], r["devices"]) for r in rows] == [
    (kind, mesh, devices)
    for kind in ("dense", "xattention")
    for mesh, devices in (("1x1x1", 1), ("1x2x1", 2), ("1x1x2", 2))
  ]
  for base, *sharded in (rows[:3], rows[3:]):
    for r in sharded:
      assert r["rel_err_vs_1gpu"] < 3e-2 and r["same_argmax"] and r["finite"], r
      assert r["scaling_efficiency"] == pytest.approx(base["ttft_s"] / r["ttft_s"] / r["devices"])
  assert {r["density"] for r in rows[3:]} == {rows[3]["density"]} and 0 < rows[3]["density"] < 1
  assert "| xattention | 1x2x1 | 2 |" in result_file.with_suffix(".md").read_text()
  for mesh in ("2x1x1", "1x1x4"):  # one prompt: data must be 1; the tiny shape's 2 kv heads do not split 4 ways
    with pytest.raises(SystemExit):
      model_prefill_sharded.main(args[:-4] + ["--meshes", mesh, "--out-dir", str(tmp_path)])


def test_model_prefill_section_at_a_toy_size(tmp_path):
  """model_prefill.py's prefill section on the tiny shape: dense and XAttention rows in both modes, the extra stride
  in both modes with its own estimator time and prediction, chunked equal to one-shot, --prefill-profile's rows."""
  from benchmarks import model_prefill

  args = ["--shape", "tiny", "--layers", "2", "--lengths", "1024", "--chunk-size", "256", "--no-natural"]
  args += ["--target-densities", "0.5", "--refine", "1", "--extra-stride", "16", "--prefill-profile", "3"]
  args += ["--repeats", "1", "--op-repeats", "1"]
  assert model_prefill.main(args + ["--out-dir", str(tmp_path), "--tag", "toy"]) == 0
  (result_file,) = tmp_path.glob("model_prefill/*/*-toy.json")
  result = json.loads(result_file.read_text())
  rows = {r["what"].split(" (")[0]: r for r in result["prefill"]}
  assert set(rows) == {
    "dense one-shot",
    "dense chunked",
    "xattention one-shot ~50%",
    "xattention chunked ~50%",
    "xattention one-shot s=16 ~50%",
    "xattention chunked s=16 ~50%",
  }
  assert rows["dense chunked"]["max_logit_diff_vs_dense"] < 1e-3
  assert [r["stride"] for r in result["prefill"] if "stride" in r] == [8, 8, 16, 16]
  assert all("predicted_ttft_s" in r for r in result["prefill"] if r["what"].startswith("xattention"))
  assert result["ops"][0]["estimator_ms_s16"] > 0 and [s["stride"] for s in result["threshold_search"]] == [8, 16]
  profiled = [name for name, r in rows.items() if r.get("profile")]
  assert profiled == ["dense one-shot", "xattention one-shot ~50%", "xattention one-shot s=16 ~50%"]


def test_copy_task_training_and_probe_with_top_neighbors(tmp_path, capsys):
  """train_long_context.py (two steps) with SPEC §2.7's rule writes it into its result and checkpoint, and
  probe_copy_plateau.py reloads that checkpoint with the rule and names the confused tokens."""
  from benchmarks import probe_copy_plateau, train_long_context

  args = ["--runs", "xattention", "--steps", "2", "--log-every", "1", "--block-size", "64", "--estimator"]
  args += ["alternating", "--keep-top-neighbors", "--out-dir", str(tmp_path), "--tag", "toy"]
  assert train_long_context.main(args) == 0
  (result_file,) = tmp_path.glob("train_long_context/*/*-toy.json")
  result = json.loads(result_file.read_text())
  assert result["keep_top_neighbors"] and result["estimator"] == "alternating"
  assert "keep_top_neighbors" in result_file.with_suffix(".md").read_text()
  capsys.readouterr()
  probe = [str(tmp_path / "checkpoints" / "xattention"), "--block-size", "64", "--estimator", "alternating"]
  assert probe_copy_plateau.main(probe + ["--keep-top-neighbors", "--interventions", "", "--batch", "2"]) == 0
  out = capsys.readouterr().out
  assert "keep_top_neighbors" in out and "wrong tokens as (target -> predicted)" in out


def test_probe_prefill_copies_times_the_tree_and_attributes_copies(capsys):
  """probe_prefill_copies.py runs the tiny shape against dense in one process, and its attribution names each copy
  by the trace's hlo_op stat (else the overlapping XLA op) and sums cudaMemcpy sizes."""
  from types import SimpleNamespace as NS

  from benchmarks import probe_prefill_copies

  argv = ["--length", "512", "--layers", "1", "--shape", "tiny", "--stride", "8", "--taus", "0.5,0.5"]
  assert probe_prefill_copies.main(argv + ["--chunk-size", "256", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "dense one-shot" in out and "s=8 one-shot" in out and "s=8 chunked" in out

  def event(name, start, end, **stats):
    return NS(name=name, start_ns=start, end_ns=end, duration_ns=end - start, stats=list(stats.items()))

  ops = NS(name="XLA Ops", events=[event("fusion.1", 0, 100), event("custom-call.2", 200, 300)])
  stream = NS(
    name="Stream #7",
    events=[
      event("MemcpyD2D", 10, 30, memcpy_details="kind_src:device kind_dst:device size:4096 dest:0"),
      event("MemcpyD2D", 40, 50, memcpy_details="kind_src:device kind_dst:device size:1024 dest:0"),
      event("memcpy128", 210, 290),
      event("memcpy128", 400, 500, hlo_op="command_buffer_3", hlo_module="jit_prefill"),
      event("gemm_kernel", 220, 280),
    ],
  )
  table, samples = probe_prefill_copies.attribute_copies([NS(lines=[ops, stream])])
  assert table == {
    "fusion.1 <MemcpyD2D>": [2, pytest.approx(30e-6), 5120],
    "custom-call.2 <memcpy128>": [1, pytest.approx(80e-6), 0],
    "jit_prefill/command_buffer_3 <memcpy128>": [1, pytest.approx(100e-6), 0],
  }
  assert len(samples) == 4


def test_tile_phases_of_a_mosaic_gpu_profiler_trace():
  """The phase summary of profile_attention_tiles.py --phases on a trace in the profiler's dump format: two
  warpgroups, ranges per tile, one scope re-entered inside "steps" (counted toward it), gaps between ranges."""
  from benchmarks.profile_attention_tiles import phase_table, tile_phases

  def rng(name, begin, end, tid):
    return [dict(name=name, ph="B", ts=begin, pid=1, tid=tid), dict(name=name, ph="E", ts=end, pid=1, tid=tid)]

  events = rng("open", 0.0, 2.0, 1) + rng("steps", 2.0, 10.0, 1) + rng("close", 10.0, 11.0, 1)
  events += rng("open", 12.0, 13.0, 1)  # the next tile, 1 kcyc after the last close
  events[2:2] = rng("steps", 3.0, 4.0, 1)  # nested: inside the outer "steps" range
  events += rng("open", 5.0, 8.0, 2) + rng("steps", 8.0, 20.0, 2)
  events += [dict(e, pid=2, tid=3, ts=e["ts"] + 1.0) for e in rng("steps", 0.0, 9.0, 3)]  # another SM: 9 long
  summary = tile_phases({"traceEvents": events})
  assert summary["phases"] == {"open": [2.0, 1.0, 3.0], "steps": [8.0, 12.0, 9.0], "close": [1.0]}
  assert summary["between"] == [0.0, 0.0, 1.0, 0.0] and summary["span"] == {1: 13.0, 2: 15.0, 3: 9.0}
  assert summary["sm_span"] == {1: 20.0, 2: 9.0}  # SM 1: its two warpgroups from 0 to 20
  assert summary["by_warpgroup"]["open"] == {0: [2.0, 1.0], 1: [3.0]}  # tids 1, 2: warpgroups 0, 1 of CTA 0
  assert summary["by_warpgroup"]["steps"] == {0: [8.0], 1: [12.0], 2: [9.0]}  # tid 3: warpgroup 2
  table = phase_table(summary)
  assert "    wg1              n=     1  median    3.00 kcyc" in table  # each consumer's own line under "open"
  assert "wg" not in table.split("close")[1]  # a phase only one warpgroup has gets no per-warpgroup lines
  assert "busiest span 15.0 kcyc" in table and "busiest / mean SM span 1.379" in table and "share" in table
  assert "CUT SHORT" not in table and "CUT SHORT" not in phase_table(summary, tiles=0)
  assert "TRACE CUT SHORT: 1 of 2 tile closes" in phase_table(summary, tiles=1)  # one close of a tile's two


def test_tile_schedule_simulation():
  """The snake deals positions c, 2G - 1 - c, ... to CTA c; the counter gives the next tile to the CTA that is free
  first, which evens out a causal triangle of rows better than the snake once heads meet inside a round."""
  from benchmarks import simulate_tile_schedule as sim

  np.testing.assert_array_equal(sim.cta_work(np.array([5.0, 4, 3, 2, 1]), 2, "snake"), [5 + 2 + 1, 4 + 3])
  np.testing.assert_array_equal(
    sim.cta_work(np.array([5.0, 4, 3, 2, 1]), 2, "counter"), [5 + 2 + 1, 4 + 3]
  )  # a tie goes to CTA 0
  counts = np.broadcast_to(np.arange(1, 17, dtype=np.int32), (1, 8, 16))  # causal rows, 8 heads, 4 per kv head
  for order in ("head", "kv_head", "rows"):
    costs = 5.0 + 2.82 * sim.ordered_counts(counts, order, group=4)
    assert sorted(costs) == sorted(5.0 + 2.82 * counts.ravel())
    assert costs[0] == 5.0 + 2.82 * 16  # the last query block first
  snake = sim.cta_work(5.0 + 2.82 * sim.ordered_counts(counts, "head", 4), 10, "snake")
  counter = sim.cta_work(5.0 + 2.82 * sim.ordered_counts(counts, "kv_head", 4), 10, "counter")
  assert counter.max() / counter.mean() < snake.max() / snake.mean()


def test_decode_roofline_names_the_bandwidths_a_result_measured():
  """Results from before the read kernel have a copy bandwidth only: the markdown says so instead of printing nan."""
  from benchmarks.model_prefill import bandwidth_words

  assert bandwidth_words({"copy_bandwidth_tb_s": 2.95}) == "a copy's 2.95 TB/s"
  both = bandwidth_words({"copy_bandwidth_tb_s": 2.95, "read_bandwidth_tb_s": 3.6})
  assert both == "the larger of a copy's 2.95 TB/s and a max's 3.60 TB/s"
  assert bandwidth_words({}) == "none recorded"


def test_estimator_speed_in_one_jit_at_a_toy_size(tmp_path):
  """Both estimators timed as 2 calls chained in one program, on the CPU's XLA backend against XLA attention (the
  GPU run: the Mosaic GPU kernel against cuDNN); a --configs name that does not exist is refused before any run."""
  from benchmarks import estimator_speed

  args = ["--lengths", "256", "--strides", "8,16", "--heads", "4", "--kv-heads", "2", "--head-dim", "64"]
  args += ["--repeats", "2", "--in-jit", "2", "--dense-implementation", "None", "--out-dir", str(tmp_path)]
  assert estimator_speed.main(args + ["--tag", "toy"]) == 0
  (result_file,) = tmp_path.glob("estimator_speed/*/*-toy.json")
  result = json.loads(result_file.read_text())
  assert result["in_jit"] == 2 and result["configs"] == []
  assert [(r["stride"], r["estimator"]) for r in result["rows"]] == [
    (8, "antidiagonal"),
    (8, "alternating"),
    (16, "antidiagonal"),
    (16, "alternating"),
  ]
  assert all(r["ms"] > 0 and r["of_dense"] == r["ms"] / r["dense_ms"] for r in result["rows"])
  assert "chained in one jitted program" in result_file.with_suffix(".md").read_text()
  with pytest.raises(SystemExit):
    estimator_speed.main(args + ["--configs", "default,cluster-heads-8"])
