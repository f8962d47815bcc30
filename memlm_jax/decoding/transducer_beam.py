"""Transducer (RNN-T) greedy decoding and fixed-shape beam search.

The model is three pure functions (`TransducerFns`): a prediction network stepped one
label at a time and a joint network over one encoder frame. Everything here is static
shape: one `lax.scan` over frames and, inside a frame, a `lax.while_loop` of at most
`max_symbols_per_frame + 1` expansion steps, so it compiles once per input shape.

Search space (shared by greedy and beam search). In every frame a hypothesis emits up to
`max_symbols_per_frame` labels and then a blank that moves it to the next frame; after
that many labels (or once it holds `max_output_length` labels) the only allowed extension
is blank. Scores are exact path log-probabilities of such alignments (the blank that
closes a frame is always counted). Padded frames emit nothing.

Beam search ("one-pass time-synchronous", chosen so that beam 1 is exactly greedy):
within a frame every hypothesis is either *active* (has emitted s labels in this frame
at step s, may still emit) or *done* (has emitted its blank for the frame). Each step
scores, for the whole beam at once,
  * done hypothesis    -> itself, unchanged (it waits for the next frame),
  * active hypothesis  -> + blank (becomes done) or + label (stays active),
merges done candidates with equal label sequences (log-add of their scores; the better
one keeps its slot and state) and keeps the best `beam_size` of all candidates with one
`lax.top_k`. The frame ends when no hypothesis is active (after at most
`max_symbols_per_frame + 1` steps). With an unbounded beam the final scores are the
log-sum over all alignments of each label sequence; with a finite beam they are the
log-sum over the alignments that survived pruning (a lower bound). Merging happens after
the last pruning of a frame too, so a beam can end with fewer than `beam_size` distinct
hypotheses; the empty slots have score -inf.

Score fusion (`ScoreFusion`) plugs an external scorer (LM shallow fusion, KMP phrase
boosting) into the search without editing it: its state rides along with each hypothesis
like the predictor state, and its bonuses are added to the hypothesis scores, either
before pruning ('shallow') or to the survivors after pruning ('rescore').
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

BLANK_ID = 0
_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class TransducerFns:
  """The transducer as pure functions (parameters closed over).

  predictor_init: batch_size -> predictor state (pytree, every leaf [batch, ...]).
  predictor_step: (state, labels [n] int32) -> (pred_out [n, pred_dim], new state); consumes
    one previous label per row (blank id 0 is the start symbol).
  joint: (encoder_frame [n, enc_dim], pred_out [n, pred_dim]) -> logits [n, vocab], blank = 0.
  """
  predictor_init: Callable[[int], Any]
  predictor_step: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  joint: Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ScoreFusion:
  """An external scorer fused into `beam_search`.

  init: (batch_size, beam_size) -> fusion state (pytree, every leaf [batch, beam, ...]).
  token_bonus: state -> [batch, beam, vocab] float bonus of each token for each hypothesis
    ('shallow' mode only; the blank column is ignored).
  advance: (state, tokens [batch, beam] int32) -> (new state, earned bonus [batch, beam]);
    called after a hypothesis emits a non-blank token (the result is discarded for rows
    that emitted blank: blank never changes the state). The earned bonus is added to the
    score in 'rescore' mode and ignored in 'shallow' mode (token_bonus already paid it).
  final_bonus: state -> [batch, beam] end-of-utterance correction added to the final scores.
  mode: 'shallow' (token_bonus added to the log-probs before pruning) or 'rescore' (prune on
    the model scores, then add the advance bonus to the survivors).
  """
  init: Callable[[int, int], Any]
  token_bonus: Callable[[Any], jax.Array]
  advance: Callable[[Any, jax.Array], tuple[Any, jax.Array]]
  final_bonus: Callable[[Any], jax.Array]
  mode: str = "shallow"

  def __post_init__(self):
    if self.mode not in ("shallow", "rescore"):
      raise ValueError(f"ScoreFusion.mode must be 'shallow' or 'rescore', got {self.mode!r}.")


class BeamResult(NamedTuple):
  """Hypotheses sorted best first; a slot with score -inf is empty (zero tokens, length 0).

  tokens: [batch, beam, max_output_length] int32 labels, zero after `lengths`.
  lengths: [batch, beam] int32.
  scores: [batch, beam] float32 model log-prob + fusion bonuses (final bonus included).
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array


