"""Inference: bucketed jit-compiled prefill, chunked prefill for long prompts, a jit-compiled decode loop.

    gen = Generator(model, max_len=8192, chunk_size=2048)
    result = gen.generate([prompt_ids], max_new_tokens=64, stop_tokens=(eos,))

- Prompts are right padded to a bucket (a multiple of `bucket`, 128 by default): one compilation per bucket, and
  padding is never attended (seq lengths) nor selected as blocks.
- A prompt longer than `chunk_size` is prefilled chunk by chunk; each chunk attends to the cache and itself
  (XAttention with T < S, SPEC §5). Every chunk has the same shape: one compilation for all of them.
- Decoding runs in one `lax.while_loop` (dense attention, cache donated): greedy at temperature 0, otherwise
  temperature + top-p sampling; it stops when every sequence has produced a stop token or max_new_tokens.
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

from models.sharding import cache_spec, check_divisible, shard_state
from models.transformer import Transformer


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


class Generator:
  def __init__(self, model: Transformer, *, max_len: int, chunk_size: int = 4096, bucket: int = 128, mesh=None):
    """mesh: optional `jax.sharding.Mesh` with "data" and "tensor" axes (models.sharding.make_mesh): parameters
    and the KV cache are sharded by models.sharding's rules and XAttention runs per device."""
    if chunk_size % bucket or max_len % chunk_size:
      raise ValueError(f"{chunk_size=} must be a multiple of {bucket=} and divide {max_len=} (chunks never run "
                       "past the cache)")
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.mesh = mesh
    if mesh is not None:
      check_divisible(model.config, mesh)
      self.state = shard_state(self.state, mesh)
    self.max_len, self.chunk_size, self.bucket = max_len, chunk_size, bucket
    self._prefill = jax.jit(self._prefill_fn, donate_argnames=("cache",))
    self._extend = jax.jit(self._extend_fn, donate_argnames=("cache",))
    self._decode = jax.jit(self._decode_fn, donate_argnames=("cache",),
                           static_argnames=("max_new_tokens", "temperature", "top_p"))
    self._compiled_decode = {}
    self._init_cache = jax.jit(self._init_cache_fn, static_argnums=1)

  def set_thresholds(self, thresholds=None) -> None:
    """`Transformer.set_thresholds` on the generator's model: later prompts use them, without recompiling."""
    model = self._model(self.state)
    model.set_thresholds(thresholds)
    _, self.state = nnx.split(model)

  def _init_cache_fn(self, state, batch):
    cache = nnx.merge(self.graphdef, state).init_cache(batch, self.max_len)
    if self.mesh is None:
      return cache
    check_divisible(self._model(state).config, self.mesh, batch=batch)
    spec = NamedSharding(self.mesh, cache_spec())
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, spec) if x.ndim == 4 else x, cache)

  def _context(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _prefill_fn(self, state, tokens, lengths, cache):
    return self._model(state).prefill(tokens, lengths, cache)

  def _extend_fn(self, state, tokens, lengths, cache):
    return self._model(state).extend(tokens, lengths, cache)

  def _decode_fn(self, state, cache, logits, stop, key, *, max_new_tokens, temperature, top_p):
    model = self._model(state)
    B = logits.shape[0]
    out = jnp.zeros((B, max_new_tokens), jnp.int32)
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

  def prefill(self, prompts: Sequence[Sequence[int]]):
    """Returns (last-token logits [B, V], cache, per-layer densities [L])."""
    with self._context():
      return self._prefill_prompts(prompts)

  def _prefill_prompts(self, prompts):
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
      raise ValueError("every prompt needs at least one token")
    if lengths.max() > self.max_len:
      raise ValueError(f"a prompt of {lengths.max()} tokens does not fit max_len={self.max_len}")
    cache = self._init_cache(self.state, len(prompts))
    if lengths.max() <= self.chunk_size:
      T = -(-int(lengths.max()) // self.bucket) * self.bucket
      tokens = np.zeros((len(prompts), T), np.int32)
      for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
      return self._prefill(self.state, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    C = self.chunk_size
    n_chunks = -(-int(lengths.max()) // C)
    tokens = np.zeros((len(prompts), n_chunks * C), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    last_logits, densities = None, []
    for c in range(n_chunks):
      chunk_lengths = np.clip(lengths - c * C, 0, C).astype(np.int32)
      logits, cache, dens = self._extend(self.state, jnp.asarray(tokens[:, c * C:(c + 1) * C]),
                                         jnp.asarray(chunk_lengths), cache)
      ends_here = jnp.asarray((chunk_lengths > 0) & (lengths <= (c + 1) * C))[:, None]
      last_logits = logits if last_logits is None else jnp.where(ends_here, logits, last_logits)
      densities.append(dens)
    return last_logits, cache, jnp.mean(jnp.stack(densities), axis=0)

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0) -> GenerationResult:
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > self.max_len:
      raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_len={self.max_len}")
    with self._context():
      return self._generate(prompts, max_new_tokens, temperature, top_p, stop_tokens, seed)

  def _generate(self, prompts, max_new_tokens, temperature, top_p, stop_tokens, seed):
    start = time.perf_counter()
    logits, cache, densities = self._prefill_prompts(prompts)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    stop = jnp.asarray(list(stop_tokens) or [-2], jnp.int32)
    args = (self.state, cache, logits, stop, jax.random.key(seed))
    static = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p))
    signature = (jax.tree_util.tree_structure(args), tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(args)),
                 tuple(sorted(static.items())))
    if signature not in self._compiled_decode:  # compile outside the timed region
      self._compiled_decode[signature] = self._decode.lower(*args, **static).compile()
    start = time.perf_counter()
    out, steps, _ = self._compiled_decode[signature](*args)
    out = np.asarray(out)
    decode_s = time.perf_counter() - start
    tokens = []
    for row in out:
      ids = [int(t) for t in row if t >= 0]
      cut = next((i for i, t in enumerate(ids) if t in set(stop_tokens)), len(ids))
      tokens.append(ids[:cut])
    return GenerationResult(tokens, prefill_s, decode_s, int(steps), np.asarray(densities))
