"""Pallas kernels of xattn-jax (Mosaic TPU and Mosaic GPU lowerings), imported as `xattn_jax.pallas_kernels`.

The kernels are reached through the public ops with `implementation="pallas_tpu"` or `"pallas_mosaic_gpu"` (or a
configured `mosaic_gpu.MosaicGpu(...)` / `tpu.Tpu(...)`); they compute exactly what the XLA reference
(`xattn_jax.scoring_xla`, `xattn_jax.attention_xla`) computes. Importing this package registers both backends with
`xattn_jax.backends`; their modules (and Pallas itself) load on first use.
"""

from xattn_jax import _subpackages

_subpackages.deprecated_alias(__name__)  # as the old top-level `pallas_kernels`: an alias of this package

from xattn_jax import backends  # noqa: E402


def _mosaic_gpu(tuning=None):
  from xattn_jax.pallas_kernels import mosaic_gpu

  return mosaic_gpu.backend(tuning)


def _tpu(tuning=None):
  from xattn_jax.pallas_kernels import tpu

  return tpu.backend(tuning)


backends.register("pallas_mosaic_gpu", _mosaic_gpu)
backends.register("pallas_tpu", _tpu)
