"""Accuracy benchmark and calibration: RULER-style samples, scoring and statistics, the per-head threshold rules and
fidelity metrics against float64 oracles, the model-level calibration, thresholds as model state, and the NIAH
benchmark end to end on the tiny fixture model (SmolLM2 runs in CI's main job: README)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xattn_jax as xa
from xattn_jax.evaluation import haystack
from xattn_jax.evaluation import calibration as mcal
from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.generate import Generator
from xattn_jax.models.transformer import Transformer
from tests.conftest import random_qkv, run_checked
from xattn_jax import calibration as xcal

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_llama"
TINY = ModelConfig(vocab_size=97, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96)
BLK = 16


def _words(sample) -> int:  # a stand-in tokenizer: whitespace words
  return len((sample.context + " " + sample.answer_prefix).split())


# ---------------------------------------------------------------------------------------------------------------------
# Samples and scoring


@pytest.mark.parametrize("task", haystack.TASKS)
@pytest.mark.parametrize("hay", haystack.HAYSTACKS)
def test_ruler_sample_fits_is_seeded_and_holds_its_answers(task, hay):
  kw = dict(haystack=hay, length=900, count_tokens=_words, max_new_tokens=40)
  a = haystack.ruler_sample(task, index=3, **kw)
  assert a == haystack.ruler_sample(task, index=3, **kw)  # a pure function of its arguments
  assert a != haystack.ruler_sample(task, index=4, **kw)
  assert 0.9 * 860 <= _words(a) <= 860
  for answer in a.answers:
    assert answer in a.context
  assert a.depth == haystack.DEPTHS[3 % len(haystack.DEPTHS)]
  if task == "vartrack":  # the chain is in order: each variable is assigned after the one it copies
    first = a.context.index(f"VAR {a.answers[0]} =")
    assert all(a.context.index(f"VAR {x} =") > first for x in a.answers[1:])
  assert haystack.string_match_all(" ".join(a.answers).upper(), a.answers) == 1.0


def test_needle_depth_moves_the_needle():
  kw = dict(haystack="noise", length=2000, count_tokens=_words, max_new_tokens=30, index=0)
  positions = []
  for depth in (0.1, 0.5, 0.9):
    s = haystack.ruler_sample("single", depth=depth, **kw)
    positions.append(s.context.index(s.answers[0]) / len(s.context))
  assert positions == sorted(positions) and positions[0] < 0.2 and positions[2] > 0.8


def test_string_match_all_and_bad_input():
  assert haystack.string_match_all("the numbers are 12 and 34", ["12", "34", "56"]) == pytest.approx(2 / 3)
  assert haystack.string_match_all("ABCDE", ["abcde"]) == 1.0
  with pytest.raises(ValueError, match="answers"):
    haystack.string_match_all("x", [])
  with pytest.raises(ValueError, match="haystack"):
    haystack.ruler_sample("single", haystack="web", length=500, index=0, count_tokens=_words)
  with pytest.raises(ValueError, match="task"):
    haystack.ruler_sample("summarize", haystack="noise", length=500, index=0, count_tokens=_words)
  with pytest.raises(ValueError, match="depth"):
    haystack.ruler_sample("single", haystack="noise", length=500, index=0, count_tokens=_words, depth=1.5)
  with pytest.raises(ValueError, match="no room"):
    haystack.ruler_sample("single", haystack="noise", length=40, index=0, count_tokens=_words)


def _niah():
  from benchmarks import niah

  return niah


def test_statistics():
  niah = _niah()
  c = niah.cell_stats([1, 1, 0, 1])
  assert c["n"] == 4 and c["accuracy"] == 0.75 and c["se"] == pytest.approx(np.sqrt(0.75 * 0.25 / 4))
  p = niah.paired_stats([1, 0, 1, 1], [1, 1, 1, 0])
  assert p["diff"] == 0 and p["discordant"] == 2 and p["se"] == pytest.approx(np.std([0, -1, 0, 1], ddof=1) / 2)
  # 2 points at 2 standard errors: unpaired at 90% accuracy needs ~1800 per config; paired at 5% discordance 500.
  assert niah.samples_needed(0.02, p=0.9) == 1800
  assert niah.samples_needed(0.02, discordance=0.05) == 500
  with pytest.raises(ValueError, match="config"):
    niah.parse_config("s8", cal_stride=8)
  assert niah.parse_config("s16_t0.95", cal_stride=8) == niah.RunConfig("s16_t0.95", "flat", 16, 0.95)
  alt = niah.parse_config("cal0.9_alt", cal_stride=16)
  assert (alt.name, alt.kind, alt.stride, alt.target, alt.estimator) == (
    "cal0.9_alt",
    "calibrated",
    16,
    0.9,
    "alternating",
  )
  with pytest.raises(ValueError, match="config"):
    niah.parse_config("dense_alt", cal_stride=8)
  nb = niah.parse_config("s8_t0.9_alt_nb", cal_stride=8)
  assert (nb.name, nb.kind, nb.threshold, nb.estimator, nb.top_neighbors) == (
    "s8_t0.9_alt_nb",
    "flat",
    0.9,
    "alternating",
    True,
  )
  assert niah.parse_config("min0.9_nb", cal_stride=8).top_neighbors
  with pytest.raises(ValueError, match="_nb"):
    niah.parse_config("cal0.9_nb", cal_stride=8)


def test_lowest_density_within_dense_per_estimator(tmp_path):
  """The #18 summary: per length and estimator the sparsest config at most 2 points below dense (paired), or none;
  and its plot of both estimators."""
  niah = _niah()
  # 100 samples at one length; dense answers all; each config fails `misses` of them at density `d`.
  plan = {
    "dense": (0, 1.0),
    "s8_t0.9": (5, 0.3),
    "s8_t0.95": (1, 0.5),
    "s8_t0.9_alt": (2, 0.31),
    "s8_t0.8_alt": (9, 0.2),
  }
  records = [
    dict(
      id=i, config=c, task="single", length=2048, score=float(i >= misses), density=d, compiled=True, layer_density=[d]
    )
    for c, (misses, d) in plan.items()
    for i in range(100)
  ]
  summary = niah.summarize(records, list(plan))
  got = {(w["estimator"], w["config"]) for w in summary["within_dense"]}
  assert got == {("antidiagonal", "s8_t0.95"), ("alternating", "s8_t0.9_alt")}
  alt = next(w for w in summary["within_dense"] if w["estimator"] == "alternating")
  assert alt["density"] == pytest.approx(0.31) and alt["diff"] == pytest.approx(-0.02) and alt["configs"] == 2
  strict = niah.lowest_density_within(summary["cells"], 0.0)
  assert [w["config"] for w in strict] == [None, None]
  niah.plot_estimators(tmp_path / "e.png", summary)
  assert (tmp_path / "e.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------------
# Per-head math against float64 oracles


def _oracle_mass(q, k, lengths, blk):
  """Dense causal softmax probabilities in float64, summed per (query block, key block) -> [B, N, nb, nb]."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  B, T, N, H = q.shape
  G = N // k.shape[2]
  k = np.repeat(k, G, axis=2)
  nb = -(-T // blk)
  out = np.zeros((B, N, nb, nb))
  for b in range(B):
    L = int(lengths[b])
    logits = np.einsum("tnh,snh->nts", q[b, :L], k[b, :L]) / np.sqrt(H)
    logits = np.where(np.tril(np.ones((L, L), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pad = nb * blk - L
    p = np.pad(p, ((0, 0), (0, pad), (0, pad)))
    out[b] = p.reshape(N, nb, blk, nb, blk).sum(axis=(2, 4))
  return out


def _qkv(seed=0, B=2, T=100, N=4, K=2, H=16):
  return random_qkv(seed, B=B, T=T, S=T, N=N, K=K, H=H, scale_q=2.0)


def test_block_attention_mass_matches_oracle():
  q, k, _ = _qkv()
  lengths = jnp.array([100, 61], jnp.int32)
  got = np.asarray(
    run_checked(lambda q, k, l: xcal.block_attention_mass(q, k, block_size=BLK, lengths=l), q, k, lengths)
  )
  want = _oracle_mass(q, k, lengths, BLK)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(got[1].sum(-1)[:, :4], [[16, 16, 16, 13]] * 4, atol=1e-4)  # real queries per row
  assert np.all(got[1][:, 4:] == 0)  # padding query blocks carry no mass


def test_fidelity_dense_and_sparse():
  q, k, v = _qkv(1)
  lengths = jnp.array([100, 77], jnp.int32)
  fidelity = lambda q, k, v, tau, l: xcal.attention_fidelity(q, k, v, tau, stride=4, block_size=BLK, lengths=l)
  full = run_checked(fidelity, q, k, v, jnp.float32(1.0), lengths)
  np.testing.assert_allclose(np.asarray(full["recall"]), 1.0, atol=1e-5)
  assert float(jnp.max(full["rel_error"])) < 1e-5 and np.allclose(np.asarray(full["density"]), 1.0)
  tau = jnp.array([0.0, 0.3, 0.6, 0.9])
  part = run_checked(fidelity, q, k, v, tau, lengths)
  # Recall, independently: the oracle's mass inside the layout the op selects.
  _, layout = xa.xattention(
    q,
    k,
    v,
    is_causal=True,
    threshold=tau,
    stride=4,
    block_size=BLK,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
    return_block_layout=True,
  )
  mass = _oracle_mass(q, k, lengths, BLK)
  want = (mass * np.asarray(layout.to_dense())).sum((-1, -2)) / mass.sum((-1, -2))
  np.testing.assert_allclose(np.asarray(part["recall"]), want, atol=1e-5)
  assert np.all(np.asarray(part["recall"])[:, 0] < 1) and np.all(np.asarray(part["rel_error"])[:, 0] > 1e-3)


@pytest.mark.parametrize("method", xcal.METHODS)
def test_head_thresholds_rules(method):
  q, k, _ = _qkv(2)
  lengths = jnp.array([100, 90], jnp.int32)
  taus = [
    np.asarray(xcal.head_thresholds(q, k, t, stride=4, block_size=BLK, lengths=lengths, method=method))
    for t in (0.5, 0.8, 0.95, 1.0)
  ]
  for lo, hi in zip(taus, taus[1:]):
    assert np.all(lo <= hi + 1e-6)  # monotone in the target
  assert np.all((taus[0] >= 0) & (taus[-1] <= 1)) and np.all(taus[-1] == 1.0)
  if method == "selection":  # by construction: the selection at each head's tau covers the target
    for target, tau in zip((0.5, 0.8, 0.95), taus):
      for b in range(2):
        fid = xcal.attention_fidelity(
          q[b : b + 1],
          k[b : b + 1],
          k[b : b + 1],
          jnp.asarray(tau[b]),
          stride=4,
          block_size=BLK,
          lengths=lengths[b : b + 1],
        )
        assert np.all(np.asarray(fid["recall"]) >= target - 1e-5)


def test_reference_rule_against_numpy():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.random((1, 2, 3, 3)) * np.tril(np.ones((3, 3))), jnp.float32)
  mass = jnp.asarray(rng.random((1, 2, 3, 3)) * np.tril(np.ones((3, 3))), jnp.float32)
  got = np.asarray(xcal._reference_rule(scores, mass, jnp.float32(0.7)))
  s, m = np.asarray(scores, np.float64), np.asarray(mass, np.float64)
  want = np.zeros((1, 2))
  for h in range(2):
    kept_mass = 0.0
    for r in range(3):
      order = np.argsort(-m[0, h, r], kind="stable")
      need = int(np.searchsorted(np.cumsum(m[0, h, r][order]), 0.7 * m[0, h, r].sum(), side="left")) + 1
      cut = s[0, h, r][order[:need]].min()
      kept_mass += s[0, h, r][s[0, h, r] >= cut].sum()
    want[0, h] = kept_mass / s[0, h].sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_thresholds_file_roundtrip_and_validation(tmp_path):
  path = tmp_path / "t.json"
  xcal.save_thresholds(path, [[0.5, 0.9], [1.0, 0.25]], stride=8, block_size=128, target=0.9)
  record = xcal.load_thresholds(path)
  assert record["layer_thresholds"] == [[0.5, 0.9], [1.0, 0.25]] and record["target"] == 0.9
  config = mcal.attention_config(path)
  assert config.kind == "xattention" and config.xattention.stride == 8 and config.for_layer(1).threshold == (1.0, 0.25)
  with pytest.raises(ValueError, match="thresholds must be"):
    xcal.save_thresholds(path, [0.5, 0.9], stride=8, block_size=128)
  path.write_text(json.dumps(dict(format="other")))
  with pytest.raises(ValueError, match="not an xattn-jax thresholds file"):
    xcal.load_thresholds(path)


# ---------------------------------------------------------------------------------------------------------------------
# Model level


def _tiny(attention=AttentionConfig(), seed=0):
  return Transformer(TINY.with_attention(attention), rngs=nnx.Rngs(seed))


def _xattn(threshold=0.9):
  return AttentionConfig(
    kind="xattention", xattention=xa.XAttentionConfig(threshold=threshold, block_size=BLK, stride=4)
  )


def test_captured_qkv_reproduce_the_model():
  model = _tiny()
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 97, (1, 80)), jnp.int32)
  layers = list(mcal.iter_layer_qkv(model, tokens))
  assert [l.layer for l in layers] == [0, 1, 2] and layers[0].q.shape == (1, 80, 4, 16)
  logits = model._logits(layers[-1].hidden)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5, rtol=1e-5)
  # The captured q/k/v are the layer's: dense attention on them, projected, is the layer's attention output.
  attn = model.layers[0].attn
  out = jax.nn.dot_product_attention(layers[0].q, layers[0].k, layers[0].v, is_causal=True)
  x = model.layers[0].attn_norm(model.embedder(tokens))
  want, _, _ = attn(x, positions=jnp.arange(80)[None], q_lengths=jnp.array([80]))
  np.testing.assert_allclose(np.asarray(attn.o_proj(out.reshape(1, 80, 64))), np.asarray(want), atol=1e-5)


