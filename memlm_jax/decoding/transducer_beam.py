"""Transducer (RNN-T) greedy decoding and fixed-shape beam search.

The model is three pure functions (`TransducerFns`, e.g. `TransducerFns.from_model(model)`):
a prediction network stepped one label at a time and a joint network over one encoder frame. Everything here is static
shape: one `lax.scan` over frames and, inside a frame, a `lax.while_loop` of at most
`max_symbols_per_frame + 1` expansion steps, so it compiles once per input shape.

Search space (shared by greedy and both beam searches). In every frame a hypothesis emits
up to `max_symbols_per_frame` labels and then a blank that moves it to the next frame; after
that many labels (or once it holds `max_output_length` labels) the only allowed extension
is blank. Scores are exact path log-probabilities of such alignments (the blank that
closes a frame is always counted). Padded frames emit nothing.

Beam search, `method="tsd"` (the default; time-synchronous decoding, Saon et al. 2020).
Within a frame two sets of `beam_size` slots each are kept apart:
  * B, *ended*: hypotheses that closed the frame with their blank (its final beam),
  * A, *active*: hypotheses that emitted s labels in this frame and may still emit.
A frame starts with A = the beam and B empty. Step s (s = 0..max_symbols_per_frame) scores
every active hypothesis at once; A + blank joins B (B = the best `beam_size` of B and the
new candidates, after log-adding the scores of equal label sequences into the best of
them) and A + label (while s < max_symbols_per_frame) becomes the next A (the best
`beam_size` label extensions). An active hypothesis already below B's `beam_size`-th score
is dropped: without fusion no extension can raise a score, so neither it nor its extensions
could enter B (they could only have log-added a little to an equal sequence already in B;
with positive fusion bonuses the drop is a pruning heuristic like the top-k). The frame
ends when A is empty (usually after a step or two); B is the beam. So a hypothesis that needs
several labels in a frame competes only with other active ones, and an ended hypothesis leaves
B only for a better ended one. With beam 1 this keeps the best stopping point along the
best-label chain, which is not greedy decoding (greedy stops at the first step where blank
beats every label); over several frames neither of the two always scores higher.

Beam search, `method="one_pass"` (chosen so that beam 1 is exactly `greedy_decode`): one
set of `beam_size` slots holds both kinds; each step maps an ended hypothesis to itself and
an active one to + blank (ended) or + label (active), merges equal ended sequences and keeps
the best `beam_size` of all candidates with one `lax.top_k`. Its weakness: a hypothesis that
needs several labels in one frame pays them one step at a time, and after 2-3 labels its
partial score drops below ended hypotheses that already paid their blank, which take its
slot although its completed path would be far better (and active partials can evict ended
hypotheses and then end worse). On models that emit several labels per frame it can find a
worse path than greedy.

Both: with an unbounded beam the final scores are the log-sum over all alignments of each
label sequence; with a finite beam they are the log-sum over the alignments that survived
pruning (a lower bound). 'one_pass' merges after the last pruning of a frame too, so its beam
can end with fewer than `beam_size` distinct hypotheses ('tsd' merges before pruning); empty
slots have score -inf.

Internal-LM subtraction (`ilm_weight` w > 0, ILME fusion: Meng et al. 2021): every label's log-prob
becomes log p(label | frame, prefix) - w log p_ILM(label | prefix), where p_ILM is the prediction and
joint networks' own prior, the joint with a zero encoder frame and its softmax renormalised over the
non-blank labels (Transducer.internal_lm_nll scores whole sequences the same way). Blank is unchanged.
It takes out the label prior the prediction network learned from the training transcripts, so that
an unseen word (a held-out name in a bias list) is not outvoted by familiar ones; the bonuses are
positive, so the 'tsd' drop of active hypotheses below B (above) is a pruning heuristic then too.

Score fusion (`ScoreFusion`) plugs an external scorer (LM shallow fusion, KMP phrase
boosting) into the search without editing it: its state rides along with each hypothesis
like the predictor state, and its bonuses are added to the hypothesis scores, either
before pruning ('shallow') or to the survivors after pruning ('rescore').
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from memlm_jax.decoding.rows import select_rows
from memlm_jax.losses.rnnt import BLANK_ID

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

  @classmethod
  def from_model(cls, model: Any) -> "TransducerFns":
    """The functions of a model that exposes them as the methods `init_decoder_state`,
    `decoder_step` and `joint_logits` (models/transducer.py's Transducer)."""
    return cls(predictor_init=model.init_decoder_state, predictor_step=model.decoder_step,
               joint=model.joint_logits)


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
  frames: [batch, beam, max_output_length] int32, the encoder frame each label was emitted at, zero
    after `lengths`: of the alignment that held the most probability each time equal sequences
    merged (the best alignment when one dominates, as a confident model's does).
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  frames: jax.Array


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
              select_rows(emitted, new_state, state), select_rows(emitted, new_out, pred_out), emitted)

    tokens, lengths, state, pred_out = carry
    _, tokens, lengths, state, pred_out, _ = jax.lax.while_loop(
        still_emitting, emit_one, (0, tokens, lengths, state, pred_out, ~is_pad))
    return (tokens, lengths, state, pred_out), None

  (tokens, lengths, _, _), _ = jax.lax.scan(one_frame, (tokens, lengths, state, pred_out),
                                            _frames_major(encoder_out, encoder_paddings))
  return tokens, lengths


# Beam search.

def check_ilm_weight(ilm_weight: Any) -> None:
  """The internal-LM weight's one check: a finite number >= 0."""
  if isinstance(ilm_weight, bool) or not isinstance(ilm_weight, numbers.Real) or not 0 <= ilm_weight < float("inf"):
    raise ValueError(f"ilm_weight must be a finite number >= 0 (0 = no internal-LM subtraction), got {ilm_weight!r}.")


BEAM_METHODS = ("tsd", "one_pass")


class _Hyps(NamedTuple):
  """Hypotheses of every row in slots 0..n-1; every leaf leads with [batch, n].

  tokens [batch, n, max_len] (zero after lengths), lengths [batch, n], scores [batch, n]
  (-inf = empty slot), frames [batch, n, max_len] (each label's frame), pred_state (leaves [batch, n,
  ...]), pred_out [batch, n, pred_dim], fusion_state (leaves [batch, n, ...], () without fusion).
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  frames: jax.Array
  pred_state: Any
  pred_out: jax.Array
  fusion_state: Any


def _take(hyps: _Hyps, index: jax.Array) -> _Hyps:
  """Slots index [batch, k] of every row."""
  rows = jnp.arange(index.shape[0])[:, None]
  return jax.tree.map(lambda x: x[rows, index], hyps)


def _concat(first: _Hyps, second: _Hyps) -> _Hyps:
  """The slots of `first`, then those of `second`."""
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), first, second)


def _flatten_slots(tree: Any) -> Any:
  """Leaves [batch, n, ...] -> [batch * n, ...] (the layout the transducer functions take)."""
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def _split_slots(tree: Any, batch: int) -> Any:
  """Leaves [batch * n, ...] -> [batch, n, ...]."""
  return jax.tree.map(lambda x: x.reshape((batch, -1) + x.shape[1:]), tree)


def _merge_equal_sequences(scores: jax.Array, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Log-adds the scores of hypotheses with equal label sequences into the best of them.

  Args:
    scores: [batch, n] (-inf = empty); tokens [batch, n, max_len] zero after lengths [batch, n].
  Returns:
    [batch, n]: the group's log-sum at the group's best slot (lowest slot on ties), -inf at the others.
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


@dataclasses.dataclass(frozen=True)
class _Expander:
  """Scores and extends hypotheses; shared by both search methods."""
  fns: TransducerFns
  fusion: ScoreFusion | None
  fusion_top_k: int | None
  max_symbols_per_frame: int
  max_output_length: int
  ilm_weight: float = 0.0

  def log_probs(self, hyps: _Hyps, enc_frame: jax.Array) -> jax.Array:
    """[batch, n, vocab] float32 next-symbol log-probs (labels less ilm_weight x the internal LM's);
    enc_frame [batch * n, enc_dim]."""
    batch = hyps.scores.shape[0]
    pred_out = _flatten_slots(hyps.pred_out)
    logits = self.fns.joint(enc_frame, pred_out)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, -1, logits.shape[-1])
    if self.ilm_weight:
      prior = self.fns.joint(jnp.zeros_like(enc_frame), pred_out).astype(jnp.float32)
      prior_logp = jax.nn.log_softmax(prior[:, 1:], axis=-1).reshape(batch, -1, logits.shape[-1] - 1)
      logp = logp.at[..., 1:].add(-self.ilm_weight * prior_logp)
    if self.fusion_top_k is not None and self.fusion_top_k > logp.shape[-1] - 1:
      raise ValueError(f"fusion_top_k={self.fusion_top_k} exceeds the {logp.shape[-1] - 1} non-blank labels.")
    return logp

  def may_label(self, hyps: _Hyps, step: jax.Array) -> jax.Array:
    """[batch, n]: non-empty slots that may still emit a label at expansion step `step` of a frame."""
    return (jnp.isfinite(hyps.scores) & (step < self.max_symbols_per_frame)
            & (hyps.lengths < self.max_output_length))

  def label_scores(self, hyps: _Hyps, logp: jax.Array, can_emit: jax.Array) -> jax.Array:
    """[batch, n, vocab - 1] scores of hypothesis + label (column j: label j + 1; shallow bonus
    included), -inf where not can_emit [batch, n]."""
    scores = hyps.scores[..., None] + logp[..., 1:]
    if self.fusion is not None and self.fusion.mode == "shallow":
      scores = scores + _shallow_bonus(self.fusion, hyps.fusion_state, logp[..., 1:], self.fusion_top_k)
    return jnp.where(can_emit[..., None], scores, _NEG_INF)

  def emit(self, parents: _Hyps, label: jax.Array, emitted: jax.Array, frame_index: jax.Array) -> _Hyps:
    """parents (already holding the new scores) + label [batch, n] where emitted [batch, n], at frame
    frame_index []; the others keep their state. In 'rescore' mode the earned fusion bonus is added to
    the score."""
    batch = label.shape[0]
    label = jnp.where(emitted, label, BLANK_ID).astype(jnp.int32)
    new_out, new_state = self.fns.predictor_step(_flatten_slots(parents.pred_state), label.reshape(-1))
    scores, fusion_state = parents.scores, parents.fusion_state
    if self.fusion is not None:
      advanced, earned = self.fusion.advance(fusion_state, label)
      fusion_state = select_rows(emitted, advanced, fusion_state)
      if self.fusion.mode == "rescore":
        scores = scores + jnp.where(emitted, earned.astype(jnp.float32), 0.0)
    return _Hyps(tokens=_append(parents.tokens, parents.lengths, label, emitted),
                 lengths=parents.lengths + emitted,
                 scores=scores,
                 frames=_append(parents.frames, parents.lengths, jnp.broadcast_to(frame_index, label.shape), emitted),
                 pred_state=select_rows(emitted, _split_slots(new_state, batch), parents.pred_state),
                 pred_out=select_rows(emitted, _split_slots(new_out, batch), parents.pred_out),
                 fusion_state=fusion_state)


def _tsd_step(expander: _Expander, active: _Hyps, ended: _Hyps, step: jax.Array, enc_frame: jax.Array,
              frame_index: jax.Array) -> tuple[_Hyps, _Hyps]:
  """One expansion step of the active set A into the ended set B (both [batch, k] slots)."""
  batch, k = active.scores.shape
  logp = expander.log_probs(active, enc_frame)

  closed = jnp.where(jnp.isfinite(active.scores), active.scores + logp[..., BLANK_ID], _NEG_INF)
  pool = _concat(ended, active._replace(scores=closed))
  merged = _merge_equal_sequences(pool.scores, pool.tokens, pool.lengths)
  ended_scores, keep = jax.lax.top_k(merged, k)
  ended = _take(pool, keep)._replace(scores=ended_scores)

  with_label = expander.label_scores(active, logp, expander.may_label(active, step))
  labels = with_label.shape[-1]
  scores, flat_index = jax.lax.top_k(with_label.reshape(batch, k * labels), k)
  parent, label = flat_index // labels, flat_index % labels + 1
  active = expander.emit(_take(active, parent)._replace(scores=scores), label, jnp.isfinite(scores), frame_index)
  # Blank (and, without positive fusion bonuses or ILM subtraction, every label) only lowers a score: an active
  # hypothesis already below B's k-th best can never enter B.
  survives = active.scores >= ended.scores[:, -1:]
  return active._replace(scores=jnp.where(survives, active.scores, _NEG_INF)), ended


def _tsd_frame(expander: _Expander, beam: _Hyps, frame: tuple[jax.Array, jax.Array, jax.Array]
               ) -> tuple[_Hyps, None]:
  """One frame (enc_frame, is_pad, frame_index) of time-synchronous decoding: A starts as the beam, B
  empty; the beam becomes B."""
  enc_frame, is_pad, frame_index = frame
  k = beam.scores.shape[1]
  pad = is_pad[:, None]
  # A padded row starts with its beam already ended, so it is not expanded.
  active = beam._replace(scores=jnp.where(pad, _NEG_INF, beam.scores))
  ended = beam._replace(scores=jnp.where(pad, beam.scores, _NEG_INF))
  enc_frame = jnp.repeat(enc_frame, k, axis=0)  # one copy per hypothesis

  def any_active(c):
    step, active, _ = c
    return (step <= expander.max_symbols_per_frame) & jnp.any(jnp.isfinite(active.scores))

  def body(c):
    step, active, ended = c
    return (step + 1, *_tsd_step(expander, active, ended, step, enc_frame, frame_index))

  _, _, ended = jax.lax.while_loop(any_active, body, (jnp.int32(0), active, ended))
  return ended, None


def _one_pass_step(expander: _Expander, beam: _Hyps, done: jax.Array, step: jax.Array, enc_frame: jax.Array,
                   frame_index: jax.Array) -> tuple[_Hyps, jax.Array]:
  """One expansion step of a beam mixing ended (done [batch, k]) and active hypotheses."""
  batch, k = beam.scores.shape
  logp = expander.log_probs(beam, enc_frame)
  vocab = logp.shape[-1]
  active = ~done & jnp.isfinite(beam.scores)

  # Candidate (parent, token): token 0 = blank for an active parent, "stay" for a done one.
  stay_or_blank = jnp.where(active, beam.scores + logp[..., BLANK_ID], beam.scores)
  with_label = expander.label_scores(beam, logp, active & expander.may_label(beam, step))
  # Only blank/stay candidates can repeat a sequence: label extensions of the active
  # parents (all s labels into this frame, distinct sequences) are distinct.
  stay_or_blank = _merge_equal_sequences(stay_or_blank, beam.tokens, beam.lengths)
  candidates = jnp.concatenate([stay_or_blank[..., None], with_label], axis=-1).reshape(batch, k * vocab)

  scores, flat_index = jax.lax.top_k(candidates, k)
  parent, label = flat_index // vocab, flat_index % vocab
  emitted = (label != BLANK_ID) & jnp.isfinite(scores)
  return expander.emit(_take(beam, parent)._replace(scores=scores), label, emitted, frame_index), ~emitted


def _one_pass_frame(expander: _Expander, beam: _Hyps, frame: tuple[jax.Array, jax.Array, jax.Array]
                    ) -> tuple[_Hyps, None]:
  """One frame (enc_frame, is_pad, frame_index) of the one-pass search (ended and active hypotheses
  share the k slots)."""
  enc_frame, is_pad, frame_index = frame
  batch, k = beam.scores.shape
  # A padded frame starts with every hypothesis done, so nothing is expanded.
  done = jnp.broadcast_to(is_pad[:, None], (batch, k))
  enc_frame = jnp.repeat(enc_frame, k, axis=0)  # one copy per hypothesis

  def any_active(c):
    step, beam, done = c
    return (step <= expander.max_symbols_per_frame) & jnp.any(~done & jnp.isfinite(beam.scores))

  def body(c):
    step, beam, done = c
    return (step + 1, *_one_pass_step(expander, beam, done, step, enc_frame, frame_index))

  _, beam, _ = jax.lax.while_loop(any_active, body, (jnp.int32(0), beam, done))
  return beam, None


def beam_search(fns: TransducerFns, encoder_out: jax.Array, encoder_paddings: jax.Array, *, beam_size: int,
                max_symbols_per_frame: int = 2, max_output_length: int, fusion: ScoreFusion | None = None,
                fusion_top_k: int | None = None, method: str = "tsd", ilm_weight: float = 0.0) -> BeamResult:
  """Fixed-shape, time-synchronous transducer beam search (see the module docstring).

  Args:
    fns: the transducer.
    encoder_out: [batch, frames, enc_dim].
    encoder_paddings: [batch, frames], 1.0 on padded frames (they leave the beam as it is).
    beam_size: hypotheses kept per utterance (with method 'one_pass', 1 = `greedy_decode`).
    max_symbols_per_frame: labels a hypothesis may emit in one frame before its blank.
    max_output_length: width of the output; a full hypothesis only emits blanks.
    fusion: optional external scorer (see `ScoreFusion`).
    fusion_top_k: in 'shallow' mode, give the bonus only to the hypothesis's top-k labels
      by model log-prob, less the internal LM's with ilm_weight (None = all labels).
    method: 'tsd' (ended and active hypotheses in separate sets of beam_size slots) or
      'one_pass' (one shared set; beam 1 is greedy). See the module docstring.
    ilm_weight: w >= 0 of the internal-LM subtraction (module docstring; 0 = off). A Python float: it
      decides what is compiled.
  Returns:
    BeamResult sorted best first. Merging log-adds the total (model + fusion) scores, which
    is exact when the fusion bonus depends only on the label sequence.
  """
  _check_inputs(encoder_out, encoder_paddings, max_symbols_per_frame, max_output_length)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
  if fusion_top_k is not None and (fusion is None or fusion.mode != "shallow" or fusion_top_k < 1):
    raise ValueError(f"fusion_top_k={fusion_top_k} needs a 'shallow' ScoreFusion and a value >= 1.")
  if method not in BEAM_METHODS:
    raise ValueError(f"beam search method must be one of {BEAM_METHODS}, got {method!r}.")
  check_ilm_weight(ilm_weight)
  batch, k = encoder_out.shape[0], beam_size
  rows = jnp.arange(batch)[:, None]
  expander = _Expander(fns, fusion, fusion_top_k, max_symbols_per_frame, max_output_length, float(ilm_weight))

  pred_out, pred_state = fns.predictor_step(fns.predictor_init(batch * k), jnp.zeros((batch * k,), jnp.int32))
  beam = _Hyps(
      tokens=jnp.zeros((batch, k, max_output_length), jnp.int32),
      lengths=jnp.zeros((batch, k), jnp.int32),
      scores=jnp.full((batch, k), _NEG_INF, jnp.float32).at[:, 0].set(0.0),  # one empty hypothesis
      frames=jnp.zeros((batch, k, max_output_length), jnp.int32),
      pred_state=_split_slots(pred_state, batch),
      pred_out=_split_slots(pred_out, batch),
      fusion_state=() if fusion is None else fusion.init(batch, k))

  one_frame = _tsd_frame if method == "tsd" else _one_pass_frame
  frame_indices = jnp.arange(encoder_out.shape[1], dtype=jnp.int32)
  beam, _ = jax.lax.scan(lambda b, frame: one_frame(expander, b, frame), beam,
                         (*_frames_major(encoder_out, encoder_paddings), frame_indices))

  scores = beam.scores
  if fusion is not None:
    scores = scores + fusion.final_bonus(beam.fusion_state).astype(jnp.float32)
  valid = jnp.isfinite(scores)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  valid = valid[rows, order]
  return BeamResult(tokens=jnp.where(valid[..., None], beam.tokens[rows, order], 0),
                    lengths=jnp.where(valid, beam.lengths[rows, order], 0),
                    scores=jnp.where(valid, scores[rows, order], _NEG_INF),
                    frames=jnp.where(valid[..., None], beam.frames[rows, order], 0))
