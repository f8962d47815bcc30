"""KMP phrase boosting (Wang et al., "Contextual Biasing with the Knuth-Morris-Pratt
Matching Algorithm", arXiv 2310.00178) as vectorized `jnp`, for `beam_search` fusion.

No FST and no loop over hypotheses or phrases at decode time: the phrase tables are
padded arrays built once per phrase list (`phrase_table_from_padded` takes the data pipeline's
bias_tokens [batch, phrases, phrase_len]), and every step is a gather and a max (or a
scatter-max over the vocabulary) over [hyps, phrases, chain] arrays. Token ids in, no text and
no gin: text phrases are tokenized by the data pipeline (data/speech.py).

Matching (per hypothesis, phrases P_1..P_B of token ids, weights w_b > 0, bonus delta):
  * The state holds i_b for every phrase: the length of the longest suffix of the output
    since the last reset that is a proper prefix of P_b.
  * Failure links: pi(i) = length of the longest proper border of P[:i] (pi(0) = -1), with
    the shortcut pi'(i) = pi'(pi(i)) if P[pi(i)] == P[i] else pi(i). The failure *chain* of
    state i is i, pi'(i), pi'(pi'(i)), ... (down to -1). After token x the new match length
    is k + 1 for the first (= longest) chain element k with P[k] == x, else 0; the
    shortcut only drops elements whose token an earlier element already has. With
    `chain_tokens[b, i, c] = P_b[k_c]` and `chain_lengths[b, i, c] = k_c + 1` this is a max
    over the chain axis.
  * If x completes some phrase (new length == its length), every phrase restarts at 0:
    matches never overlap.
  * Blank (token 0) changes nothing and earns nothing.

Scoring (a potential, so bonuses telescope):
  * r(state) = max_b w_b * i_b and Phi(state) = delta * m(state) * r(state), m = 1, or the
    prefix multiplier lambda while the prefix flag is on (below).
  * The bonus of token x is mu(after x) - Phi(before x), where mu(after x) is Phi of the new
    state before the reset; if x completes phrases, only the completed phrases count:
    r(after x) = max over the completed b of w_b * len(P_b) (partial matches of the other
    phrases are dropped by the reset, so they earn nothing). Hence each extending token
    earns +delta * w, a broken partial match gives back what it earned, and the bonuses of
    an utterance sum to delta * sum over completed phrases of m * w_b * len(P_b).
  * End of utterance: a pending partial match is cancelled, final bonus = -Phi(state).

Prefix (carrier phrase) boosting, paper Sec. 2.4. A second phrase table of prefixes
("call ", "play ") is matched by the same KMP machinery in the same state (prefixes reset
only on their own completion). A boolean flag `active` scales the biasing potential by
lambda. With pc(x) = "x completes a prefix" and r' = r(after x):
    active_mid = pc(x) or (active and r' > 0)     # flag in force for mu(after x)
    active'    = pc(x) or (active and r' > 0 and x completes no biasing phrase)
So the flag turns on when a prefix completes, stays on while a biasing phrase is partially
matched, and turns off when a biasing phrase completes (which is paid with lambda) or when
after a token no biasing phrase is partially matched (a match broken back to 0, or none
started right after the prefix). A biasing phrase must therefore start at the token right
after the prefix; put the separator (a space in a byte vocabulary) in the prefix or the
phrase. Since Phi uses the flag of the state, the bonuses still telescope.

Whole-vocabulary bonus (shallow fusion) without a [hyps, vocab, phrases] tensor: r(after x)
for every x is a scatter-max of w_b * chain_lengths into a [hyps, vocab] array over all
(phrase, chain element) pairs (tokens on no chain get 0), done twice: once for the pairs
that complete their phrase and once for the rest, and pc(x) is a scatter of the prefix
pairs that complete their prefix. Cost O(hyps * phrases * chain + hyps * vocab).
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

# Phrase tables.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PhraseTable:
  """Padded phrases and their KMP failure chains. An optional leading [batch] axis (written
  `...` below) holds one phrase list per utterance.

  tokens: [..., phrases, max_len] int32 token ids, -1 after each phrase's length.
  lengths: [..., phrases] int32, 0 for an empty (padding) slot.
  weights: [..., phrases] float32 > 0, w_b of the potential.
  chain_tokens: [..., phrases, max_len, chain] int32: for match state i, the tokens P[k] of
    the failure chain k = i, pi'(i), ...; -1 as padding and for states i >= length.
  chain_lengths: [..., phrases, max_len, chain] int32: k + 1 for those elements, 0 as padding.
  vocab_size: token ids are in [1, vocab_size); 0 is the blank.
  """
  tokens: jax.Array
  lengths: jax.Array
  weights: jax.Array
  chain_tokens: jax.Array
  chain_lengths: jax.Array
  vocab_size: int = dataclasses.field(metadata=dict(static=True))

  @property
  def batched(self) -> bool:
    return self.lengths.ndim == 2

  @property
  def chain_width(self) -> int:
    return self.chain_tokens.shape[-1]


def select_phrases(table: PhraseTable, indices: jax.Array) -> PhraseTable:
  """The rows `indices` of a batched table: PhraseTable [batch, K, ...] from [batch, phrases, ...] and
  indices [batch, K] int (e.g. the phrases a NAM filter kept). An index outside [0, phrases) gives an
  empty slot (length 0)."""
  if not table.batched or indices.ndim != 2 or indices.shape[0] != table.lengths.shape[0]:
    raise ValueError(f"select_phrases needs a batched table and indices [batch, K]; got lengths "
                     f"{table.lengths.shape} and indices {indices.shape}.")
  inside = (indices >= 0) & (indices < table.lengths.shape[1])
  safe = jnp.where(inside, indices, 0)

  def take(x, empty):  # an outside index reads as an empty slot (as phrase_table_from_padded pads)
    rows = jnp.take_along_axis(x, safe.reshape(safe.shape + (1,) * (x.ndim - 2)), axis=1)
    return jnp.where(inside.reshape(inside.shape + (1,) * (x.ndim - 2)), rows, empty)

  return dataclasses.replace(table, tokens=take(table.tokens, -1), lengths=take(table.lengths, 0),
                             weights=take(table.weights, 1.0), chain_tokens=take(table.chain_tokens, -1),
                             chain_lengths=take(table.chain_lengths, 0))


def failure_function(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """KMP failure links of padded phrases, vectorized over phrases (NumPy, build time).

  Args:
    tokens: [phrases, max_len] int token ids (any padding value after each phrase).
  Returns:
    (pi, shortcut), each [phrases, max_len] int32: pi[b, i] = length of the longest proper
    border of P_b[:i] (-1 for i = 0); shortcut[b, i] = pi'(i) = pi'(pi(i)) if
    P_b[pi(i)] == P_b[i] else pi(i) (-1 for i = 0). Entries at i >= len(P_b) are unused.
  """
  tokens = np.asarray(tokens, np.int64)
  count, max_len = tokens.shape
  rows = np.arange(count)
  pi = np.full((count, max_len), -1, np.int32)
  for i in range(1, max_len):
    k, previous = pi[:, i - 1].copy(), tokens[:, i - 1]
    for _ in range(i):  # each step strictly shortens k
      mismatch = (k >= 0) & (tokens[rows, np.maximum(k, 0)] != previous)
      if not mismatch.any():
        break
      k = np.where(mismatch, pi[rows, np.maximum(k, 0)], k)
    pi[:, i] = k + 1
  shortcut = np.full((count, max_len), -1, np.int32)
  for i in range(1, max_len):
    border = pi[:, i]
    shortcut[:, i] = np.where(tokens[rows, border] == tokens[:, i], shortcut[rows, border], border)
  return pi, shortcut


def _failure_chains(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Chain positions [phrases, max_len, max_len] (-1 padded) of every state, and the chain length
  [phrases, max_len] of each, from tokens [phrases, max_len] and lengths [phrases]."""
  count, max_len = tokens.shape
  _, shortcut = failure_function(tokens)
  rows = np.arange(count)[:, None]
  state = np.broadcast_to(np.arange(max_len), (count, max_len))
  position = np.where(state < lengths[:, None], state, -1)
  chain = []
  for _ in range(max_len):  # a chain strictly decreases, so it has at most max_len elements
    chain.append(position)
    position = np.where(position >= 0, shortcut[rows, np.maximum(position, 0)], -1)
  chain = np.stack(chain, axis=-1)
  return chain, (chain >= 0).sum(-1)


