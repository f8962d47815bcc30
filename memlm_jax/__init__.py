"""memlm_jax: memory-augmented sequence models in JAX, run the t5x way."""

__version__ = "0.1.0"
