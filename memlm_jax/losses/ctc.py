"""CTC loss for an auxiliary head on the transducer's encoder (optax's forward algorithm), with the
rows that have no CTC alignment at all (too few frames for their labels) left out instead of
contributing optax's huge log(0) stand-in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def frames_needed(labels: jax.Array, label_paddings: jax.Array) -> jax.Array:
  """The fewest frames a CTC alignment of each row's labels needs: one per label, plus a blank between
  each pair of equal neighbours. labels, label_paddings [batch, labels] -> [batch] int32."""
  valid = label_paddings <= 0
  repeats = valid[:, 1:] & valid[:, :-1] & (labels[:, 1:] == labels[:, :-1])
  return jnp.sum(valid, axis=1, dtype=jnp.int32) + jnp.sum(repeats, axis=1, dtype=jnp.int32)


def ctc_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array, label_paddings: jax.Array, *,
             blank_id: int = 0) -> jax.Array:
  """-log p_CTC(labels | frames) per row; 0 on a row whose valid frames are fewer than `frames_needed`
  (it has no alignment).

  Args:
    logits: [batch, frames, vocab] (blank at `blank_id`), any float dtype (computed in float32).
    logit_paddings: [batch, frames], 1.0 on padded frames.
    labels: [batch, labels] int; label_paddings: [batch, labels], 1.0 on padded labels (right-padded).
  Returns:
    nll [batch] float32.
  """
  feasible = jnp.sum(logit_paddings <= 0, axis=1) >= frames_needed(labels, label_paddings)
  nll = optax.ctc_loss(logits.astype(jnp.float32), logit_paddings.astype(jnp.float32), labels.astype(jnp.int32),
                       label_paddings.astype(jnp.float32), blank_id=blank_id)
  return jnp.where(feasible, nll, 0.0)
