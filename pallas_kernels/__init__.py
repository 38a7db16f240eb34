"""Pallas kernels of xattn-jax (Mosaic TPU and Mosaic GPU lowerings).

The kernels are reached through the public ops with `implementation="pallas_tpu"` or `"pallas_mosaic_gpu"`; they
compute exactly what the XLA reference (`xattn_jax.scoring_xla`, `xattn_jax.attention_xla`) computes.
"""
