"""Inference: bucketed jit-compiled prefill, chunked prefill for long prompts, a jit-compiled decode loop.

    gen = Generator(model, max_len=8192, chunk_size=2048)
    result = gen.generate([prompt_ids], max_new_tokens=64, stop_tokens=(eos,))

- Prompts are right padded to a bucket (a multiple of `bucket`, 128 by default): one compilation per bucket, and
  padding is never attended (seq lengths) nor selected as blocks.
- A prompt longer than `chunk_size` is prefilled chunk by chunk; each chunk attends to the cache and itself
  (XAttention with T < S, SPEC §5). Every chunk has the same shape: one compilation for all of them.
- Decoding runs in one `lax.while_loop` (dense attention, cache donated): greedy at temperature 0, otherwise
  temperature + top-p sampling; it stops when every sequence has produced a stop token or max_new_tokens.
  max_new_tokens is a traced bound (its output buffer is bucketed to a multiple of 64): no recompilation per length.
- Every program is compiled ahead of time once per shape (`Generator.compile_log` records its compile seconds and
  XLA memory), and every argument is checked before any device work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import NamedSharding

from xattn_jax.models.sharding import cache_spec, check_divisible, shard_state
from xattn_jax.models.transformer import KVCache, Transformer


_DECODE_BUCKET = 64  # decode output buffers are multiples of this many tokens


@dataclasses.dataclass(frozen=True)
class CompileRecord:
  """One ahead-of-time compilation of a Generator program (`compiled.memory_analysis()` in bytes)."""

  name: str  # "prefill", "extend" or "decode"
  tokens_shape: tuple[int, ...]  # the program's token argument: [B, T] for prefill/extend, [B, buffer] for decode
  seconds: float
  temp_bytes: int  # XLA temporaries: what the program allocates beyond its arguments and outputs
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written in place of donated arguments (the KV cache)


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # generated ids per prompt, stop token excluded
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  densities: np.ndarray  # [L] selected block density per layer during prefill (-1: dense layer)

  @property
  def decode_tokens_per_second(self) -> float:
    return self.decode_steps * len(self.tokens) / max(self.decode_seconds, 1e-9)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
  """logits [B, V] -> token ids [B]. temperature 0 is greedy; top_p keeps the smallest set holding top_p mass."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the top token always stays
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The KV cache's length is a multiple of this many tokens on a GPU. A decode step's attention contracts the cache's
# length in a dot (probabilities x values); XLA's GPU autotuner picks a split-K configuration for that skinny dot and,
# where the split does not divide the length, pads it: a copy of every layer's value cache each step, which its
# timing of the dot alone does not see. H100, one layer's decode attention (benchmarks/probe_decode_attention.py):
# 0.124 ms at 32,896 cached tokens (128 x 257) against 0.073-0.080 ms at 32,768, 33,024 (256 x 129) and 33,792
# (1024 x 33); 0.419 ms at 131,200 against 0.229-0.233 ms at 131,072, 131,584, 132,096 (1024 x 129). The model's
# decode at B = 1 with a cache of 36,864 / 135,168 tokens: 10.22 -> 8.82 ms per step at 32K, 19.54 -> 13.58 ms at
# 128K (notes_model_prefill.md, v6).
CACHE_ALIGN = 1024