def test_calibrate_and_fidelity_on_a_model():
  model = _tiny()
  prompts = [list(np.random.default_rng(i).integers(1, 97, n)) for i, n in enumerate((70, 100))]
  low = mcal.calibrate(model, prompts, target=0.6, stride=4, block_size=BLK, bucket=32)
  high = mcal.calibrate(model, prompts, target=0.95, stride=4, block_size=BLK, bucket=32)
  assert low.thresholds.shape == (3, 4) and low.per_prompt.shape == (2, 3, 4)
  assert np.all(low.thresholds <= high.thresholds + 1e-6) and np.all((high.thresholds >= 0) & (high.thresholds <= 1))
  np.testing.assert_allclose(low.thresholds, low.per_prompt.max(axis=0))
  fid = mcal.fidelity(model, prompts, {"cal": (4, high.thresholds), "flat": (4, 1.0)}, block_size=BLK, bucket=32)
  assert fid["cal"]["recall"].shape == (2, 3, 4)
  assert np.all(fid["cal"]["recall"] >= 0.95 - 1e-4)  # "max" over prompts: every prompt reaches the target
  np.testing.assert_allclose(fid["flat"]["recall"], 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="target"):
    mcal.calibrate(model, prompts, target=1.5)


def test_minimum_threshold_search():
  start = np.full((2, 2), 0.9)
  # Accuracy holds while layer 0's tau stays >= 0.6 and layer 1's >= 0.8.
  evaluate = lambda t: float(t[0].min() >= 0.6 and t[1].min() >= 0.8)
  table, history = mcal.minimum_threshold_search(start, evaluate, factor=0.9)
  np.testing.assert_allclose(table, [[0.9 * 0.9**3] * 2, [0.9 * 0.9] * 2])
  assert history[0]["accuracy"] == 1.0 and not history[-1]["kept"]
  with pytest.raises(ValueError, match="factor"):
    mcal.minimum_threshold_search(start, evaluate, factor=1.0)


