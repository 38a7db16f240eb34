"""Evaluation beside the model, imported as `xattn_jax.evaluation`: RULER-style haystacks and their scoring
(`haystack`), and threshold calibration, block-mass fidelity and task accuracy of a model (`calibration`)."""
