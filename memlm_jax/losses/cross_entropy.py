"""Token-level cross entropy, summed (not averaged) so callers can normalise over
microbatches and hosts exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                           per_row: bool = False) -> dict[str, jax.Array]:
  """Sums of per-token loss, weight and correct predictions.

  Args:
    logits: [batch, time, vocab] (any float dtype; computed in float32).
    targets: [batch, time] int token ids.
    weights: [batch, time] loss weights (0 for padding).
    per_row: sum over time only (each row's sums, [batch]) instead of over everything.
  Returns:
    dict with float32 `loss_sum`, `weight_sum`, `correct_sum`: scalars, or [batch] with per_row.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_loss = log_z - target_logit
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  axis = -1 if per_row else None
  return {
      "loss_sum": jnp.sum(token_loss * weights, axis=axis),
      "weight_sum": jnp.sum(weights, axis=axis),
      "correct_sum": jnp.sum(correct * weights, axis=axis),
  }
