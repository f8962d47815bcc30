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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlm_jax.decoding.boosting import (BoostState, PhraseBooster, check_padded_phrases, padded_phrase_lists,
                                         phrase_fusion)
from memlm_jax.decoding.transducer_beam import ScoreFusion

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

  @property
  def batch_size(self) -> int | None:
    return self.lengths.shape[0] if self.batched else None

  # The phrase-matcher interface of decoding/boosting.py (one list; states [n, phrases]).

  def initial_match(self, shape: tuple[int, ...]) -> jax.Array:
    return jnp.zeros(tuple(shape) + (self.lengths.shape[-1],), jnp.int32)

  def raw_potential(self, match: jax.Array) -> jax.Array:
    return _raw_potential(self, match)

  def step(self, match: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _kmp_step(self, match, tokens)

  def vocab_step(self, match: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _kmp_vocab_step(self, match)


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
  tokens, mask, lengths, weights = check_padded_phrases(tokens, mask, vocab_size, weights)

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
  arrays = dict(tokens=flat_tokens.reshape(tokens.shape), lengths=lengths.astype(np.int32),
                weights=weights.astype(np.float32), chain_tokens=chain_tokens.reshape(shape).astype(np.int32),
                chain_lengths=(chain + 1).reshape(shape).astype(np.int32))
  # device_put, not jnp.asarray: the latter compiles a copy for every new array shape.
  return PhraseTable(**jax.device_put(arrays), vocab_size=int(vocab_size))


def _table_from_lists(phrase_lists: Sequence[Sequence[Sequence[int]]], names: Sequence[Sequence[str]],
                      weights: Sequence[Sequence[float]] | None, vocab_size: int, max_phrases: int | None,
                      max_phrase_length: int | None, chain_width: int | None, batched: bool) -> PhraseTable:
  if chain_width is not None and chain_width < 1:
    raise ValueError(f"chain_width must be >= 1 (or None), got {chain_width}.")
  tokens, mask, weight_array = padded_phrase_lists(phrase_lists, vocab_size, weights=weights, max_phrases=max_phrases,
                                                   max_phrase_length=max_phrase_length, names=names)
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


KmpState = BoostState  # match: S + [phrases], i_b per biasing phrase; prefix_match: S + [prefixes]
KmpBooster = PhraseBooster  # over PhraseTables: KMP boosting (see the module docstring)


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


def _kmp_step(table: PhraseTable, match: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The matcher step (decoding/boosting.py) of an unbatched table: match [n, phrases], tokens [n]."""
  new, completed = _step_matches(table, match, tokens)
  any_completed = jnp.any(completed, axis=-1)
  full = jnp.max(jnp.where(completed, table.weights * table.lengths.astype(jnp.float32), 0.0), -1)
  raw_after = jnp.where(any_completed, full, _raw_potential(table, new))
  return jnp.where(any_completed[:, None], 0, new), raw_after, any_completed


def _kmp_vocab_step(table: PhraseTable, match: jax.Array) -> tuple[jax.Array, jax.Array]:
  """r(after x) and completed, [n, vocab] each, for every token x (a scatter-max over the chains)."""
  n, vocab = match.shape[0], table.vocab_size
  rows = jnp.arange(n)[:, None, None]

  def scatter_max(chain_tokens, values):  # values [n, phrases, chain] -> [n, vocab]; -1 tokens dropped
    columns = jnp.where(chain_tokens >= 0, chain_tokens, vocab)
    return jnp.zeros((n, vocab + 1), values.dtype).at[rows, columns].max(values)[:, :vocab]

  chain_tokens, chain_lengths = _chains(table, match)
  completes = (chain_lengths == table.lengths[:, None]) & (chain_lengths > 0)
  value = table.weights[:, None] * chain_lengths.astype(jnp.float32)
  full = scatter_max(chain_tokens, jnp.where(completes, value, 0.0))
  raw_after = jnp.where(full > 0, full, scatter_max(chain_tokens, jnp.where(completes, 0.0, value)))
  return raw_after, full > 0


def kmp_fusion(table: PhraseTable, bonus_per_token: Any, mode: str = "shallow", *,
               prefix_table: PhraseTable | None = None, prefix_multiplier: Any = 1.0) -> ScoreFusion:
  """KMP phrase boosting as a `ScoreFusion` for `beam_search` (boosting.phrase_fusion over PhraseTables).

  Args:
    table: biasing phrases; with a leading batch axis, phrase list u biases utterance u.
    bonus_per_token: delta, the bonus of each matched token.
    mode: 'shallow' (the whole-vocabulary bonus is added before pruning) or 'rescore'
      (survivors of pruning get the bonus of the token they emitted).
    prefix_table: optional carrier phrases ("call ", "play ") that turn on prefix_multiplier.
    prefix_multiplier: lambda, multiplies the bonuses of a phrase right after a prefix.
  """
  return phrase_fusion(table, bonus_per_token, mode, prefix_table=prefix_table, prefix_multiplier=prefix_multiplier)


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
