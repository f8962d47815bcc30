"""Whole models. Each exposes `loss(batch, deterministic=..., rngs=...)` returning the
summed-loss dict of `memlm_jax.losses.cross_entropy.weighted_cross_entropy` (the
trainer's only contract with a model)."""