def _check_inputs(encoder_out: jax.Array, encoder_paddings: jax.Array, max_symbols_per_frame: int,
                  max_output_length: int) -> None:
  if encoder_out.ndim != 3:
    raise ValueError(f"encoder_out must be [batch, frames, enc_dim], got shape {encoder_out.shape}.")
  if encoder_paddings.shape != encoder_out.shape[:2]:
    raise ValueError(f"encoder_paddings must be [batch, frames] = {encoder_out.shape[:2]}, "
                     f"got shape {encoder_paddings.shape}.")
  if max_symbols_per_frame < 1:
    raise ValueError(f"max_symbols_per_frame must be >= 1, got {max_symbols_per_frame}.")
  if max_output_length < 1:
    raise ValueError(f"max_output_length must be >= 1, got {max_output_length}.")


def _select_rows(take_new: jax.Array, new: Any, old: Any) -> Any:
  """`new` where take_new else `old`; take_new's shape ([n] or [batch, beam]) leads every leaf."""
  def select(a, b):
    return jnp.where(take_new.reshape(take_new.shape + (1,) * (a.ndim - take_new.ndim)), a, b)
  return jax.tree.map(select, new, old)


def _append(tokens: jax.Array, lengths: jax.Array, label: jax.Array, emitted: jax.Array) -> jax.Array:
  """Writes label [...] at position lengths [...] of tokens [..., max_len] where emitted."""
  at_end = jnp.arange(tokens.shape[-1]) == lengths[..., None]
  return jnp.where(at_end & emitted[..., None], label[..., None], tokens)


