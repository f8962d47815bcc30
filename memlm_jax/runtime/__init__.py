"""Model-agnostic runtime: mesh and shardings, train state, trainer, checkpoints, summaries."""
