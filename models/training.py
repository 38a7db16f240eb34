"""Training: a jitted train step with donated state, gradient accumulation, AdamW with warmup + cosine, clipping.

    config = TrainConfig(learning_rate=3e-4, warmup_steps=100, total_steps=2000, grad_accum=4)
    trainer = Trainer(model, config)          # model: a Transformer; its AttentionConfig picks dense or XAttention
    state = trainer.init()
    state, metrics = trainer.step(state, tokens, loss_mask)   # tokens int32 [A * b, T]: A micro-batches of b
    state = trainer.set_thresholds(state, 0.95)               # XAttention's tau: state, changes recompile nothing

Parameters may be bfloat16 (the model's param_dtype); the optimizer keeps float32 master weights and float32 moments,
so small updates are not lost to bf16 rounding. The attention's backward is the custom_vjp of `xattn_jax` (the block
selection is constant per step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from xattn_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 1000
  end_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  grad_accum: int = 1  # micro-batches per step

  def __post_init__(self):
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps})")
    if self.grad_accum < 1:
      raise ValueError(f"grad_accum={self.grad_accum} must be >= 1")
    if self.learning_rate <= 0 or self.clip_norm <= 0:
      raise ValueError(f"learning_rate={self.learning_rate} and clip_norm={self.clip_norm} must be positive")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 []
  params: nnx.State  # the model's parameters in their own dtype (what the forward reads)
  master: nnx.State  # float32 copies (what the optimizer updates)
  opt_state: optax.OptState
  other: nnx.State  # the rest of the model's state (XAttention thresholds): read by the forward, never trained


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=config.total_steps,
    end_value=config.learning_rate * config.end_learning_rate_fraction,
  )
  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(
      schedule,
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim > 1, params),
    ),  # no decay on norms
  )


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of predicting tokens[:, t+1] at t where loss_mask[:, t+1]; returns (loss, token count)."""
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  # One-hot rather than take_along_axis: the gather's transpose (a batched scatter) trips checkify's index check in
  # jax 0.11/0.12 (IndexError in scatter_error_check), and the step must run under checkify.
  log_p = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.sum(log_p * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count


class Trainer:
  def __init__(self, model: Transformer, config: TrainConfig):
    self.config = config
    # Only parameters train; the rest of the state (XAttention thresholds) rides along unchanged.
    self.graphdef, self._params, self._fixed = nnx.split(model, nnx.Param, ...)
    self.tx = optimizer(config)
    self.step = jax.jit(self._step, donate_argnames=("state",))

  def init(self) -> TrainState:
    # Own copies: the step donates the state, and the model the trainer was built from must stay usable.
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), self._params)
    master = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), self._params)
    other = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), self._fixed)
    return TrainState(jnp.int32(0), params, master, self.tx.init(master), other)

  def model(self, state: TrainState) -> Transformer:
    return nnx.merge(self.graphdef, state.params, state.other)

  def set_thresholds(self, state: TrainState, thresholds=None) -> TrainState:
    """The state with new XAttention thresholds (`Transformer.set_thresholds` semantics), e.g. a schedule that
    trains densely first (tau >= 1) and lowers tau later; the step does not recompile."""
    model = self.model(state)
    model.set_thresholds(thresholds)
    _, _, other = nnx.split(model, nnx.Param, ...)
    return dataclasses.replace(state, other=other)

  def loss(self, params, other, tokens, loss_mask):
    logits = nnx.merge(self.graphdef, params, other)(tokens)
    return next_token_loss(logits, tokens, loss_mask)

  def _step(self, state: TrainState, tokens: jax.Array, loss_mask: jax.Array):
    """tokens int32 [A * b, T], loss_mask bool [A * b, T]; A = config.grad_accum micro-batches."""
    A = self.config.grad_accum
    if tokens.shape[0] % A:
      raise ValueError(f"the batch of {tokens.shape[0]} sequences must be divisible by grad_accum={A}")
    micro = lambda x: x.reshape((A, x.shape[0] // A) + x.shape[1:])
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)

    def accumulate(carry, batch):
      grads, loss_sum, count_sum = carry
      (loss, count), g = grad_fn(state.params, state.other, *batch)
      g = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32) * count, grads, g)
      return (g, loss_sum + loss * count, count_sum + count), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.master)
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro(tokens), micro(loss_mask)))
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1.0), grads)  # token-weighted mean
    updates, opt_state = self.tx.update(grads, state.opt_state, state.master)
    master = optax.apply_updates(state.master, updates)
    params = jax.tree_util.tree_map(lambda m, p: m.astype(p.dtype), master, state.params)
    metrics = dict(loss=loss_sum / jnp.maximum(count, 1.0), grad_norm=optax.tree.norm(grads), tokens=count)
    return TrainState(state.step + 1, params, master, opt_state, state.other), metrics
