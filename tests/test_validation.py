"""Bad input: every check names the argument (table-driven), eagerly as ValueError and traced under checkify."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import xattn_jax as xa
from tests.conftest import random_qkv, run_checked

B, T, S, N, K, H, BLK = 2, 32, 48, 4, 2, 8, 16
Q, KK, V = random_qkv(0, B=B, T=T, S=S, N=N, K=K, H=H)
SCORES = jnp.ones((B, N, 2, 3), jnp.float32)
GOOD_LAYOUT = xa.BlockLayout.from_dense(
  jnp.broadcast_to(xa.allowed_blocks(q_len=T, kv_len=S, block_size=BLK), (B, N, 2, 3)), block_size=BLK
)


def scores(**kw):
  args = dict(q=Q, k=KK, stride=4, block_size=BLK) | kw
  return xa.antidiagonal_scores(args.pop("q"), args.pop("k"), **args)


def attend(**kw):
  args = dict(q=Q, k=KK, v=V, layout=GOOD_LAYOUT) | kw
  return xa.block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout"), **args)


def xattn(**kw):
  args = dict(query=Q, key=KK, value=V, stride=4, block_size=BLK, is_causal=True) | kw
  return xa.xattention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


def select(**kw):
  args = dict(scores=SCORES, q_len=T, kv_len=S, block_size=BLK) | kw
  return xa.select_blocks(args.pop("scores"), **args)


def _layout_with(counts=None, indices=None):
  return xa.BlockLayout(
    counts=GOOD_LAYOUT.counts if counts is None else counts,
    indices=GOOD_LAYOUT.indices if indices is None else indices,
    num_allowed=GOOD_LAYOUT.num_allowed,
    block_size=BLK,
  )


BAD = [
  # (call, kwargs, words the message must contain)
  (scores, dict(q=Q[0]), "q must have rank 4"),
  (scores, dict(k=KK[..., None]), "k must have rank 4"),
  (attend, dict(v=V[0]), "v must have rank 4"),
  (scores, dict(k=KK[:1]), "k.shape[0]=1"),
  (scores, dict(k=KK[..., :4]), "k.shape[3]=4"),
  (attend, dict(v=V[:, :40]), "v.shape=(2, 40, 2, 8)"),
  (attend, dict(k=KK[:, :32], v=V[:, :32]), "layout.shape=(2, 4, 2, 3) must be"),
  (scores, dict(q=jnp.concatenate([Q, Q[:, :, :1]], axis=2)), "query heads N=5"),
  (scores, dict(k=KK[:, :20]), "key length S=20"),
  (scores, dict(stride=3), "stride=3 must divide block_size=16"),
  (scores, dict(stride=0), "stride=0"),
  (scores, dict(estimator="diagonal"), "estimator='diagonal' must be one of"),
  (xattn, dict(estimator=None), "estimator=None must be one of"),
  (xattn, dict(return_block_layout="indices"), "return_block_layout='indices' must be False, True or 'counts'"),
  (xattn, dict(stride=16, estimator="alternating"), "needs an even block_size / stride"),
  (scores, dict(block_size=-16), "block_size=-16"),
  (scores, dict(q=Q.astype(jnp.int32)), "q.dtype=int32"),
  (scores, dict(k=KK.astype(jnp.bfloat16)), "must be equal"),
  (scores, dict(scale=-1.0), "scale=-1.0"),
  (scores, dict(query_seq_lengths=jnp.array([33, 1])), "query_seq_lengths must lie in [0, 32]"),
  (scores, dict(key_value_seq_lengths=jnp.array([-1, 48])), "key_value_seq_lengths must lie in [0, 48]"),
  (scores, dict(query_seq_lengths=jnp.array([3])), "query_seq_lengths.shape=(1,)"),
  (scores, dict(query_seq_lengths=jnp.array([3.0, 4.0])), "query_seq_lengths.dtype=float32"),
  (
    scores,
    dict(query_seq_lengths=jnp.array([30, 30]), key_value_seq_lengths=jnp.array([20, 48])),
    "query_seq_lengths must be <= key_value_seq_lengths",
  ),
  (xattn, dict(threshold=-0.1), "threshold=-0.1"),
  (xattn, dict(threshold=float("nan")), "threshold=nan"),
  (xattn, dict(threshold=float("inf")), "threshold=inf"),
  (xattn, dict(threshold=jnp.ones((3,))), "threshold.shape=(3,)"),
  (xattn, dict(threshold=jnp.array([0.5, -1.0, 0.5, 0.5])), "threshold must lie in [0, inf)"),
  (xattn, dict(threshold="0.9"), "threshold must be a float"),
  (xattn, dict(query_chunk_size=24), "query_chunk_size=24 must be a multiple of block_size=16"),
  (xattn, dict(query=Q[0], key=KK), "key and value must be [S, K, H]"),
  (select, dict(scores=SCORES[0]), "scores must have rank 4"),
  (select, dict(q_len=50), "scores.shape[2:]=(2, 3)"),
  (select, dict(scores=SCORES.astype(jnp.int32)), "scores.dtype=int32"),
  (select, dict(scores=SCORES.at[0, 0, 0, 0].set(jnp.nan)), "scores must be finite"),
  (select, dict(q_len=48, kv_len=40, scores=jnp.ones((B, N, 3, 3))), "kv_len=40 must be >= q_len=48"),
  (select, dict(threshold=2 * [0.5]), "threshold.shape=(2,)"),
  (attend, dict(layout=GOOD_LAYOUT.to_dense()), "layout must be a BlockLayout"),
  (attend, dict(layout=_layout_with(counts=GOOD_LAYOUT.counts[:, :2])), "layout.counts.shape=(2, 2, 2)"),
  (
    attend,
    dict(layout=_layout_with(indices=GOOD_LAYOUT.indices.at[0, 0, 0, 0].set(7))),
    "layout.indices must lie in [0, 3)",
  ),
  (
    attend,
    dict(
      layout=_layout_with(counts=GOOD_LAYOUT.counts.at[0, 0, 0].set(0), indices=GOOD_LAYOUT.indices.at[0, 0, 0].set(0))
    ),
    "layout.counts must lie in [1, allowed blocks]",
  ),
  (
    attend,
    dict(
      layout=_layout_with(
        counts=GOOD_LAYOUT.counts.at[0, 0, 0].set(3), indices=GOOD_LAYOUT.indices.at[0, 0, 0].set(jnp.array([0, 1, 2]))
      )
    ),
    "outside the allowed set",
  ),
  (attend, dict(layout=_layout_with(counts=GOOD_LAYOUT.counts.at[0, 0, 0].set(4))), "layout.counts must lie in [0, 3]"),
  (
    attend,
    dict(layout=_layout_with(indices=GOOD_LAYOUT.indices.at[0, 0, 1].set(jnp.array([1, 0, 2])))),
    "strictly ascending",
  ),
  (
    attend,
    dict(layout=_layout_with(indices=GOOD_LAYOUT.indices.at[0, 0, 0].set(jnp.array([0, 1, 0])))),
    "strictly ascending",
  ),
  (
    attend,
    dict(layout=xa.BlockLayout.from_dense(jnp.ones((B, N, 2, 3), bool), block_size=BLK)),
    "outside the allowed set",
  ),
  (
    attend,
    dict(layout=xa.BlockLayout.from_dense(jnp.ones((B, N, 4, 6), bool), block_size=BLK)),
    "layout.shape=(2, 4, 4, 6) must be",
  ),
]


@pytest.mark.parametrize("call,kwargs,words", BAD, ids=[f"{c.__name__}-{w[:40]}" for c, _, w in BAD])
def test_bad_input_raises_value_error_naming_the_argument(call, kwargs, words):
  with pytest.raises(ValueError) as info:
    call(**kwargs)
  assert words in str(info.value)


TRACED = [
  (scores, dict(query_seq_lengths=jnp.array([33, 1])), "query_seq_lengths must lie in [0, 32]"),
  (
    scores,
    dict(query_seq_lengths=jnp.array([30, 30]), key_value_seq_lengths=jnp.array([20, 48])),
    "query_seq_lengths must be <= key_value_seq_lengths",
  ),
  (xattn, dict(threshold=jnp.array([0.5, -1.0, 0.5, 0.5])), "threshold must lie in [0, inf)"),
  (xattn, dict(threshold=jnp.float32(-0.5)), "threshold must lie in [0, inf)"),  # a traced scalar under jit
  (xattn, dict(threshold=jnp.float32(jnp.nan)), "threshold must lie in [0, inf)"),
  (select, dict(scores=SCORES.at[0, 0, 0, 0].set(jnp.inf)), "scores must be finite"),
  (
    attend,
    dict(layout=_layout_with(indices=GOOD_LAYOUT.indices.at[0, 0, 0, 0].set(7))),
    "layout.indices must lie in [0, 3)",
  ),
  (
    attend,
    dict(layout=xa.BlockLayout.from_dense(jnp.ones((B, N, 2, 3), bool), block_size=BLK)),
    "outside the allowed set",
  ),
]


@pytest.mark.parametrize("call,kwargs,words", TRACED, ids=[f"{c.__name__}-{w[:40]}" for c, _, w in TRACED])
def test_bad_traced_values_fail_under_checkify(call, kwargs, words):
  with pytest.raises(checkify.JaxRuntimeError) as info:
    run_checked(call, **kwargs)
  assert words in str(info.value)


def test_bad_traced_values_pass_silently_under_plain_jit_only_as_documented():
  """Under plain jit the value checks are no-ops (checkify debug checks): the call must not crash tracing."""
  out = jax.jit(lambda lens: xattn(query_seq_lengths=lens, key_value_seq_lengths=jnp.array([48, 48])))(
    jnp.array([32, 32])
  )
  assert out.shape == Q.shape and not np.isnan(np.asarray(out)).any()


@pytest.mark.parametrize(
  "kwargs,error",
  [
    (dict(bias=jnp.zeros((B, N, T, S))), NotImplementedError),
    (dict(mask=jnp.ones((B, N, T, S), bool)), NotImplementedError),
    (dict(dropout_rate=0.1), NotImplementedError),
    (dict(dropout_rate=0.1, deterministic=False), NotImplementedError),
    (dict(treshold=0.5), TypeError),
    (dict(implementation="cuda-magic"), ValueError),
  ],
)
def test_unsupported_features(kwargs, error):
  with pytest.raises(error):
    xattn(**kwargs)


def test_dropout_is_fine_when_deterministic():
  out = xattn(dropout_rate=0.1, deterministic=True, threshold=1.0)
  assert out.shape == Q.shape


@pytest.mark.parametrize(
  "kwargs,words",
  [
    (dict(stride=3), "stride=3 must divide block_size=128"),
    (dict(stride=0), "stride=0"),
    (dict(block_size=64, stride=8, query_chunk_size=100), "query_chunk_size=100"),
    (dict(threshold=-1.0), "threshold=-1.0"),
    (dict(threshold=(0.5, float("nan"))), "threshold[1]=nan"),
    (dict(threshold=()), "threshold=()"),
    (dict(keep_sink=1), "keep_sink=1"),
    (dict(estimator="paper"), "estimator='paper'"),
    (dict(block_size=64, stride=64, estimator="alternating"), "estimator='alternating' needs an even"),
    (dict(implementation=3), "implementation=3"),
    (dict(implementation=("xla", object())), "configured backend"),
  ],
)
def test_config_validation(kwargs, words):
  with pytest.raises(ValueError) as info:
    xa.XAttentionConfig(**kwargs)
  assert words in str(info.value)


def test_config_is_hashable_and_normalized():
  a = xa.XAttentionConfig(threshold=[0.9, 0.8], implementation=["xla"])
  b = xa.XAttentionConfig(threshold=(0.9, 0.8), implementation=("xla",))
  assert a == b and hash(a) == hash(b) and a.threshold == (0.9, 0.8)


def test_traced_checks_can_be_turned_off_for_fast_dispatch():
  bad = dict(query_seq_lengths=jnp.array([33, 1]))
  with xa.traced_checks(False):
    err, _ = jax.jit(checkify.checkify(lambda lens: scores(query_seq_lengths=lens), errors=checkify.all_checks))(
      bad["query_seq_lengths"]
    )
    assert err.get() is None  # no check was traced
    assert not jax.make_jaxpr(lambda lens: scores(query_seq_lengths=lens))(bad["query_seq_lengths"]).effects
  with pytest.raises(checkify.JaxRuntimeError):
    run_checked(scores, **bad)
  with pytest.raises(ValueError):  # eager calls always check
    with xa.traced_checks(False):
      scores(**bad)


def test_traced_checks_switch_is_scoped():
  """Only a context manager turns the checks off, and only inside its block (also when the block raises)."""
  from xattn_jax import _checks

  assert not hasattr(xa, "set_traced_checks") and _checks.traced_checks_enabled()
  with pytest.raises(RuntimeError):
    with xa.traced_checks(False):
      with xa.traced_checks(True):
        assert _checks.traced_checks_enabled()
      assert not _checks.traced_checks_enabled()
      raise RuntimeError("leaves the block")
  assert _checks.traced_checks_enabled()