def test_thresholds_are_state_new_values_do_not_recompile():
  model = _tiny(_xattn(0.9))
  prompts = [list(np.random.default_rng(3).integers(1, 97, 120))]
  gen = Generator(model, max_len=256, chunk_size=128, bucket=128)
  sparse_logits, _, d_sparse = gen.prefill(prompts)
  gen.set_thresholds(1.0)
  dense_logits, _, d_full = gen.prefill(prompts)
  assert gen.compiled_count("prefill") == 1  # one compilation for both thresholds
  assert np.all(np.asarray(d_full) == 1.0) and np.all(np.asarray(d_sparse) < 1.0)
  want, _, _ = Generator(_tiny(), max_len=256, chunk_size=128, bucket=128).prefill(prompts)
  np.testing.assert_allclose(np.asarray(dense_logits), np.asarray(want), atol=1e-5, rtol=1e-5)
  gen.set_thresholds()  # back to the config's
  np.testing.assert_allclose(np.asarray(gen.prefill(prompts)[0]), np.asarray(sparse_logits), atol=1e-6)
  # A per-(layer, head) table equals the same table given in the config.
  table = np.array([[0.5, 0.9, 0.7, 1.0], [0.8] * 4, [0.3, 0.6, 0.9, 0.95]])
  gen.set_thresholds(table)
  config_model = _tiny(
    AttentionConfig(kind="xattention", xattention=_xattn().xattention, layer_thresholds=[tuple(r) for r in table])
  )
  np.testing.assert_allclose(
    np.asarray(gen.prefill(prompts)[0]),
    np.asarray(Generator(config_model, max_len=256, chunk_size=128, bucket=128).prefill(prompts)[0]),
    atol=1e-6,
  )
  assert gen.compiled_count("prefill") == 1
  # Shared weights, other attention: the same model object's parameters, a new threshold state.
  dense_again = model.with_attention(AttentionConfig())
  assert dense_again.thresholds() == [None] * 3
  assert dense_again.layers[0].attn.q_proj.kernel is model.layers[0].attn.q_proj.kernel or np.array_equal(
    np.asarray(dense_again.layers[0].attn.q_proj.kernel[...]), np.asarray(model.layers[0].attn.q_proj.kernel[...])
  )


