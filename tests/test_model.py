"""The Flax model: shapes at real sizes, KV cache, chunked prefill, buckets, per-layer attention choice, sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xattn_jax as xa
from xattn_jax.models.config import AttentionConfig, ModelConfig, llama3_1_8b, smollm2_135m
from xattn_jax.models.generate import Generator, sample
from xattn_jax.models.layers import MLP
from xattn_jax.models.transformer import Transformer
from tests.conftest import checked_jit, run_checked
from tests.hlo_checks import zero_filled_loop_buffers

TINY = ModelConfig(
  vocab_size=97, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96, qkv_bias=True
)
XATTN = AttentionConfig(kind="xattention", xattention=xa.XAttentionConfig(threshold=0.8, block_size=16, stride=4))


def _model(config=TINY, seed=0):
  return Transformer(config, rngs=nnx.Rngs(seed))


def _forward(model, tokens, lengths=None):
  graphdef, state = nnx.split(model)
  return run_checked(
    lambda state, tokens, lengths: nnx.merge(graphdef, state)(tokens, lengths=lengths),
    state,
    jnp.asarray(tokens, jnp.int32),
    jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32) if lengths is None else lengths,
  )


def _prompts(seed, lengths, vocab=97):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, vocab, size=n)) for n in lengths]


@pytest.mark.parametrize("config_fn,params", [(llama3_1_8b, 8_030_261_248), (smollm2_135m, 134_515_008)])
def test_shapes_at_real_sizes(config_fn, params):
  config = config_fn(attention=AttentionConfig(kind="xattention"))
  model = nnx.eval_shape(lambda: Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  assert count == params
  tokens = jax.ShapeDtypeStruct((1, 8192), jnp.int32)
  logits = nnx.eval_shape(lambda m, t: m(t), model, tokens)
  assert logits.shape == (1, 8192, config.vocab_size) and logits.dtype == jnp.float32


_METHODS = {}


def _method(model, name, *args):
  """model.<name>(*args) jitted under the checkify helper (compiled once per model, method and shapes)."""
  graphdef, state = nnx.split(model)
  key = (id(model), name)
  if key not in _METHODS:
    _METHODS[key] = (model, checked_jit(lambda state, *args: getattr(nnx.merge(graphdef, state), name)(*args)))
  return _METHODS[key][1](state, *args)


def _padded(prompts, width):
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@pytest.mark.parametrize("attention", [AttentionConfig(), XATTN], ids=["dense", "xattention"])
def test_prefill_then_decode_equals_full_forward(attention):
  model = _model(TINY.with_attention(attention))
  prompts = _prompts(1, [45, 30])
  tokens, lengths = _padded(prompts, 48)
  logits, cache, _ = _method(model, "prefill", tokens, lengths, model.init_cache(2, 128))
  next_tokens = jnp.array([5, 9], jnp.int32)
  step_logits, _ = _method(model, "decode", next_tokens, cache)
  # One right-padded forward of both prompts with their next tokens (causal: the padding changes no earlier row).
  full_tokens, full_lengths = _padded([p + [int(next_tokens[b])] for b, p in enumerate(prompts)], 48)
  full = _forward(model, full_tokens, full_lengths)
  for b, p in enumerate(prompts):
    np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(full[b, len(p) - 1]), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(step_logits[b]), np.asarray(full[b, len(p)]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", [AttentionConfig(), XATTN], ids=["dense", "xattention"])
def test_chunked_prefill_equals_one_shot(attention):
  model = _model(TINY.with_attention(attention))
  prompts = _prompts(2, [100, 61])
  tokens, lengths = _padded(prompts, 128)
  a, cache_a, _ = _method(model, "prefill", tokens, lengths, model.init_cache(2, 256))
  cache_b = model.init_cache(2, 256)
  for c in range(4):  # four chunks of 32 through the checkify helper; the second prompt ends inside chunk 1
    chunk_lengths = jnp.clip(lengths - 32 * c, 0, 32)
    logits, cache_b, _ = _method(model, "extend", tokens[:, 32 * c : 32 * (c + 1)], chunk_lengths, cache_b)
    if c == 1:
      np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(a[1]), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(a[0]), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(cache_a.lengths), np.asarray(cache_b.lengths))
  for la, lb in zip(cache_a.layers, cache_b.layers):  # the real tokens' keys (padding rows differ, never read)
    for b, n in enumerate((100, 61)):
      np.testing.assert_allclose(np.asarray(lb.k[b, :n]), np.asarray(la.k[b, :n]), atol=1e-5)
      np.testing.assert_allclose(np.asarray(lb.v[b, :n]), np.asarray(la.v[b, :n]), atol=1e-5)
  one_shot = Generator(model, max_len=256, chunk_size=128, bucket=16)
  chunked = Generator(model, max_len=256, chunk_size=32, bucket=16)
  assert one_shot.generate(prompts, max_new_tokens=6).tokens == chunked.generate(prompts, max_new_tokens=6).tokens


def test_bucket_padding_changes_nothing_and_buckets_compile_once():
  model = _model(TINY.with_attention(XATTN))
  gen = Generator(model, max_len=512, chunk_size=512, bucket=128)
  wide = Generator(model, max_len=512, chunk_size=512, bucket=256)
  prompts = _prompts(3, [100])
  np.testing.assert_allclose(
    np.asarray(gen.prefill(prompts)[0]), np.asarray(wide.prefill(prompts)[0]), atol=1e-5, rtol=1e-5
  )
  for n in (70, 128, 111):  # same bucket (128): no recompilation
    gen.prefill(_prompts(n, [n]))
  assert gen.compiled_count("prefill") == 1
  gen.prefill(_prompts(4, [129]))  # next bucket
  assert gen.compiled_count("prefill") == 2


def test_generation_matches_naive_greedy_and_stops():
  model = _model()
  prompt = _prompts(5, [20])[0]
  graphdef, state = nnx.split(model)
  forward = checked_jit(lambda state, tokens, lengths: nnx.merge(graphdef, state)(tokens, lengths=lengths))
  naive = list(prompt)
  for _ in range(5):  # full forwards of the growing sequence, padded to one shape (one compilation)
    tokens, lengths = _padded([naive], 32)
    naive.append(int(jnp.argmax(forward(state, tokens, lengths)[0, len(naive) - 1])))
  gen = Generator(model, max_len=128, chunk_size=64, bucket=16)
  result = gen.generate([prompt], max_new_tokens=5)
  assert result.tokens == [naive[20:]]
  stopped = gen.generate([prompt], max_new_tokens=5, stop_tokens=(naive[22],))
  assert stopped.tokens == [naive[20:22]]
  # A cache longer than max_len (aligned, as on a GPU) holds the same sequence: same tokens, same bounds.
  aligned = Generator(model, max_len=128, chunk_size=64, bucket=16, cache_align=96)
  assert (gen.cache_len, aligned.cache_len) == (128, 192)
  assert aligned.init_cache(1).layers[0].k.shape[1] == 192
  assert aligned.generate([prompt], max_new_tokens=5).tokens == [naive[20:]]
  long = _prompts(9, [100])  # two chunks: the second attends to the longer cache through its lengths
  np.testing.assert_allclose(aligned.prefill(long)[0], gen.prefill(long)[0], rtol=2e-5, atol=2e-5)
  sparse = _model(TINY.with_attention(XATTN))  # the estimator and selection see the longer cache's masked blocks
  x_gens = [Generator(sparse, max_len=128, chunk_size=64, bucket=16, cache_align=a) for a in (16, 96)]
  (x_plain, x_dens), (x_aligned, x_aligned_dens) = (g.prefill(long)[::2] for g in x_gens)
  np.testing.assert_allclose(x_aligned, x_plain, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(x_aligned_dens, x_dens)
  with pytest.raises(ValueError, match="exceeds max_len=128"):
    aligned.generate([prompt], max_new_tokens=120)
  with pytest.raises(ValueError, match="cache_align=0"):
    Generator(model, max_len=128, chunk_size=64, bucket=16, cache_align=0)


def test_first_layers_dense_and_densities():
  model = _model(TINY.with_attention(AttentionConfig(kind="xattention", dense_layers=1, xattention=XATTN.xattention)))
  _, _, densities = Generator(model, max_len=256, chunk_size=256, bucket=16).prefill(_prompts(6, [200]))
  densities = np.asarray(densities)
  assert densities[0] == -1 and np.all((densities[1:] > 0) & (densities[1:] <= 1))


def test_threshold_one_model_equals_dense():
  dense = _model()
  sparse = _model(
    TINY.with_attention(
      AttentionConfig(kind="xattention", xattention=xa.XAttentionConfig(threshold=1.0, block_size=16, stride=4))
    )
  )
  tokens = np.asarray(_prompts(7, [70, 70]))
  lengths = jnp.array([70, 52], jnp.int32)
  np.testing.assert_allclose(
    np.asarray(_forward(sparse, tokens, lengths))[1, :52],
    np.asarray(_forward(dense, tokens, lengths))[1, :52],
    atol=1e-5,
    rtol=1e-5,
  )


def test_per_layer_thresholds_validation():
  config = AttentionConfig(kind="xattention", layer_thresholds=(0.9, (0.5, 0.6, 0.7, 0.8), 1.0))
  assert config.for_layer(1).threshold == (0.5, 0.6, 0.7, 0.8)
  with pytest.raises(ValueError, match="layer_thresholds has 3 entries"):
    config.for_layer(3)
  with pytest.raises(ValueError, match="kind='sparse'"):
    AttentionConfig(kind="sparse")


def test_dense_implementation_choice():
  with pytest.raises(ValueError, match="dense_implementation='flash'"):
    AttentionConfig(dense_implementation="flash")
  assert AttentionConfig(dense_implementation=["pallas_tpu", "xla"]).dense_implementation == ("pallas_tpu", "xla")
  tokens = np.asarray(_prompts(8, [40]))
  explicit = _model(TINY.with_attention(AttentionConfig(dense_implementation="xla")))  # the block route
  np.testing.assert_allclose(
    np.asarray(_forward(explicit, tokens)), np.asarray(_forward(_model(), tokens)), atol=2e-5, rtol=2e-5
  )


def test_presets_accept_overrides():
  config = llama3_1_8b(num_layers=4, max_seq_len=262144)
  assert (config.num_layers, config.max_seq_len, config.d_model) == (4, 262144, 4096)
  assert smollm2_135m(num_layers=2).tie_embeddings
  with pytest.raises(TypeError, match="num_layer"):
    llama3_1_8b(num_layer=4)


def test_mlp_chunks_change_nothing():
  tokens = np.asarray(_prompts(9, [50, 50]))
  whole = _forward(_model(dataclasses.replace(TINY, mlp_chunk_tokens=None)), tokens)
  for chunk in (16, 33):  # 100 tokens: whole chunks, and whole chunks plus a tail
    np.testing.assert_allclose(
      np.asarray(_forward(_model(dataclasses.replace(TINY, mlp_chunk_tokens=chunk)), tokens)),
      np.asarray(whole),
      atol=2e-6,
      rtol=2e-6,
    )
  with pytest.raises(ValueError, match="mlp_chunk_tokens=0"):
    dataclasses.replace(TINY, mlp_chunk_tokens=0)


def test_mlp_chunk_loop_gradient_and_buffers():
  """The chunk loop writes over its input (no zero-filled [T, D] buffer, see hlo_checks) and differentiates like
  the unchunked MLP."""
  x = jax.random.normal(jax.random.key(0), (1, 100, TINY.d_model))
  loss = lambda mlp, x: jnp.sum(jnp.sin(mlp(x)))
  grads = {}
  for chunk in (None, 16):
    mlp = MLP(
      TINY.d_model, TINY.mlp_dim, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3), chunk_tokens=chunk
    )
    grads[chunk] = jax.grad(loss, argnums=(0, 1))(mlp, x)
    if chunk:
      text = jax.jit(lambda x: mlp(x)).lower(x).as_text(dialect="hlo")
      assert " while(" in text and zero_filled_loop_buffers(text, 16 * TINY.d_model) == []
  for got, want in zip(jax.tree_util.tree_leaves(grads[16]), jax.tree_util.tree_leaves(grads[None])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_cache_writes_are_slices_for_prompts_and_one_scatter_for_decode_steps():
  """A prompt or later chunk on one device writes each sequence's rows with a dynamic_update_slice (a scatter of
  B * T rows ran ~7x slower than the copy on the GPU), equal to the scatter at ragged offsets; a decode step keeps
  one scatter (B rows in one kernel)."""
  from xattn_jax.models.modules import _write

  kc, kn = jax.random.split(jax.random.key(4))
  cache = jax.random.normal(kc, (3, 40, 2, 8), jnp.float32)
  new = jax.random.normal(kn, (3, 7, 2, 8), jnp.bfloat16)
  offsets = jnp.array([0, 33, 12], jnp.int32)
  sliced = run_checked(lambda c, n, o: _write(c, n, o, scatter=False), cache, new, offsets)
  np.testing.assert_array_equal(np.asarray(sliced), np.asarray(_write(cache, new, offsets, scatter=True)))
  for b, o in enumerate((0, 33, 12)):
    np.testing.assert_array_equal(np.asarray(sliced[b, o : o + 7]), np.asarray(new[b].astype(jnp.float32)))
    np.testing.assert_array_equal(
      np.delete(np.asarray(sliced[b]), np.s_[o : o + 7], 0), np.delete(np.asarray(cache[b]), np.s_[o : o + 7], 0)
    )

  model = _model()
  graphdef, state = nnx.split(model)
  program = lambda name: jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), name)(*args))
  tokens, lengths = _padded(_prompts(5, [20, 13]), 32)
  cache = model.init_cache(2, 64)
  prefill = program("prefill").lower(state, tokens, lengths, cache).as_text(dialect="hlo")
  assert " scatter(" not in prefill and prefill.count(" dynamic-update-slice(") >= 2 * TINY.num_layers
  decode = program("decode").lower(state, jnp.array([5, 9], jnp.int32), cache).as_text(dialect="hlo")
  assert decode.count(" scatter(") == 2 * TINY.num_layers


def test_sampling():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  assert set(np.asarray(sample(logits, keys, temperature=0.0, top_p=1.0)).tolist()) == {0}
  top = np.asarray(sample(logits, keys, temperature=1.0, top_p=0.7))  # keeps tokens 0 and 1 only
  assert set(top.tolist()) == {0, 1} and 0.55 < np.mean(top == 0) < 0.70
  full = np.asarray(sample(logits, keys, temperature=1.0, top_p=1.0))
  assert set(full.tolist()) == {0, 1, 2, 3}


def test_generator_rejects_bad_input_before_device_work():
  model = _model()
  with pytest.raises(ValueError, match="chunk_size=100 must be a multiple of bucket=128 and divide max_len=512"):
    Generator(model, max_len=512, chunk_size=100)
  with pytest.raises(ValueError, match="chunk_size=256 must be a multiple of bucket=128 and divide max_len=640"):
    Generator(model, max_len=640, chunk_size=256)
  with pytest.raises(ValueError, match="max_len=0 must be a positive int"):
    Generator(model, max_len=0, chunk_size=128)
  gen = Generator(model, max_len=256, chunk_size=128, bucket=16)
  bad = [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty sequence"),
    (dict(prompts=[[1, 2, 97]]), r"prompts\[0\] has token id 97 outside \[0, 97\)"),
    (dict(prompts=[[1, -3]]), r"prompts\[0\] has token id -3"),
    (dict(prompts=[[1] * 300]), r"prompts\[0\] has 300 tokens; it does not fit max_len=256"),
    (dict(prompts=[[1] * 250], max_new_tokens=10), r"longest prompt \(250 tokens\) \+ max_new_tokens=10 exceeds"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens=0 must be an int >= 1"),
    (dict(prompts=[[1]], max_new_tokens=-2), "max_new_tokens=-2 must be an int >= 1"),
    (dict(prompts=[[1]], temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(prompts=[[1]], top_p=0.0), r"top_p=0.0 must lie in \(0, 1\]"),
  ]
  for kwargs, message in bad:
    with pytest.raises(ValueError, match=message):
      gen.generate(**kwargs)
  assert gen.compile_log == []  # nothing was compiled, so nothing ran


def test_no_recompilation_within_buckets():
  gen = Generator(_model(), max_len=512, chunk_size=128, bucket=64)
  for n, new in ((10, 5), (40, 17), (64, 64)):  # one prefill bucket (64), one decode bucket (64 tokens)
    result = gen.generate(_prompts(n, [n]), max_new_tokens=new)
    assert len(result.tokens[0]) == new
  gen.generate(_prompts(1, [300]), max_new_tokens=65)  # chunked (extend), the next decode bucket
  assert [(r.name, r.tokens_shape) for r in gen.compile_log] == [
    ("prefill", (1, 64)),
    ("decode", (1, 64)),
    ("extend", (1, 128)),
    ("decode", (1, 128)),
  ]
  assert all(r.seconds > 0 and r.temp_bytes >= 0 for r in gen.compile_log)