def phrase_table_from_padded(tokens: np.ndarray, mask: np.ndarray, vocab_size: int, *,
                             weights: np.ndarray | None = None, chain_width: int | None = None) -> PhraseTable:
  """PhraseTable from padded phrase arrays (no leading axis, or a [batch] axis).

  Args:
    tokens: [..., phrases, max_len] int token ids (anything where mask is False).
    mask: [..., phrases, max_len] bool, True on a prefix of each phrase (an all-False row is
      an empty slot).
    vocab_size: ids must be in [1, vocab_size) (0 is the blank).
    weights: optional [..., phrases] positive floats (default 1).
    chain_width: pad the chain axis to this width (fixed shapes: one compilation for all
      phrase lists); None = the longest chain of these phrases.
  """
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

  flat_tokens = np.where(mask, tokens, -1).reshape(-1, tokens.shape[-1]).astype(np.int32)
  flat_lengths = lengths.reshape(-1)
  chain, chain_sizes = _failure_chains(flat_tokens, flat_lengths)
  longest = max(1, int(chain_sizes.max(initial=0)))
  if chain_width is None:
    chain_width = longest
  elif longest > chain_width:
    phrase = int(np.argmax(chain_sizes.max(-1)))
    raise ValueError(f"phrase {flat_tokens[phrase, :flat_lengths[phrase]].tolist()} has a failure chain of "
                     f"{longest} elements, more than chain_width={chain_width}.")
  chain = np.pad(chain[..., :longest], [(0, 0), (0, 0), (0, chain_width - longest)], constant_values=-1)
  rows = np.arange(len(flat_tokens))[:, None, None]
  chain_tokens = np.where(chain >= 0, flat_tokens[rows, np.maximum(chain, 0)], -1)
  shape = tokens.shape + (chain_width,)
  return PhraseTable(tokens=jnp.asarray(flat_tokens.reshape(tokens.shape)),
                     lengths=jnp.asarray(lengths, jnp.int32),
                     weights=jnp.asarray(weights),
                     chain_tokens=jnp.asarray(chain_tokens.reshape(shape), jnp.int32),
                     chain_lengths=jnp.asarray((chain + 1).reshape(shape), jnp.int32),
                     vocab_size=int(vocab_size))


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