def test_set_thresholds_bad_input():
  model = _tiny(_xattn())
  with pytest.raises(ValueError, match="2 layers; the model has 3"):
    model.set_thresholds([0.9, 0.9])
  with pytest.raises(ValueError, match=r"thresholds\[1\].*one value per query head"):
    model.set_thresholds([0.9, (0.5, 0.5), 0.9])
  with pytest.raises(ValueError, match="finite and >= 0"):
    model.set_thresholds(-0.1)
  with pytest.raises(ValueError, match="finite and >= 0"):
    model.set_thresholds([0.9, float("nan"), 0.9])


def test_niah_end_to_end_on_the_tiny_fixture(tmp_path):
  niah = _niah()
  argv = [
    "--model",
    str(FIXTURE),
    "--lengths",
    "1024",
    "--samples",
    "1",
    "--tasks",
    "single,vartrack",
    "--haystacks",
    "noise",
    "--configs",
    "dense,s8_t1.0,s16_t0.5,cal0.9,min0.9",
    "--batch",
    "2",
    "--search-prompts",
    "2",
    "--search-length",
    "1024",
    "--search-evals",
    "3",
    "--cal-prompts",
    "1",
    "--cal-length",
    "1024",
    "--fidelity-length",
    "1024",
    "--out-dir",
    str(tmp_path),
    "--tag",
    "t",
    "--max-new-tokens",
    "8",
    "--require-equal",
    "s8_t1.0",
  ]
  summary = niah.main(argv)
  (jsonl,) = (tmp_path / "niah" / "cpu").glob("*-t.jsonl")  # <out-dir>/niah/<card>/<date>-<tag>.*
  run = str(jsonl).removesuffix(".jsonl")
  for suffix in (
    ".json",
    ".md",
    "-fidelity.json",
    "-masks.png",
    "-accuracy-density.png",
    "-thresholds-cal0.9-s8.json",
    "-thresholds-min0.9-s8.json",
  ):
    assert pathlib.Path(run + suffix).exists(), suffix
  report = json.loads(pathlib.Path(run + ".json").read_text())
  assert pathlib.Path(run + ".md").read_text() == niah.to_markdown(report) and "Fidelity" in niah.to_markdown(report)
  records = [json.loads(x) for x in jsonl.read_text().splitlines()]
  assert len(records) == 2 * 5
  assert {r["config"] for r in records} == {"dense", "s8_t1.0", "s16_t0.5", "cal0.9", "min0.9"}
  search = json.loads(pathlib.Path(run + "-thresholds-min0.9-s8.json").read_text())
  assert len(search["history"]) <= 3 and search["start"] == 0.9
  assert summary["per_config"]["dense"]["density"] == 1.0
  assert 0 < summary["per_config"]["s16_t0.5"]["density"] < 1
  fidelity = json.loads(pathlib.Path(run + "-fidelity.json").read_text())
  assert np.allclose(fidelity["configs"]["s8_t1.0"]["recall"], 1.0, atol=1e-4)
  # Resumable: a second run finds every (sample, config) done and only rebuilds the report.
  niah.main(argv)
  assert len(jsonl.read_text().splitlines()) == 10