def _frames_major(encoder_out: jax.Array, encoder_paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[batch, frames, ...] -> scan inputs [frames, batch, ...]; padding as bool."""
  return jnp.swapaxes(encoder_out, 0, 1), jnp.swapaxes(encoder_paddings > 0.5, 0, 1)


# Greedy decoding.

def greedy_decode(fns: TransducerFns, encoder_out: jax.Array, encoder_paddings: jax.Array, *,
                  max_symbols_per_frame: int = 4, max_output_length: int) -> tuple[jax.Array, jax.Array]:
  """Best label at every step, at most `max_symbols_per_frame` labels per frame.

  Args:
    fns: the transducer.
    encoder_out: [batch, frames, enc_dim].
    encoder_paddings: [batch, frames], 1.0 on padded frames (they emit nothing).
    max_symbols_per_frame: labels a frame may emit before the decoder moves on.
    max_output_length: width of the output; a full row only emits blanks.
  Returns:
    (tokens [batch, max_output_length] int32 zero-padded, lengths [batch] int32).
  """
  _check_inputs(encoder_out, encoder_paddings, max_symbols_per_frame, max_output_length)
  batch = encoder_out.shape[0]
  pred_out, state = fns.predictor_step(fns.predictor_init(batch), jnp.zeros((batch,), jnp.int32))
  tokens = jnp.zeros((batch, max_output_length), jnp.int32)
  lengths = jnp.zeros((batch,), jnp.int32)

  def one_frame(carry, frame):
    enc_frame, is_pad = frame

    def still_emitting(c):
      step, active = c[0], c[-1]
      return (step < max_symbols_per_frame) & jnp.any(active)

    def emit_one(c):
      step, tokens, lengths, state, pred_out, active = c
      logp = jax.nn.log_softmax(fns.joint(enc_frame, pred_out).astype(jnp.float32), axis=-1)
      may_label = (lengths < max_output_length)[:, None] | (jnp.arange(logp.shape[-1]) == BLANK_ID)
      label = jnp.argmax(jnp.where(may_label, logp, _NEG_INF), axis=-1).astype(jnp.int32)
      emitted = active & (label != BLANK_ID)
      new_out, new_state = fns.predictor_step(state, label)
      return (step + 1, _append(tokens, lengths, label, emitted), lengths + emitted,
              _select_rows(emitted, new_state, state), _select_rows(emitted, new_out, pred_out), emitted)

    tokens, lengths, state, pred_out = carry
    _, tokens, lengths, state, pred_out, _ = jax.lax.while_loop(
        still_emitting, emit_one, (0, tokens, lengths, state, pred_out, ~is_pad))
    return (tokens, lengths, state, pred_out), None

  (tokens, lengths, _, _), _ = jax.lax.scan(one_frame, (tokens, lengths, state, pred_out),
                                            _frames_major(encoder_out, encoder_paddings))
  return tokens, lengths


# Beam search.

class _Beam(NamedTuple):
  """Search state; hypotheses of a row are slots 0..beam-1.

  tokens [batch, beam, max_len], lengths [batch, beam], scores [batch, beam] (-inf = empty),
  done [batch, beam] (blank emitted in this frame), pred_state (leaves [batch * beam, ...]),
  pred_out [batch * beam, pred_dim], fusion_state (leaves [batch, beam, ...], () without fusion).
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  done: jax.Array
  pred_state: Any
  pred_out: jax.Array
  fusion_state: Any


def _merge_equal_sequences(scores: jax.Array, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Log-adds the scores of hypotheses with equal label sequences into the best of them.

  Args:
    scores: [batch, beam] (-inf = empty); tokens [batch, beam, max_len] zero after lengths [batch, beam].
  Returns:
    [batch, beam]: the group's log-sum at the group's best slot (lowest slot on ties), -inf at the others.
  """
  valid = jnp.isfinite(scores)
  same = (jnp.all(tokens[:, :, None] == tokens[:, None, :], axis=-1)
          & (lengths[:, :, None] == lengths[:, None, :]) & valid[:, :, None] & valid[:, None, :])
  group_total = jax.nn.logsumexp(jnp.where(same, scores[:, None, :], _NEG_INF), axis=-1)
  slot = jnp.arange(scores.shape[1])
  other_is_better = ((scores[:, None, :] > scores[:, :, None])
                     | ((scores[:, None, :] == scores[:, :, None]) & (slot[None, :] < slot[:, None])))
  is_best = valid & ~jnp.any(same & other_is_better, axis=-1)
  return jnp.where(is_best, group_total, _NEG_INF)


def _shallow_bonus(fusion: ScoreFusion, fusion_state: Any, label_logp: jax.Array,
                   fusion_top_k: int | None) -> jax.Array:
  """Bonus [batch, beam, vocab - 1] of every label, zero outside each hypothesis's top-k labels."""
  bonus = fusion.token_bonus(fusion_state)[..., 1:].astype(jnp.float32)
  if fusion_top_k is None:
    return bonus
  _, top = jax.lax.top_k(label_logp, fusion_top_k)  # [batch, beam, k]
  in_top = jnp.any(top[..., None] == jnp.arange(label_logp.shape[-1]), axis=-2)
  return jnp.where(in_top, bonus, 0.0)


def beam_search(fns: TransducerFns, encoder_out: jax.Array, encoder_paddings: jax.Array, *, beam_size: int,
                max_symbols_per_frame: int = 2, max_output_length: int, fusion: ScoreFusion | None = None,
                fusion_top_k: int | None = None) -> BeamResult:
  """Fixed-shape, time-synchronous transducer beam search (see the module docstring).

  Args:
    fns: the transducer.
    encoder_out: [batch, frames, enc_dim].
    encoder_paddings: [batch, frames], 1.0 on padded frames (they leave the beam as it is).
    beam_size: hypotheses kept per utterance (1 = `greedy_decode`).
    max_symbols_per_frame: labels a hypothesis may emit in one frame before its blank.
    max_output_length: width of the output; a full hypothesis only emits blanks.
    fusion: optional external scorer (see `ScoreFusion`).
    fusion_top_k: in 'shallow' mode, give the bonus only to the hypothesis's top-k labels
      by model log-prob (None = all labels).
  Returns:
    BeamResult sorted best first. Merging log-adds the total (model + fusion) scores, which
    is exact when the fusion bonus depends only on the label sequence.
  """
  _check_inputs(encoder_out, encoder_paddings, max_symbols_per_frame, max_output_length)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
  if fusion_top_k is not None and (fusion is None or fusion.mode != "shallow" or fusion_top_k < 1):
    raise ValueError(f"fusion_top_k={fusion_top_k} needs a 'shallow' ScoreFusion and a value >= 1.")
  batch, k = encoder_out.shape[0], beam_size
  rows = jnp.arange(batch)[:, None]

  pred_out, pred_state = fns.predictor_step(fns.predictor_init(batch * k), jnp.zeros((batch * k,), jnp.int32))
  beam = _Beam(
      tokens=jnp.zeros((batch, k, max_output_length), jnp.int32),
      lengths=jnp.zeros((batch, k), jnp.int32),
      scores=jnp.full((batch, k), _NEG_INF, jnp.float32).at[:, 0].set(0.0),  # one empty hypothesis
      done=jnp.zeros((batch, k), bool),
      pred_state=pred_state,
      pred_out=pred_out,
      fusion_state=() if fusion is None else fusion.init(batch, k))

  def expand(beam: _Beam, step: jax.Array, enc_frame: jax.Array) -> _Beam:
    """One expansion step of every hypothesis; enc_frame [batch * beam, enc_dim]."""
    logits = fns.joint(enc_frame, beam.pred_out)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, -1)
    vocab = logp.shape[-1]
    if fusion_top_k is not None and fusion_top_k > vocab - 1:
      raise ValueError(f"fusion_top_k={fusion_top_k} exceeds the {vocab - 1} non-blank labels.")
    active = ~beam.done & jnp.isfinite(beam.scores)
    may_label = active & (step < max_symbols_per_frame) & (beam.lengths < max_output_length)

    # Candidate (parent, token): token 0 = blank for an active parent, "stay" for a done one.
    stay_or_blank = jnp.where(active, beam.scores + logp[..., BLANK_ID], beam.scores)
    with_label = beam.scores[..., None] + logp[..., 1:]
    if fusion is not None and fusion.mode == "shallow":
      with_label = with_label + _shallow_bonus(fusion, beam.fusion_state, logp[..., 1:], fusion_top_k)
    with_label = jnp.where(may_label[..., None], with_label, _NEG_INF)
    # Only blank/stay candidates can repeat a sequence: label extensions of the active
    # parents (all s labels into this frame, distinct sequences) are distinct.
    stay_or_blank = _merge_equal_sequences(stay_or_blank, beam.tokens, beam.lengths)
    candidates = jnp.concatenate([stay_or_blank[..., None], with_label], axis=-1).reshape(batch, k * vocab)

    scores, flat_index = jax.lax.top_k(candidates, k)
    parent = flat_index // vocab
    label = (flat_index % vocab).astype(jnp.int32)
    emitted = (label != BLANK_ID) & jnp.isfinite(scores)
    label = jnp.where(emitted, label, BLANK_ID)

    flat_parent = (rows * k + parent).reshape(-1)
    pred_state = jax.tree.map(lambda x: x[flat_parent], beam.pred_state)
    pred_out = beam.pred_out[flat_parent]
    new_out, new_state = fns.predictor_step(pred_state, label.reshape(-1))
    emitted_flat = emitted.reshape(-1)

    fusion_state = jax.tree.map(lambda x: x[rows, parent], beam.fusion_state)
    if fusion is not None:
      advanced, earned = fusion.advance(fusion_state, label)
      fusion_state = _select_rows(emitted, advanced, fusion_state)
      if fusion.mode == "rescore":
        scores = scores + jnp.where(emitted, earned.astype(jnp.float32), 0.0)

    lengths = beam.lengths[rows, parent]
    return _Beam(
        tokens=_append(beam.tokens[rows, parent], lengths, label, emitted),
        lengths=lengths + emitted,
        scores=scores,
        done=~emitted,
        pred_state=_select_rows(emitted_flat, new_state, pred_state),
        pred_out=_select_rows(emitted_flat, new_out, pred_out),
        fusion_state=fusion_state)

  def one_frame(beam: _Beam, frame) -> tuple[_Beam, None]:
    enc_frame, is_pad = frame
    # A padded frame starts with every hypothesis done, so nothing is expanded.
    beam = beam._replace(done=jnp.broadcast_to(is_pad[:, None], (batch, k)))

    def any_active(c):
      step, beam = c
      return (step <= max_symbols_per_frame) & jnp.any(~beam.done & jnp.isfinite(beam.scores))

    enc_frame = jnp.repeat(enc_frame, k, axis=0)  # one copy per hypothesis
    _, beam = jax.lax.while_loop(any_active, lambda c: (c[0] + 1, expand(c[1], c[0], enc_frame)), (0, beam))
    return beam, None

  beam, _ = jax.lax.scan(one_frame, beam, _frames_major(encoder_out, encoder_paddings))

  scores = beam.scores
  if fusion is not None:
    scores = scores + fusion.final_bonus(beam.fusion_state).astype(jnp.float32)
  valid = jnp.isfinite(scores)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  valid = valid[rows, order]
  return BeamResult(tokens=jnp.where(valid[..., None], beam.tokens[rows, order], 0),
                    lengths=jnp.where(valid, beam.lengths[rows, order], 0),
                    scores=jnp.where(valid, scores[rows, order], _NEG_INF))

