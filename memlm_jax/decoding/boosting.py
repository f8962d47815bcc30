"""Phrase boosting in the beam search, whatever matches the phrases.

The scoring rules (decoding/kmp.py's docstring: a potential r = max_b w_b * i_b, the bonus of a
token mu(after) - Phi(before), a completed phrase paying w_b * len(P_b) and resetting every match,
the prefix flag and its multiplier, the end-of-utterance cancellation) are written once here, over
a *phrase matcher* that knows only how the match state moves:

  * `decoding/kmp.py`'s PhraseTable: one match length per phrase (cost grows with the phrases);
  * `decoding/aho_corasick.py`'s PhraseAutomaton: one automaton node per hypothesis (cost set by
    the longest phrase and the widest trie node, not by the number of phrases).

Both give the same bonuses (tests/test_aho_corasick.py). A matcher is a pytree with an optional
leading [batch] axis (one phrase list per utterance) and these methods on one list, states [n, ...]:

  batched, batch_size, vocab_size
  initial_match(shape) -> match: shape + [...] int32, nothing matched
  raw_potential(match [n, ...]) -> r [n] float32
  step(match, tokens [n]) -> (match after the token, resets applied; r(after) [n]: w_b * len(P_b) of
      the best completed phrase if the token completes one, else r of the new match; completed [n] bool)
  vocab_step(match) -> (r(after x) [n, vocab] and completed [n, vocab] for every token x)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from memlm_jax.decoding.transducer_beam import ScoreFusion
from memlm_jax.losses.rnnt import BLANK_ID


class BoostState(NamedTuple):
  """Match state of a set of hypotheses with leading shape S.

  match: S + [...] int32, the phrase matcher's state (KMP: [phrases] match lengths; Aho-Corasick:
    [] a node id).
  prefix_match: S + [...] int32, the prefix matcher's state (S + [0] without a prefix table).
  active: S bool, the prefix flag.
  """
  match: jax.Array
  prefix_match: jax.Array
  active: jax.Array


class _Scorer(NamedTuple):
  """The per-utterance computations; matchers unbatched, states [n, ...]."""
  table: Any
  prefix_table: Any
  bonus_per_token: Any
  prefix_multiplier: Any

  def scaled(self, raw: jax.Array, active: jax.Array) -> jax.Array:
    return self.bonus_per_token * jnp.where(active, self.prefix_multiplier, 1.0) * raw

  def potential(self, state: BoostState) -> jax.Array:
    return self.scaled(self.table.raw_potential(state.match), state.active)

  def advance(self, state: BoostState, tokens: jax.Array) -> tuple[BoostState, jax.Array]:
    match, raw_after, any_completed = self.table.step(state.match, tokens)
    prefix_match, prefix_completed = state.prefix_match, jnp.zeros_like(any_completed)
    if self.prefix_table is not None:
      prefix_match, _, prefix_completed = self.prefix_table.step(state.prefix_match, tokens)
    continuing = state.active & (raw_after > 0)
    bonus = self.scaled(raw_after, prefix_completed | continuing) - self.potential(state)
    advanced = BoostState(match=match, prefix_match=prefix_match,
                          active=prefix_completed | (continuing & ~any_completed))
    is_blank = tokens == BLANK_ID
    advanced = jax.tree.map(
        lambda a, b: jnp.where(is_blank.reshape(is_blank.shape + (1,) * (a.ndim - 1)), b, a), advanced, state)
    return advanced, jnp.where(is_blank, 0.0, bonus)

  def token_bonus(self, state: BoostState) -> jax.Array:
    raw_after, _ = self.table.vocab_step(state.match)
    prefix_completed = jnp.zeros(raw_after.shape, bool)
    if self.prefix_table is not None:
      _, prefix_completed = self.prefix_table.vocab_step(state.prefix_match)
    active_after = prefix_completed | (state.active[:, None] & (raw_after > 0))
    bonus = self.scaled(raw_after, active_after) - self.potential(state)[:, None]
    return bonus.at[:, BLANK_ID].set(0.0)


@dataclasses.dataclass(frozen=True)
class PhraseBooster:
  """Phrase boosting over hypotheses with any leading shape S (rules: decoding/kmp.py's docstring).

  A batched table (or prefix table) needs S[0] == its batch size: row u of the state uses
  phrase list u.

  table: the biasing phrases, a phrase matcher (kmp.PhraseTable or aho_corasick.PhraseAutomaton).
  bonus_per_token: delta (a float or a traced scalar).
  prefix_table: optional carrier phrases whose completion turns the multiplier on (a matcher of
    the same kind or the other).
  prefix_multiplier: lambda.
  """
  table: Any
  bonus_per_token: Any
  prefix_table: Any = None
  prefix_multiplier: Any = 1.0

  def __post_init__(self):
    if self.prefix_table is not None and self.prefix_table.vocab_size != self.table.vocab_size:
      raise ValueError(f"prefix_table.vocab_size={self.prefix_table.vocab_size} differs from the phrase table's "
                       f"{self.table.vocab_size}.")
    if isinstance(self.prefix_multiplier, (int, float)):
      if not self.prefix_multiplier > 0:
        raise ValueError(f"prefix_multiplier must be > 0, got {self.prefix_multiplier}.")
      if self.prefix_table is None and self.prefix_multiplier != 1.0:
        raise ValueError(f"prefix_multiplier={self.prefix_multiplier} needs a prefix_table.")

  def _batch_size(self) -> int | None:
    sizes = {t.batch_size for t in (self.table, self.prefix_table) if t is not None and t.batched}
    if len(sizes) > 1:
      raise ValueError(f"table and prefix_table have different batch sizes {sorted(sizes)}.")
    return sizes.pop() if sizes else None

  def _check_shape(self, shape: tuple[int, ...]) -> int | None:
    batch = self._batch_size()
    if batch is not None and (not shape or shape[0] != batch):
      raise ValueError(f"the phrase table holds {batch} phrase lists but the hypotheses have shape {shape}; "
                       "their leading axis must be the batch.")
    return batch

  def _apply(self, method: str, state: BoostState, *args: jax.Array) -> Any:
    """Runs _Scorer.method with states flattened to [n, ...] (vmapped over a batched table's axis)."""
    shape = state.active.shape
    batch = self._check_shape(shape)

    def run(table, prefix_table, state, *args):
      scorer = _Scorer(table, prefix_table, self.bonus_per_token, self.prefix_multiplier)
      return getattr(scorer, method)(state, *args)

    if batch is None:
      flat = lambda x: x.reshape((math.prod(shape),) + x.shape[len(shape):])  # noqa: E731
      out = run(self.table, self.prefix_table, jax.tree.map(flat, state), *map(flat, args))
      return jax.tree.map(lambda x: x.reshape(shape + x.shape[1:]), out)
    flat = lambda x: x.reshape((batch, math.prod(shape[1:])) + x.shape[len(shape):])  # noqa: E731
    axis = lambda t: None if t is None or not t.batched else 0  # noqa: E731
    out = jax.vmap(run, in_axes=(axis(self.table), axis(self.prefix_table), 0) + (0,) * len(args))(
        self.table, self.prefix_table, jax.tree.map(flat, state), *map(flat, args))
    return jax.tree.map(lambda x: x.reshape(shape + x.shape[2:]), out)

  def init(self, shape: tuple[int, ...]) -> BoostState:
    """Nothing matched, flag off; leaves shape + [...]."""
    shape = tuple(shape)
    self._check_shape(shape)
    prefix_match = (jnp.zeros(shape + (0,), jnp.int32) if self.prefix_table is None
                    else self.prefix_table.initial_match(shape))
    return BoostState(match=self.table.initial_match(shape), prefix_match=prefix_match,
                      active=jnp.zeros(shape, bool))

  def potential(self, state: BoostState) -> jax.Array:
    """Phi(state), [S] float32."""
    return self._apply("potential", state)

  def advance(self, state: BoostState, tokens: jax.Array) -> tuple[BoostState, jax.Array]:
    """State after tokens [S] int32 and the bonus [S] they earn (blank: unchanged, 0)."""
    return self._apply("advance", state, jnp.asarray(tokens, jnp.int32))

  def token_bonus(self, state: BoostState) -> jax.Array:
    """Bonus [S, vocab] of every token (blank column 0), equal to `advance`'s bonus for that token."""
    return self._apply("token_bonus", state)

  def final_bonus(self, state: BoostState) -> jax.Array:
    """End-of-utterance correction [S]: cancels a pending partial match."""
    return -self.potential(state)


def phrase_fusion(table: Any, bonus_per_token: Any, mode: str = "shallow", *, prefix_table: Any = None,
                  prefix_multiplier: Any = 1.0) -> ScoreFusion:
  """Phrase boosting as a `ScoreFusion` for `beam_search` (state leaves [batch, beam, ...]).

  Args:
    table: biasing phrases (a phrase matcher); with a leading batch axis, list u biases utterance u.
    bonus_per_token: delta, the bonus of each matched token.
    mode: 'shallow' (the whole-vocabulary bonus is added before pruning) or 'rescore'
      (survivors of pruning get the bonus of the token they emitted).
    prefix_table: optional carrier phrases ("call ", "play ") that turn on prefix_multiplier.
    prefix_multiplier: lambda, multiplies the bonuses of a phrase right after a prefix.
  """
  booster = PhraseBooster(table, bonus_per_token, prefix_table, prefix_multiplier)
  return ScoreFusion(init=lambda batch, beam: booster.init((batch, beam)), token_bonus=booster.token_bonus,
                     advance=booster.advance, final_bonus=booster.final_bonus, mode=mode)


# Phrase lists (token ids) to padded arrays, shared by the tables' builders.


def _clean_phrase_list(phrases: Sequence[Sequence[int]], names: Sequence[str], weights: Sequence[float] | None,
                       vocab_size: int, max_phrases: int | None,
                       max_phrase_length: int | None) -> tuple[list[list[int]], list[float]]:
  """Drops (with a warning) empty phrases and duplicates; raises on ids outside the vocabulary,
  phrases longer than max_phrase_length and lists longer than max_phrases."""
  if weights is not None and len(weights) != len(phrases):
    raise ValueError(f"got {len(weights)} weights for {len(phrases)} phrases.")
  kept, kept_weights, seen = [], [], set()
  for index, (phrase, name) in enumerate(zip(phrases, names)):
    ids = [int(t) for t in phrase]
    if not ids:
      logging.warning("Dropping empty biasing phrase %s.", name)
      continue
    bad = [t for t in ids if not 1 <= t < vocab_size]
    if bad:
      raise ValueError(f"phrase {name} has token id {bad[0]} outside the vocabulary [1, {vocab_size}) "
                       "(id 0 is the blank).")
    if max_phrase_length is not None and len(ids) > max_phrase_length:
      raise ValueError(f"phrase {name} has {len(ids)} tokens, more than max_phrase_length={max_phrase_length}.")
    if tuple(ids) in seen:
      logging.warning("Dropping duplicate biasing phrase %s.", name)
      continue
    seen.add(tuple(ids))
    kept.append(ids)
    kept_weights.append(1.0 if weights is None else float(weights[index]))
  if max_phrases is not None and len(kept) > max_phrases:
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
    raise ValueError(f"the phrase list [{shown}] has {len(kept)} distinct phrases, more than "
                     f"max_phrases={max_phrases}.")
  return kept, kept_weights


def padded_phrase_lists(phrase_lists: Sequence[Sequence[Sequence[int]]], vocab_size: int, *,
                        weights: Sequence[Sequence[float]] | None = None, max_phrases: int | None = None,
                        max_phrase_length: int | None = None,
                        names: Sequence[Sequence[str]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checked, de-duplicated phrase lists as padded arrays.

  Empty phrases and duplicates are dropped with a warning; an id outside [1, vocab_size), a phrase
  longer than max_phrase_length or a list of more than max_phrases phrases is a ValueError naming it.
  Returns (tokens [lists, phrases, max_len] int32, mask [lists, phrases, max_len] bool, weights
  [lists, phrases] float32), padded to max_phrases x max_phrase_length when given (else to the data).
  """
  if weights is not None and len(weights) != len(phrase_lists):
    raise ValueError(f"got {len(weights)} weight lists for {len(phrase_lists)} phrase lists.")
  for name, limit in (("max_phrases", max_phrases), ("max_phrase_length", max_phrase_length)):
    if limit is not None and limit < 1:
      raise ValueError(f"{name} must be >= 1 (or None), got {limit}.")
  if names is None:
    names = [[str(list(p)) for p in phrases] for phrases in phrase_lists]
  cleaned = [_clean_phrase_list(phrases, list_names, None if weights is None else weights[u], vocab_size,
                                max_phrases, max_phrase_length)
             for u, (phrases, list_names) in enumerate(zip(phrase_lists, names))]
  num_phrases = max_phrases or max([1] + [len(p) for p, _ in cleaned])
  max_len = max_phrase_length or max([1] + [len(t) for p, _ in cleaned for t in p])
  tokens = np.zeros((len(cleaned), num_phrases, max_len), np.int32)
  mask = np.zeros(tokens.shape, bool)
  weight_array = np.ones(tokens.shape[:2], np.float32)
  for u, (phrases, phrase_weights) in enumerate(cleaned):
    for b, (ids, w) in enumerate(zip(phrases, phrase_weights)):
      tokens[u, b, :len(ids)], mask[u, b, :len(ids)], weight_array[u, b] = ids, True, w
  return tokens, mask, weight_array


def check_padded_phrases(tokens: np.ndarray, mask: np.ndarray, vocab_size: int,
                         weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Checks padded phrase arrays (no leading axis, or a [batch] axis) and returns (tokens, mask,
  lengths [..., phrases], weights [..., phrases] float32, default 1)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if tokens.ndim not in (2, 3) or mask.shape != tokens.shape:
    raise ValueError(f"tokens and mask must both be [phrases, max_len] or [batch, phrases, max_len], got shapes "
                     f"{tokens.shape} and {mask.shape}.")
  lengths = mask.sum(-1)
  if (mask != (np.arange(tokens.shape[-1]) < lengths[..., None])).any():
    raise ValueError("mask must be True on a prefix of each phrase (the phrase) and False after it.")
  outside = mask & ((tokens < 1) | (tokens >= vocab_size))
  if outside.any():
    raise ValueError(f"token id {int(tokens[outside][0])} is outside the vocabulary [1, {vocab_size}) "
                     "(id 0 is the blank).")
  weights = np.ones(lengths.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
  if weights.shape != lengths.shape or not (np.isfinite(weights) & (weights > 0)).all():
    raise ValueError(f"weights must be positive finite floats of shape {lengths.shape}, got {weights}.")
  return tokens, mask, lengths, weights