def test_threshold_search_on_a_generator_reuses_one_compilation():
  from xattn_jax.evaluation.haystack import TaskSample

  model = _tiny(_xattn(0.9))
  gen = Generator(model, max_len=256, chunk_size=256, bucket=128)
  rng = np.random.default_rng(5)

  class Tok:  # ids as text: the "answer" is the greedy continuation the dense-ish model gives at tau 0.9
    stop_token_ids = ()
    encode = staticmethod(lambda text: [int(x) for x in text.split()])
    decode = staticmethod(lambda ids: " ".join(str(i) for i in ids))
    apply_chat_template = staticmethod(lambda messages: messages[0]["content"])

  samples = []
  for i in range(3):
    ids = [int(x) for x in rng.integers(1, 97, 150)]
    first = gen.generate([ids], max_new_tokens=2).tokens[0]
    samples.append(
      TaskSample(
        id=str(i),
        task="single",
        haystack="noise",
        length=256,
        depth=0.5,
        context=" ".join(map(str, ids)),
        answer_prefix="",
        answers=(" ".join(map(str, first)),),
        max_new_tokens=2,
      )
    )
  assert mcal.task_accuracy(gen, Tok, samples, batch=2) == 1.0
  compiled = gen.compiled_count("prefill")  # batch 1 (above) and batch 2
  table, history = mcal.search_thresholds(gen, Tok, samples, 0.9, factor=0.5, max_evals=6, batch=2)
  assert table.shape == (3, 4) and np.all(table <= 0.9) and len(history) <= 6
  for h in history[1:]:  # a step is kept iff the accuracy held
    assert h["kept"] == (h["accuracy"] >= history[0]["accuracy"])
  kept = [tuple(h["group"]) for h in history[1:] if h["kept"]]
  for layer in range(3):
    np.testing.assert_allclose(table[layer], 0.9 * 0.5 ** kept.count((layer,)))
  assert gen.compiled_count("prefill") == compiled  # no evaluation recompiled
  np.testing.assert_allclose([t[0] for t in gen._model(gen.state).thresholds()], 0.9)  # restored afterwards