class Generator:
  def __init__(
    self,
    model: Transformer,
    *,
    max_len: int,
    chunk_size: int = 4096,
    bucket: int = 128,
    mesh=None,
    cache_align: int | None = None,
  ):
    """max_len: the most tokens a sequence holds (prompt and new tokens). The KV cache holds max_len rounded up to
    a multiple of cache_align tokens: by default CACHE_ALIGN on a GPU, `bucket` elsewhere.

    mesh: optional `jax.sharding.Mesh` with "data", "seq" and "tensor" axes (xattn_jax.models.sharding.make_mesh;
    absent axes count as size 1): parameters, activations and the KV cache are sharded by xattn_jax.models.sharding's
    rules and attention runs per device (sequence-parallel over "seq").

    Raises:
      ValueError: a size that is not a positive int, or chunk_size not a multiple of bucket dividing max_len.
    """
    if cache_align is None:
      cache_align = CACHE_ALIGN if jax.default_backend() == "gpu" else bucket
    for name, value in (
      ("max_len", max_len),
      ("chunk_size", chunk_size),
      ("bucket", bucket),
      ("cache_align", cache_align),
    ):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if chunk_size % bucket or max_len % chunk_size:
      raise ValueError(
        f"chunk_size={chunk_size} must be a multiple of bucket={bucket} and divide max_len={max_len} "
        "(chunks never run past the cache)"
      )
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.mesh = mesh
    if mesh is not None:
      check_divisible(model.config, mesh, max_len=max_len)
      self.state = shard_state(self.state, mesh)
    self.max_len, self.chunk_size, self.bucket = int(max_len), int(chunk_size), int(bucket)
    self.cache_len = -(-self.max_len // cache_align) * cache_align
    if mesh is not None:
      check_divisible(model.config, mesh, max_len=self.cache_len)
    self._jitted = {
      "prefill": jax.jit(self._prefill_fn, donate_argnames=("cache",)),
      "extend": jax.jit(self._extend_fn, donate_argnames=("cache",)),
      "decode": jax.jit(self._decode_fn, donate_argnames=("cache",), static_argnames=("temperature", "top_p")),
    }
    self._compiled = {}
    self.compile_log: list[CompileRecord] = []
    self._init_cache = jax.jit(self._init_cache_fn, static_argnums=1)

  def set_thresholds(self, thresholds=None) -> None:
    """`Transformer.set_thresholds` on the generator's model: later prompts use them, without recompiling."""
    model = self._model(self.state)
    model.set_thresholds(thresholds)
    _, self.state = nnx.split(model)

  def compiled_count(self, name: str) -> int:
    """How many shapes the program `name` ("prefill", "extend", "decode") has been compiled for."""
    return sum(record.name == name for record in self.compile_log)

  def _executable(self, name: str, tokens, *args, **static):
    """The program `name` compiled ahead of time for these arguments' shapes (once, logged) and its arguments."""
    dynamic = (self.state, tokens) + args
    signature = (
      name,
      jax.tree_util.tree_structure(dynamic),
      tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(dynamic)),
      tuple(sorted(static.items())),
    )
    if signature not in self._compiled:
      start = time.perf_counter()
      compiled = self._jitted[name].lower(*dynamic, **static).compile()
      seconds = time.perf_counter() - start
      memory = compiled.memory_analysis()
      self.compile_log.append(
        CompileRecord(
          name,
          tuple(jnp.shape(tokens)),
          seconds,
          int(getattr(memory, "temp_size_in_bytes", -1)),
          int(getattr(memory, "argument_size_in_bytes", -1)),
          int(getattr(memory, "output_size_in_bytes", -1)),
          int(getattr(memory, "alias_size_in_bytes", -1)),
        )
      )
      self._compiled[signature] = compiled
    return self._compiled[signature], dynamic

  def _run(self, name: str, tokens, *args, **static):
    compiled, dynamic = self._executable(name, tokens, *args, **static)
    return compiled(*dynamic)

  def _init_cache_fn(self, state, batch):
    cache = nnx.merge(self.graphdef, state).init_cache(batch, self.cache_len)
    if self.mesh is None:
      return cache
    check_divisible(self._model(state).config, self.mesh, batch=batch)
    spec = NamedSharding(self.mesh, cache_spec(self.mesh))
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, spec) if x.ndim == 4 else x, cache)

  def init_cache(self, batch: int) -> KVCache:
    """An empty KV cache of `cache_len` (max_len, aligned) tokens for `batch` sequences, placed as the generator's
    programs expect."""
    with self._context():
      return self._init_cache(self.state, batch)

  def _context(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _prefill_fn(self, state, tokens, lengths, cache):
    return self._model(state).prefill(tokens, lengths, cache)

  def _extend_fn(self, state, tokens, lengths, cache):
    return self._model(state).extend(tokens, lengths, cache)

  def _decode_fn(self, state, out, max_new_tokens, cache, logits, stop, key, *, temperature, top_p):
    """out: int32 [B, buffer] (its shape is the bucket; contents ignored); max_new_tokens: int32 scalar."""
    model = self._model(state)
    B = logits.shape[0]
    out = jnp.full(out.shape, -1, jnp.int32)
    done = jnp.zeros((B,), bool)

    def cond(carry):
      step, _, _, _, done, _ = carry
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      step, cache, logits, out, done, key = carry
      key, sub = jax.random.split(key)
      token = sample(logits, sub, temperature=temperature, top_p=top_p)
      out = out.at[:, step].set(jnp.where(done, -1, token))
      done = done | jnp.isin(token, stop)
      logits, cache = model.decode(token, cache)
      return step + 1, cache, logits, out, done, key

    steps, cache, _, out, _, _ = jax.lax.while_loop(cond, body, (0, cache, logits, out, done, key))
    return out, steps, cache

  def _check_prompts(self, prompts) -> np.ndarray:
    """The prompts' lengths, after checking them all (before any device work)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)) or len(prompts) == 0:
      raise ValueError(
        f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__} "
        f"{'of length 0' if isinstance(prompts, (Sequence, np.ndarray)) else ''}".rstrip()
      )
    vocab = self.config.vocab_size
    lengths = []
    for i, p in enumerate(prompts):
      ids = np.asarray(p)
      if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompts[{i}] must be a non-empty sequence of token ids, got shape {ids.shape}")
      if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompts[{i}] must hold integer token ids, got dtype {ids.dtype}")
      if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(
          f"prompts[{i}] has token id {int(ids.min() if ids.min() < 0 else ids.max())} outside "
          f"[0, {vocab}) (the model's vocab_size)"
        )
      if ids.size > self.max_len:
        raise ValueError(f"prompts[{i}] has {ids.size} tokens; it does not fit max_len={self.max_len}")
      lengths.append(ids.size)
    return np.asarray(lengths, np.int32)

  def prefill(self, prompts: Sequence[Sequence[int]]):
    """Returns (last-token logits [B, V], cache, per-layer densities [L]).

    Raises:
      ValueError: no prompt, an empty prompt, a token id outside the vocabulary, or a prompt longer than max_len.
    """
    lengths = self._check_prompts(prompts)
    with self._context():
      return self._prefill_prompts(prompts, lengths)

  def _prefill_prompts(self, prompts, lengths):
    cache = self._init_cache(self.state, len(prompts))
    if lengths.max() <= self.chunk_size:
      T = -(-int(lengths.max()) // self.bucket) * self.bucket
      tokens = np.zeros((len(prompts), T), np.int32)
      for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
      return self._run("prefill", jnp.asarray(tokens), jnp.asarray(lengths), cache)
    C = self.chunk_size
    n_chunks = -(-int(lengths.max()) // C)
    tokens = np.zeros((len(prompts), n_chunks * C), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    last_logits, densities = None, []
    for c in range(n_chunks):
      chunk_lengths = np.clip(lengths - c * C, 0, C).astype(np.int32)
      logits, cache, dens = self._run(
        "extend", jnp.asarray(tokens[:, c * C : (c + 1) * C]), jnp.asarray(chunk_lengths), cache
      )
      ends_here = jnp.asarray((chunk_lengths > 0) & (lengths <= (c + 1) * C))[:, None]
      last_logits = logits if last_logits is None else jnp.where(ends_here, logits, last_logits)
      densities.append(dens)
    return last_logits, cache, jnp.mean(jnp.stack(densities), axis=0)

  def decode(
    self,
    logits: jax.Array,
    cache: KVCache,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
  ):
    """Decodes from a prefilled cache (donated) and its last logits [B, V].

    Returns (tokens int32 [B, buffer] with -1 past each sequence's end, steps run, the cache). One compilation per
    batch size and bucket of 64 new tokens, not per max_new_tokens.
    """
    with self._context():
      compiled, args = self._decode_executable(logits, cache, max_new_tokens, temperature, top_p, stop_tokens, seed)
      return compiled(*args)

  def _decode_executable(self, logits, cache, max_new_tokens, temperature, top_p, stop_tokens, seed):
    _check_sampling(max_new_tokens, temperature, top_p)
    buffer = -(-max_new_tokens // _DECODE_BUCKET) * _DECODE_BUCKET
    stop = jnp.asarray(list(stop_tokens) or [-2], jnp.int32)
    return self._executable(
      "decode",
      jnp.zeros((logits.shape[0], buffer), jnp.int32),
      jnp.int32(max_new_tokens),
      cache,
      logits,
      stop,
      jax.random.key(seed),
      temperature=float(temperature),
      top_p=float(top_p),
    )

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
  ) -> GenerationResult:
    """Prefill, then decode up to max_new_tokens per prompt.

    Raises:
      ValueError: bad prompts (see `prefill`), max_new_tokens < 1, temperature < 0, top_p outside (0, 1], or a
        prompt that leaves no room for max_new_tokens within max_len; all before any device work.
    """
    lengths = self._check_prompts(prompts)
    _check_sampling(max_new_tokens, temperature, top_p)
    if lengths.max() + max_new_tokens > self.max_len:
      raise ValueError(
        f"the longest prompt ({lengths.max()} tokens) + max_new_tokens={max_new_tokens} exceeds max_len={self.max_len}"
      )
    with self._context():
      start = time.perf_counter()
      logits, cache, densities = self._prefill_prompts(prompts, lengths)
      jax.block_until_ready(logits)
      prefill_s = time.perf_counter() - start
      compiled, args = self._decode_executable(logits, cache, max_new_tokens, temperature, top_p, stop_tokens, seed)
      start = time.perf_counter()  # compiled above, outside the timed region
      out, steps, _ = compiled(*args)
      out = np.asarray(out)
      decode_s = time.perf_counter() - start
    tokens = []
    for row in out:
      ids = [int(t) for t in row[:max_new_tokens] if t >= 0]
      cut = next((i for i, t in enumerate(ids) if t in set(stop_tokens)), len(ids))
      tokens.append(ids[:cut])
    return GenerationResult(tokens, prefill_s, decode_s, int(steps), np.asarray(densities))


def _check_sampling(max_new_tokens, temperature, top_p) -> None:
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
  if not (0 < top_p <= 1):
    raise ValueError(f"top_p={top_p!r} must lie in (0, 1]")
