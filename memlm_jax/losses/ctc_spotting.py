"""CTC phrase spotting: how well each bias phrase fits somewhere in an utterance, read from a CTC head
(a Viterbi pass over the CTC lattice, beside the CTC loss; used by the ASR eval's spotting biasers and
by NAM's spotting prior).

A hybrid transducer-CTC model (models/transducer.py, `ctc_weight > 0`) has a CTC head on its encoder,
whose per-frame label posteriors follow the sound. Spotting scores every phrase of a bias list against
them, as NeMo's CTC word spotter does for context biasing (Andrusenko et al. 2024, "Fast context-biasing
for CTC and transducer ASR models with CTC-based word spotter"); the formulation here is our own:

  gain(phrase) = max over windows [s, e] of frames and CTC alignments a of the phrase to that window of
                 sum_{t in [s, e]} (log p_t(a_t) - max_k log p_t(k)),

the log-likelihood the phrase loses against the frame-by-frame best labels where it fits best (0: the
best labels spell it; more negative: a worse fit). Frames outside the window cost nothing, so phrases
are compared by fit, not by the rest of the utterance. One Viterbi pass over the frames scores every
phrase at once; `spotted_phrases` keeps the best-fitting ones (per label, above a threshold), which the
ASR eval boosts with KMP instead of the whole list (launch/biasing.py: KmpBiasing.spotter).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memlm_jax.losses.rnnt import BLANK_ID

_NEG_INF = -jnp.inf


def _state_labels(phrase_tokens: jax.Array) -> jax.Array:
  """[batch, phrases, 2 * phrase_len + 1] CTC states: blank, token 1, blank, token 2, ..., blank."""
  batch, phrases, length = phrase_tokens.shape
  labels = jnp.full((batch, phrases, 2 * length + 1), BLANK_ID, jnp.int32)
  return labels.at[..., 1::2].set(phrase_tokens.astype(jnp.int32))


class Spots(NamedTuple):
  """Where each phrase fits best. gain [batch, phrases] float32 (`phrase_gains`); start, end [batch,
  phrases] int32: the first and last frame of its best window (-1 where gain is -inf)."""
  gain: jax.Array
  start: jax.Array
  end: jax.Array


def phrase_gains(log_probs: jax.Array, frame_paddings: jax.Array, phrase_tokens: jax.Array,
                 phrase_paddings: jax.Array) -> jax.Array:
  """The spotting gain of every phrase (module docstring): [batch, phrases] float32, <= 0, -inf for an
  empty (fully padded) phrase or one longer than the utterance can align. Arguments as `phrase_spots`."""
  return phrase_spots(log_probs, frame_paddings, phrase_tokens, phrase_paddings).gain


def phrase_spots(log_probs: jax.Array, frame_paddings: jax.Array, phrase_tokens: jax.Array,
                 phrase_paddings: jax.Array) -> Spots:
  """The gain of every phrase and the window of frames that attains it (one Viterbi pass).

  Args:
    log_probs: [batch, frames, vocab] CTC log-posteriors (blank = BLANK_ID).
    frame_paddings: [batch, frames], 1.0 on padded frames (trailing).
    phrase_tokens: [batch, phrases, phrase_len] int label ids, a phrase's tokens first.
    phrase_paddings: [batch, phrases, phrase_len], 1.0 after each phrase's tokens.
  """
  if log_probs.ndim != 3 or frame_paddings.shape != log_probs.shape[:2]:
    raise ValueError(f"log_probs must be [batch, frames, vocab] with frame_paddings [batch, frames]; got "
                     f"{log_probs.shape} and {frame_paddings.shape}.")
  if phrase_tokens.ndim != 3 or phrase_paddings.shape != phrase_tokens.shape or \
      phrase_tokens.shape[0] != log_probs.shape[0]:
    raise ValueError(f"phrase_tokens and phrase_paddings must both be [batch={log_probs.shape[0]}, phrases, "
                     f"phrase_len]; got {phrase_tokens.shape} and {phrase_paddings.shape}.")
  batch, phrases, length = phrase_tokens.shape
  log_probs = log_probs.astype(jnp.float32)
  gains = log_probs - jnp.max(log_probs, axis=-1, keepdims=True)  # [batch, frames, vocab]
  labels = _state_labels(phrase_tokens)  # [batch, phrases, states]
  states = labels.shape[-1]
  lengths = jnp.sum(phrase_paddings <= 0, axis=-1).astype(jnp.int32)  # [batch, phrases]
  exit_state = 2 * lengths - 1  # the last token; -1 for an empty phrase (never reached)
  index = jnp.arange(states)
  # A token state may skip the blank before it unless it repeats the token two states back.
  can_skip = (index % 2 == 1) & (index >= 3) & (labels != jnp.roll(labels, 2, axis=-1))
  flat_labels = labels.reshape(batch, phrases * states)

  def shift(x, n, fill):
    return jnp.concatenate([jnp.full(x.shape[:-1] + (n,), fill, x.dtype), x[..., :-n]], axis=-1)

  def one_frame(carry, frame):
    # Each state's best score and the frame its path entered the window at; the best exit so far.
    score, entered, best, best_start, best_end = carry
    frame_gains, is_pad, t = frame  # [batch, vocab], [batch], []
    emit = jnp.take_along_axis(frame_gains, flat_labels, axis=1).reshape(batch, phrases, states)
    candidates = [(score, entered), (shift(score, 1, _NEG_INF), shift(entered, 1, -1)),
                  (jnp.where(can_skip, shift(score, 2, _NEG_INF), _NEG_INF), shift(entered, 2, -1)),
                  (jnp.where(index == 1, 0.0, _NEG_INF), jnp.full_like(entered, t))]  # enter the window here
    came_from, came_entered = candidates[0]
    for other, other_entered in candidates[1:]:
      better = other > came_from
      came_from, came_entered = jnp.where(better, other, came_from), jnp.where(better, other_entered, came_entered)
    new_score = came_from + emit
    at_exit = jnp.maximum(exit_state, 0)[..., None]
    ended = jnp.where(exit_state >= 1, jnp.take_along_axis(new_score, at_exit, axis=-1)[..., 0], _NEG_INF)
    improves = ended > best
    new_carry = (new_score, came_entered, jnp.where(improves, ended, best),
                 jnp.where(improves, jnp.take_along_axis(came_entered, at_exit, axis=-1)[..., 0], best_start),
                 jnp.where(improves, t, best_end))
    keep = is_pad[:, None]
    return jax.tree.map(lambda new, old: jnp.where(keep.reshape(keep.shape + (1,) * (old.ndim - 2)), old, new),
                        new_carry, carry), None

  minus_one = jnp.full((batch, phrases), -1, jnp.int32)
  init = (jnp.full((batch, phrases, states), _NEG_INF, jnp.float32), jnp.full((batch, phrases, states), -1, jnp.int32),
          jnp.full((batch, phrases), _NEG_INF, jnp.float32), minus_one, minus_one)
  frames = jnp.arange(log_probs.shape[1], dtype=jnp.int32)
  (_, _, best, start, end), _ = jax.lax.scan(
      one_frame, init, (jnp.swapaxes(gains, 0, 1), jnp.swapaxes(frame_paddings > 0.5, 0, 1), frames))
  return Spots(gain=best, start=start, end=end)


def spotted_phrases(gains: jax.Array, phrase_paddings: jax.Array, top_k: int, threshold: float) -> jax.Array:
  """The phrases that fit best: [batch, top_k] int32 indices into the list, by gain per token, best first;
  -1 where fewer than top_k phrases lose at most `threshold` nats per token (so a KMP table gathered with
  them, kmp.select_phrases, leaves those slots empty).

  Args:
    gains: [batch, phrases] from `phrase_gains`.
    phrase_paddings: [batch, phrases, phrase_len] (for the phrases' token counts).
    top_k: phrases kept per utterance (static).
    threshold: nats per token >= 0.
  """
  if top_k < 1 or not threshold >= 0:
    raise ValueError(f"spotting needs top_k >= 1 and threshold >= 0, got top_k={top_k}, threshold={threshold}.")
  lengths = jnp.sum(phrase_paddings <= 0, axis=-1)
  per_token = jnp.where(lengths > 0, gains / jnp.maximum(lengths, 1), _NEG_INF)
  k = min(top_k, gains.shape[1])
  values, indices = jax.lax.top_k(per_token, k)
  indices = jnp.where(jnp.isfinite(values) & (values >= -threshold), indices, -1).astype(jnp.int32)
  if k < top_k:
    indices = jnp.concatenate([indices, jnp.full((gains.shape[0], top_k - k), -1, jnp.int32)], axis=1)
  return indices