def _table_from_lists(phrase_lists: Sequence[Sequence[Sequence[int]]], names: Sequence[Sequence[str]],
                      weights: Sequence[Sequence[float]] | None, vocab_size: int, max_phrases: int | None,
                      max_phrase_length: int | None, chain_width: int | None, batched: bool) -> PhraseTable:
  if weights is not None and len(weights) != len(phrase_lists):
    raise ValueError(f"got {len(weights)} weight lists for {len(phrase_lists)} phrase lists.")
  for name, limit in (("max_phrases", max_phrases), ("max_phrase_length", max_phrase_length),
                      ("chain_width", chain_width)):
    if limit is not None and limit < 1:
      raise ValueError(f"{name} must be >= 1 (or None), got {limit}.")
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
  if not batched:
    tokens, mask, weight_array = tokens[0], mask[0], weight_array[0]
  return phrase_table_from_padded(tokens, mask, vocab_size, weights=weight_array, chain_width=chain_width)


def make_phrase_table(phrases: Sequence[Sequence[int]], vocab_size: int, *, weights: Sequence[float] | None = None,
                      max_phrases: int | None = None, max_phrase_length: int | None = None,
                      chain_width: int | None = None) -> PhraseTable:
  """PhraseTable (no batch axis: shared by every utterance) from token-id phrases.

  Empty phrases and duplicates are dropped with a warning; an id outside [1, vocab_size),
  a phrase longer than max_phrase_length or more than max_phrases phrases is a ValueError.
  The arrays are padded to max_phrases x max_phrase_length when given (else to the data).
  """
  return _table_from_lists([phrases], [[str(list(p)) for p in phrases]], None if weights is None else [weights],
                           vocab_size, max_phrases, max_phrase_length, chain_width, batched=False)


