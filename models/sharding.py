"""Model parallelism on a `jax.sharding.Mesh` with data (batch), seq (sequence) and tensor (heads) axes.

Megatron-style rules: the q/k/v projections and the MLP's gate/up are split by output columns (whole heads per
device), o_proj and down by input rows; norms and embeddings are replicated. With a "seq" axis the activations of a
prompt are split along its tokens and attention runs sequence-parallel (`xattn_jax.context_parallel`: zig-zag query
chunks, K/V all-gathered). The KV cache is split by batch, positions ("seq") and kv heads: a decode step reduces
over the positions across devices (XLA inserts the all-reduce of the softmax statistics and the output, a few KB).
Attention runs under `shard_map` per device (`xattn_jax.sharding`); the rest is partitioned by XLA. Use
`AxisType.Auto` mesh axes (the default of `make_mesh` below).
"""

from __future__ import annotations

import re

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xattn_jax.models.config import ModelConfig

# (path pattern, spec with "tensor" standing for the tensor axis); the first match wins.
RULES = (
  (r"attn/(q|k|v)_proj/kernel$", P(None, "tensor")),
  (r"attn/(q|k|v)_proj/bias$", P("tensor")),
  (r"attn/o_proj/kernel$", P("tensor", None)),
  (r"mlp/(gate|up)/kernel$", P(None, "tensor")),
  (r"mlp/down/kernel$", P("tensor", None)),
  (r".*", P()),
)


def make_mesh(data: int, tensor: int, devices=None, *, seq: int = 1) -> jax.sharding.Mesh:
  """A (data, seq, tensor) mesh: batch over "data", one prompt's tokens over "seq" (sequence parallelism: the
  activations, the queries of attention and the KV cache are split along the sequence), heads over "tensor"."""
  return jax.make_mesh(
    (data, seq, tensor), ("data", "seq", "tensor"), devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3
  )


def check_divisible(
  config: ModelConfig,
  mesh,
  *,
  head_axis: str = "tensor",
  batch: int | None = None,
  batch_axis: str = "data",
  max_len: int | None = None,
  seq_axis: str = "seq",
) -> None:
  tp = mesh.shape[head_axis] if head_axis in mesh.axis_names else 1
  for name in ("num_kv_heads", "num_heads", "mlp_dim"):
    if getattr(config, name) % tp:
      raise ValueError(f"{name}={getattr(config, name)} must be divisible by the size {tp} of mesh axis {head_axis!r}")
  dp = mesh.shape[batch_axis] if batch_axis in mesh.axis_names else 1
  if batch is not None and batch % dp:
    raise ValueError(f"the batch size {batch} must be divisible by the size {dp} of mesh axis {batch_axis!r}")
  sp = mesh.shape[seq_axis] if seq_axis in mesh.axis_names else 1
  if max_len is not None and max_len % sp:
    raise ValueError(
      f"max_len={max_len} must be divisible by the size {sp} of mesh axis {seq_axis!r} (the KV cache "
      "is split along its positions)"
    )


def param_specs(state: nnx.State, *, head_axis: str = "tensor", rules=RULES):
  """A PartitionSpec per parameter (same pytree as `state`)."""

  def spec(path, _):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for pattern, s in rules:
      if re.search(pattern, name):
        return P(*(head_axis if a == "tensor" else a for a in s))
    raise AssertionError("the last rule matches everything")

  return jax.tree_util.tree_map_with_path(spec, state)


def shard_state(state: nnx.State, mesh, *, head_axis: str = "tensor") -> nnx.State:
  specs = param_specs(state, head_axis=head_axis)
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)


def cache_spec(mesh=None, *, batch_axis: str = "data", seq_axis: str = "seq", head_axis: str = "tensor") -> P:
  """[B, S_max, K, H] split by batch, positions (each device of "seq" holds S_max / P positions: decode reduces over
  them across devices) and kv heads; axes `mesh` lacks are left out."""
  has = lambda a: a if mesh is None or a in mesh.axis_names else None
  return P(has(batch_axis), has(seq_axis), has(head_axis), None)