def make_batched_phrase_table(phrase_lists: Sequence[Sequence[Sequence[int]]], vocab_size: int, *,
                              weights: Sequence[Sequence[float]] | None = None, max_phrases: int | None = None,
                              max_phrase_length: int | None = None, chain_width: int | None = None) -> PhraseTable:
  """PhraseTable with a leading [batch] axis: phrase_lists[u] biases utterance u (see `make_phrase_table`)."""
  names = [[f"{list(p)} (utterance {u})" for p in phrases] for u, phrases in enumerate(phrase_lists)]
  return _table_from_lists(phrase_lists, names, weights, vocab_size, max_phrases, max_phrase_length, chain_width,
                           batched=True)


# Matching and scoring.


class KmpState(NamedTuple):
  """Match state of a set of hypotheses with leading shape S.

  match: S + [phrases] int32, i_b per biasing phrase.
  prefix_match: S + [prefixes] int32 (zero width without a prefix table).
  active: S bool, the prefix flag.
  """
  match: jax.Array
  prefix_match: jax.Array
  active: jax.Array


def _chains(table: PhraseTable, match: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Failure-chain tokens and lengths [n, phrases, chain] of the states match [n, phrases] (unbatched table)."""
  phrase = jnp.arange(match.shape[-1])
  return table.chain_tokens[phrase, match], table.chain_lengths[phrase, match]


def _step_matches(table: PhraseTable, match: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """New match lengths [n, phrases] (before any reset) and which phrases tokens [n] complete."""
  chain_tokens, chain_lengths = _chains(table, match)
  new = jnp.max(jnp.where(chain_tokens == tokens[:, None, None], chain_lengths, 0), axis=-1)
  return new, (new == table.lengths) & (table.lengths > 0)


def _raw_potential(table: PhraseTable, match: jax.Array) -> jax.Array:
  """r = max_b w_b * i_b, [n] from match [n, phrases]."""
  return jnp.max(table.weights * match.astype(jnp.float32), axis=-1)


class _Scorer(NamedTuple):
  """The per-utterance computations; tables unbatched, states [n, ...]."""
  table: PhraseTable
  prefix_table: PhraseTable | None
  bonus_per_token: Any
  prefix_multiplier: Any

  def scaled(self, raw: jax.Array, active: jax.Array) -> jax.Array:
    return self.bonus_per_token * jnp.where(active, self.prefix_multiplier, 1.0) * raw

  def potential(self, state: KmpState) -> jax.Array:
    return self.scaled(_raw_potential(self.table, state.match), state.active)

  def advance(self, state: KmpState, tokens: jax.Array) -> tuple[KmpState, jax.Array]:
    new, completed = _step_matches(self.table, state.match, tokens)
    any_completed = jnp.any(completed, axis=-1)
    full = jnp.max(jnp.where(completed, self.table.weights * self.table.lengths.astype(jnp.float32), 0.0), -1)
    raw_after = jnp.where(any_completed, full, _raw_potential(self.table, new))
    prefix_match, prefix_completed = state.prefix_match, jnp.zeros_like(any_completed)
    if self.prefix_table is not None:
      prefix_new, prefix_done = _step_matches(self.prefix_table, state.prefix_match, tokens)
      prefix_completed = jnp.any(prefix_done, axis=-1)
      prefix_match = jnp.where(prefix_completed[:, None], 0, prefix_new)
    continuing = state.active & (raw_after > 0)
    bonus = self.scaled(raw_after, prefix_completed | continuing) - self.potential(state)
    advanced = KmpState(match=jnp.where(any_completed[:, None], 0, new), prefix_match=prefix_match,
                        active=prefix_completed | (continuing & ~any_completed))
    is_blank = tokens == BLANK_ID
    advanced = jax.tree.map(
        lambda a, b: jnp.where(is_blank.reshape(is_blank.shape + (1,) * (a.ndim - 1)), b, a), advanced, state)
    return advanced, jnp.where(is_blank, 0.0, bonus)

  def token_bonus(self, state: KmpState) -> jax.Array:
    n, vocab = state.match.shape[0], self.table.vocab_size
    rows = jnp.arange(n)[:, None, None]

    def scatter_max(chain_tokens, values):  # values [n, phrases, chain] -> [n, vocab]; -1 tokens dropped
      columns = jnp.where(chain_tokens >= 0, chain_tokens, vocab)
      return jnp.zeros((n, vocab + 1), values.dtype).at[rows, columns].max(values)[:, :vocab]

    chain_tokens, chain_lengths = _chains(self.table, state.match)
    completes = (chain_lengths == self.table.lengths[:, None]) & (chain_lengths > 0)
    value = self.table.weights[:, None] * chain_lengths.astype(jnp.float32)
    full = scatter_max(chain_tokens, jnp.where(completes, value, 0.0))
    raw_after = jnp.where(full > 0, full, scatter_max(chain_tokens, jnp.where(completes, 0.0, value)))
    prefix_completed = jnp.zeros((n, vocab), bool)
    if self.prefix_table is not None:
      prefix_tokens, prefix_lengths = _chains(self.prefix_table, state.prefix_match)
      prefix_completes = (prefix_lengths == self.prefix_table.lengths[:, None]) & (prefix_lengths > 0)
      prefix_completed = scatter_max(prefix_tokens, prefix_completes.astype(jnp.int32)) > 0
    active_after = prefix_completed | (state.active[:, None] & (raw_after > 0))
    bonus = self.scaled(raw_after, active_after) - self.potential(state)[:, None]
    return bonus.at[:, BLANK_ID].set(0.0)


@dataclasses.dataclass(frozen=True)
class KmpBooster:
  """KMP phrase boosting over hypotheses with any leading shape S (see the module docstring).

  A batched table (or prefix table) needs S[0] == its batch size: row u of the state uses
  phrase list u.

  table: the biasing phrases.
  bonus_per_token: delta (a float or a traced scalar).
  prefix_table: optional carrier phrases whose completion turns the multiplier on.
  prefix_multiplier: lambda.
  """
  table: PhraseTable
  bonus_per_token: Any
  prefix_table: PhraseTable | None = None
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
    sizes = {t.lengths.shape[0] for t in (self.table, self.prefix_table) if t is not None and t.batched}
    if len(sizes) > 1:
      raise ValueError(f"table and prefix_table have different batch sizes {sorted(sizes)}.")
    return sizes.pop() if sizes else None

  def _apply(self, method: str, state: KmpState, *args: jax.Array) -> Any:
    """Runs _Scorer.method with states flattened to [n, ...] (vmapped over a batched table's axis)."""
    shape = state.active.shape
    batch = self._batch_size()

    def run(table, prefix_table, state, *args):
      scorer = _Scorer(table, prefix_table, self.bonus_per_token, self.prefix_multiplier)
      return getattr(scorer, method)(state, *args)

    if batch is None:
      flat = lambda x: x.reshape((math.prod(shape),) + x.shape[len(shape):])  # noqa: E731
      out = run(self.table, self.prefix_table, jax.tree.map(flat, state), *map(flat, args))
      return jax.tree.map(lambda x: x.reshape(shape + x.shape[1:]), out)
    if not shape or shape[0] != batch:
      raise ValueError(f"the phrase table holds {batch} phrase lists but the hypotheses have shape {shape}; "
                       "their leading axis must be the batch.")
    flat = lambda x: x.reshape((batch, math.prod(shape[1:])) + x.shape[len(shape):])  # noqa: E731
    axis = lambda t: None if t is None or not t.batched else 0  # noqa: E731
    out = jax.vmap(run, in_axes=(axis(self.table), axis(self.prefix_table), 0) + (0,) * len(args))(
        self.table, self.prefix_table, jax.tree.map(flat, state), *map(flat, args))
    return jax.tree.map(lambda x: x.reshape(shape + x.shape[2:]), out)

  def init(self, shape: tuple[int, ...]) -> KmpState:
    """Every phrase unmatched, flag off; leaves shape + [...]."""
    shape = tuple(shape)
    batch = self._batch_size()
    if batch is not None and (not shape or shape[0] != batch):
      raise ValueError(f"the phrase table holds {batch} phrase lists but the hypotheses have shape {shape}; "
                       "their leading axis must be the batch.")
    prefixes = 0 if self.prefix_table is None else self.prefix_table.lengths.shape[-1]
    return KmpState(match=jnp.zeros(shape + (self.table.lengths.shape[-1],), jnp.int32),
                    prefix_match=jnp.zeros(shape + (prefixes,), jnp.int32),
                    active=jnp.zeros(shape, bool))

  def potential(self, state: KmpState) -> jax.Array:
    """Phi(state), [S] float32."""
    return self._apply("potential", state)

  def advance(self, state: KmpState, tokens: jax.Array) -> tuple[KmpState, jax.Array]:
    """State after tokens [S] int32 and the bonus [S] they earn (blank: unchanged, 0)."""
    return self._apply("advance", state, jnp.asarray(tokens, jnp.int32))

  def token_bonus(self, state: KmpState) -> jax.Array:
    """Bonus [S, vocab] of every token (blank column 0), equal to `advance`'s bonus for that token."""
    return self._apply("token_bonus", state)

  def final_bonus(self, state: KmpState) -> jax.Array:
    """End-of-utterance correction [S]: cancels a pending partial match."""
    return -self.potential(state)


def kmp_fusion(table: PhraseTable, bonus_per_token: Any, mode: str = "shallow", *,
               prefix_table: PhraseTable | None = None, prefix_multiplier: Any = 1.0) -> ScoreFusion:
  """KMP phrase boosting as a `ScoreFusion` for `beam_search` (state leaves [batch, beam, ...]).

  Args:
    table: biasing phrases; with a leading batch axis, phrase list u biases utterance u.
    bonus_per_token: delta, the bonus of each matched token.
    mode: 'shallow' (the whole-vocabulary bonus is added before pruning) or 'rescore'
      (survivors of pruning get the bonus of the token they emitted).
    prefix_table: optional carrier phrases ("call ", "play ") that turn on prefix_multiplier.
    prefix_multiplier: lambda, multiplies the bonuses of a phrase right after a prefix.
  """
  booster = KmpBooster(table, bonus_per_token, prefix_table, prefix_multiplier)
  return ScoreFusion(init=lambda batch, beam: booster.init((batch, beam)), token_bonus=booster.token_bonus,
                     advance=booster.advance, final_bonus=booster.final_bonus, mode=mode)


def sequence_bonuses(phrases: Sequence[Sequence[int]], tokens: Sequence[int], bonus_per_token: float, *,
                     weights: Sequence[float] | None = None, prefixes: Sequence[Sequence[int]] | None = None,
                     prefix_multiplier: float = 1.0) -> np.ndarray:
  """Bonuses a token sequence earns, for debugging a phrase list (same code as the beam search).

  Args:
    phrases: biasing phrases as token-id lists (ids >= 1).
    tokens: the output token ids (0 = blank: no change, no bonus).
    bonus_per_token: delta.
    weights, prefixes, prefix_multiplier: optional phrase weights, carrier phrases and lambda.
  Returns:
    [len(tokens) + 1] float32: the bonus of each token, then the end-of-utterance correction.
  """
  tokens = [int(t) for t in tokens]
  if any(t < 0 for t in tokens):
    raise ValueError(f"token ids must be >= 0, got {tokens}.")
  vocab_size = 1 + max([0] + tokens + [int(t) for p in list(phrases) + list(prefixes or []) for t in p])
  table = make_phrase_table(phrases, vocab_size, weights=weights)
  prefix_table = None if prefixes is None else make_phrase_table(prefixes, vocab_size)
  booster = KmpBooster(table, bonus_per_token, prefix_table, prefix_multiplier)

  @jax.jit
  def run(token_array):
    def step(state, token):
      return booster.advance(state, token[None])
    state, bonuses = jax.lax.scan(step, booster.init((1,)), token_array)
    return jnp.concatenate([bonuses[:, 0], booster.final_bonus(state)])

  return np.asarray(run(jnp.asarray(tokens, jnp.int32).reshape(-1)))
