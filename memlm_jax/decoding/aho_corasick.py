"""Phrase boosting with an Aho-Corasick automaton in arrays: the same bonuses as decoding/kmp.py,
at a per-step cost that does not grow with the number of phrases.

KMP keeps one match length i_b per phrase. The automaton keeps one node per hypothesis: the trie
node of the longest suffix of the output (since the last reset) that is a prefix of some phrase.
Every suffix of the output that is a prefix of a phrase lies on that node's failure chain (node,
fail(node), ..., root), so KMP's state is a function of the node:

  * i_b = the depth of the deepest chain node that is a prefix of P_b;
  * r(node) = max_b w_b * i_b = max over chain nodes u of depth(u) * (the largest weight of the
    phrases through u), precomputed per node in breadth-first order as
    r(v) = max(depth(v) * subtree_weight(v), r(fail(v)));
  * a token completes phrase b when P_b is a suffix of the new output, i.e. a node on the new
    node's chain ends P_b; what it pays, max over those b of w_b * len(P_b), is precomputed as
    o(v) = max(end_value(v), o(fail(v))). Completion resets every match: back to the root.

So a node stores r(v) or, if o(v) > 0, o(v) (`after`: r(after x) of the scoring rules) and a
`completes` flag, and everything in decoding/boosting.py applies unchanged.

Arrays (built on the host in NumPy, vectorized per trie level; node ids in breadth-first order,
depth-major, so a deeper node has a larger id and within one depth the nodes are sorted by their
prefix): the trie edges sorted by (parent, token), so edge k leads to node k + 1 and the children of
node u are the contiguous edges child_start[u] .. child_start[u + 1]; failure links; depths; the
per-node values; and a dense [vocab] row of the root's children.

Per step and hypothesis:
  * goto(v, x): the deepest node u on v's chain with a child x (a binary search of x in each
    non-root chain node's edges, at most max_depth of them, then the root's dense row). Cost
    O(max_depth * log2(fanout_width)).
  * every token at once (shallow fusion): the children of the non-root chain nodes, scattered
    into a [vocab] row with a max over node ids (the deepest wins: deeper nodes have larger ids),
    over the root's row. Cost O(vocab + max_depth * fanout_width).
fanout_width is the most children of a non-root node (padded to a power of two, one compilation
for many lists); it is bounded by the vocabulary and by the phrases that share a prefix, not by
the number of phrases. Static shapes throughout, no host callback per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memlm_jax.decoding.boosting import check_padded_phrases, padded_phrase_lists, phrase_fusion
from memlm_jax.decoding.transducer_beam import ScoreFusion

ROOT = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PhraseAutomaton:
  """An Aho-Corasick automaton of one phrase list, or (leading axis `...` = [batch]) one per utterance,
  padded to the same number of node slots.

  child_start: [..., nodes + 1] int32: node u's children are the edges child_start[u] ..
    child_start[u + 1] - 1 (edge k leads to node k + 1).
  edge_tokens: [..., nodes] int32, the token of each edge, ascending within a node's edges (the
    last slot and unused ones: vocab_size).
  fail: [..., nodes] int32, the failure link (the root's: the root).
  after: [..., nodes] float32, r(after) of entering the node: o(v) if it completes a phrase, else r(v).
  completes: [..., nodes] bool, entering the node completes at least one phrase.
  root_children: [..., vocab] int32, the root's child for each token (ROOT where none).
  vocab_size: token ids are in [1, vocab_size); 0 is the blank.
  max_depth: the longest phrase (the longest failure chain below the root).
  fanout_width: the most children of a non-root node, padded.
  """
  child_start: jax.Array
  edge_tokens: jax.Array
  fail: jax.Array
  after: jax.Array
  completes: jax.Array
  root_children: jax.Array
  vocab_size: int = dataclasses.field(metadata=dict(static=True))
  max_depth: int = dataclasses.field(metadata=dict(static=True))
  fanout_width: int = dataclasses.field(metadata=dict(static=True))

  @property
  def batched(self) -> bool:
    return self.fail.ndim == 2

  @property
  def batch_size(self) -> int | None:
    return self.fail.shape[0] if self.batched else None

  @property
  def num_nodes(self) -> int:
    """Node slots (the root, the trie nodes, padding)."""
    return self.fail.shape[-1]

  @property
  def nbytes(self) -> int:
    """Device memory of the arrays."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self))

  # The phrase-matcher interface of decoding/boosting.py (one list; states [n] node ids).

  def initial_match(self, shape: tuple[int, ...]) -> jax.Array:
    return jnp.full(tuple(shape), ROOT, jnp.int32)

  def raw_potential(self, match: jax.Array) -> jax.Array:
    return self.after[match]  # a state is never a completing node (those reset to the root)

  def step(self, match: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    node = self._goto(match, tokens)
    completed = self.completes[node]
    return jnp.where(completed, ROOT, node), self.after[node], completed

  def vocab_step(self, match: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, vocab, width = match.shape[0], self.vocab_size, self.fanout_width
    chain = self._chain(match)  # [n, depth]
    first = self.child_start[chain]
    edge = first[..., None] + jnp.arange(width)  # [n, depth, width]
    valid = (chain[..., None] != ROOT) & (edge < self.child_start[chain + 1][..., None])
    edge = jnp.where(valid, edge, 0)
    columns = jnp.where(valid, self.edge_tokens[edge], vocab)
    deepest = jnp.zeros((n, vocab + 1), jnp.int32).at[jnp.arange(n)[:, None, None], columns].max(
        jnp.where(valid, edge + 1, ROOT))[:, :vocab]
    node = jnp.where(deepest != ROOT, deepest, self.root_children[None, :])
    return self.after[node], self.completes[node]

  def _chain(self, node: jax.Array) -> jax.Array:
    """[n, max_depth]: node, fail(node), ... (ROOT once the root is reached) from node [n]."""
    chain = [node]
    for _ in range(self.max_depth - 1):
      chain.append(self.fail[chain[-1]])
    return jnp.stack(chain, axis=-1)

  def _child(self, node: jax.Array, tokens: jax.Array) -> jax.Array:
    """node's child for tokens (ROOT where none): a lower-bound binary search of its edges."""
    low, end = self.child_start[node], self.child_start[node + 1]
    high = end
    last = self.edge_tokens.shape[-1] - 1
    for _ in range(max(1, self.fanout_width.bit_length())):
      middle = (low + high) // 2
      right = (low < high) & (self.edge_tokens[jnp.minimum(middle, last)] < tokens)
      low, high = jnp.where(right, middle + 1, low), jnp.where(right | (low >= high), high, middle)
    found = (low < end) & (self.edge_tokens[jnp.minimum(low, last)] == tokens)
    return jnp.where(found, low + 1, ROOT)

  def _goto(self, node: jax.Array, tokens: jax.Array) -> jax.Array:
    """The node after tokens [n] from node [n]: the child of the deepest chain node that has one."""
    chain = self._chain(node)
    children = self._child(chain, tokens[:, None])
    deepest = jnp.max(jnp.where(chain != ROOT, children, ROOT), axis=-1)
    return jnp.where(deepest != ROOT, deepest, self.root_children[jnp.clip(tokens, 0, self.vocab_size - 1)])


# Building (host, NumPy).


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _build(tokens: np.ndarray, lengths: np.ndarray, weights: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
  """The automaton arrays of one list: tokens [phrases, max_len] (any value past each length), lengths
  [phrases] (0 = an empty slot, skipped), weights [phrases]. Unpadded: nodes = 1 + trie nodes."""
  keep = lengths > 0
  tokens, lengths, weights = tokens[keep].astype(np.int64), lengths[keep], weights[keep].astype(np.float32)
  count, max_len = tokens.shape
  inside = np.arange(max_len) < lengths[:, None]
  tokens = np.where(inside, tokens, -1)
  order = np.lexsort(tokens.T[::-1]) if count else np.zeros(0, np.int64)
  tokens, lengths, weights, inside = tokens[order], lengths[order], weights[order], inside[order]
  # Row b's prefix of length d + 1 is a new node unless row b - 1 shares it.
  same = np.zeros((count, max_len), bool)
  if count > 1:
    same[1:] = np.logical_and.accumulate(tokens[1:] == tokens[:-1], axis=1)
  new = inside & ~same
  # Ids in depth-major order: depth 1 first, within a depth by row (= by prefix).
  ids = np.zeros((count, max_len), np.int64)
  ids.T[new.T] = 1 + np.arange(int(new.sum()))
  last_new = np.maximum.accumulate(np.where(new, np.arange(count)[:, None], -1), axis=0)
  node_at = np.where(inside, ids[np.maximum(last_new, 0), np.arange(max_len)], ROOT)  # [count, max_len]
  num_nodes = 1 + int(new.sum())
  depth = np.zeros(num_nodes, np.int64)
  parent = np.zeros(num_nodes, np.int64)
  token_of = np.zeros(num_nodes, np.int64)
  rows, cols = np.nonzero(new)
  depth[ids[rows, cols]] = cols + 1
  parent[ids[rows, cols]] = np.where(cols > 0, node_at[rows, np.maximum(cols - 1, 0)], ROOT)
  token_of[ids[rows, cols]] = tokens[rows, cols]
  # Edge k = node k + 1, sorted by (parent, token) by construction.
  edge_parent, edge_tokens = parent[1:], token_of[1:]
  child_start = np.searchsorted(edge_parent, np.arange(num_nodes + 1), side="left")
  child_start[0] = 0
  keys = edge_parent * vocab_size + edge_tokens

  def goto(nodes, toks):  # the child of nodes for toks, -1 where none
    key = nodes * vocab_size + toks
    if not len(keys):
      return np.full(key.shape, -1)
    at = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
    return np.where(keys[at] == key, at + 1, -1)

  subtree_weight = np.zeros(num_nodes, np.float32)
  np.maximum.at(subtree_weight, node_at[inside], np.broadcast_to(weights[:, None], inside.shape)[inside])
  end_value = np.zeros(num_nodes, np.float32)
  ends = node_at[np.arange(count), np.maximum(lengths - 1, 0)]
  np.maximum.at(end_value, ends, weights * lengths.astype(np.float32))

  fail = np.zeros(num_nodes, np.int64)
  potential = np.zeros(num_nodes, np.float32)
  output = np.zeros(num_nodes, np.float32)
  for d in range(1, max_len + 1):
    level = np.nonzero(depth == d)[0]
    if d > 1:
      candidate, link = fail[parent[level]], np.full(len(level), -1)
      for _ in range(d):  # each round moves strictly up; the root ends it
        child = goto(candidate, token_of[level])
        link = np.where((link < 0) & (child >= 0), child, link)
        unresolved = link < 0
        if not (unresolved & (candidate != ROOT)).any():
          break
        candidate = np.where(unresolved & (candidate != ROOT), fail[candidate], candidate)
      fail[level] = np.where(link >= 0, link, ROOT)
    potential[level] = np.maximum(d * subtree_weight[level], potential[fail[level]])
    output[level] = np.maximum(end_value[level], output[fail[level]])
  root_children = np.zeros(vocab_size, np.int64)
  first = np.nonzero(depth == 1)[0]
  root_children[token_of[first]] = first
  fanout = np.diff(child_start)[1:] if num_nodes > 1 else np.zeros(0, np.int64)
  return dict(child_start=child_start, edge_tokens=np.append(edge_tokens, vocab_size), fail=fail,
              after=np.where(output > 0, output, potential), completes=output > 0, root_children=root_children,
              max_fanout=int(fanout.max(initial=0)))


def automaton_from_padded(tokens: np.ndarray, mask: np.ndarray, vocab_size: int, *, weights: np.ndarray | None = None,
                          fanout_width: int | None = None, num_nodes: int | None = None) -> PhraseAutomaton:
  """PhraseAutomaton from padded phrase arrays (no leading axis, or a [batch] axis), as
  kmp.phrase_table_from_padded takes them.

  Args:
    tokens: [..., phrases, max_len] int token ids (anything where mask is False).
    mask: [..., phrases, max_len] bool, True on a prefix of each phrase (an all-False row is
      an empty slot).
    vocab_size: ids must be in [1, vocab_size) (0 is the blank).
    weights: optional [..., phrases] positive floats (default 1).
    fanout_width: pad the children of a node to this width (fixed shapes); None = the widest
      node of these phrases, rounded up to a power of two.
    num_nodes: node slots; None = 1 + phrases * max_len (the most a list of this shape can need,
      so every batch of one shape shares one compilation).
  """
  tokens, _, lengths, weights = check_padded_phrases(tokens, mask, vocab_size, weights)
  batched = tokens.ndim == 3
  if not batched:
    tokens, lengths, weights = tokens[None], lengths[None], weights[None]
  capacity = 1 + tokens.shape[1] * tokens.shape[2]
  num_nodes = capacity if num_nodes is None else num_nodes
  built = [_build(t, n, w, vocab_size) for t, n, w in zip(tokens, lengths, weights)]
  needed = max([1] + [len(b["fail"]) for b in built])
  if num_nodes < needed:
    raise ValueError(f"the phrases need {needed} automaton nodes, more than num_nodes={num_nodes}.")
  widest = max([1] + [b["max_fanout"] for b in built])
  if fanout_width is None:
    fanout_width = _next_power_of_two(widest)
  elif fanout_width < widest:
    raise ValueError(f"a node of these phrases has {widest} children, more than fanout_width={fanout_width}.")

  def padded(name, fill, length, dtype):
    return np.stack([np.pad(b[name], (0, length - len(b[name])), constant_values=fill) for b in built]).astype(dtype)

  arrays = dict(
      child_start=np.stack([np.pad(b["child_start"], (0, num_nodes + 1 - len(b["child_start"])), mode="edge")
                            for b in built]).astype(np.int32),
      edge_tokens=padded("edge_tokens", vocab_size, num_nodes, np.int32),
      fail=padded("fail", ROOT, num_nodes, np.int32),
      after=padded("after", 0.0, num_nodes, np.float32),
      completes=padded("completes", False, num_nodes, bool),
      root_children=np.stack([b["root_children"] for b in built]).astype(np.int32))
  if not batched:
    arrays = {k: v[0] for k, v in arrays.items()}
  # device_put, not jnp.asarray: the latter compiles a copy for every new array shape.
  return PhraseAutomaton(**jax.device_put(arrays), vocab_size=int(vocab_size),
                         max_depth=max(1, tokens.shape[-1]), fanout_width=int(fanout_width))


def make_automaton(phrases: Sequence[Sequence[int]], vocab_size: int, *, weights: Sequence[float] | None = None,
                   max_phrases: int | None = None, max_phrase_length: int | None = None,
                   fanout_width: int | None = None) -> PhraseAutomaton:
  """PhraseAutomaton (no batch axis: shared by every utterance) from token-id phrases.

  Empty phrases and duplicates are dropped with a warning; an id outside [1, vocab_size), a phrase
  longer than max_phrase_length or more than max_phrases phrases is a ValueError. Node slots are
  1 + max_phrases * max_phrase_length when both are given, else as many as the phrases need.
  """
  tokens, mask, weight_array = padded_phrase_lists([phrases], vocab_size, weights=None if weights is None else [weights],
                                                   max_phrases=max_phrases, max_phrase_length=max_phrase_length)
  return automaton_from_padded(tokens[0], mask[0], vocab_size, weights=weight_array[0], fanout_width=fanout_width,
                               num_nodes=_node_slots(mask, max_phrases, max_phrase_length))


def make_batched_automaton(phrase_lists: Sequence[Sequence[Sequence[int]]], vocab_size: int, *,
                           weights: Sequence[Sequence[float]] | None = None, max_phrases: int | None = None,
                           max_phrase_length: int | None = None, fanout_width: int | None = None) -> PhraseAutomaton:
  """PhraseAutomaton with a leading [batch] axis: phrase_lists[u] biases utterance u (see `make_automaton`)."""
  names = [[f"{list(p)} (utterance {u})" for p in phrases] for u, phrases in enumerate(phrase_lists)]
  tokens, mask, weight_array = padded_phrase_lists(phrase_lists, vocab_size, weights=weights, max_phrases=max_phrases,
                                                   max_phrase_length=max_phrase_length, names=names)
  return automaton_from_padded(tokens, mask, vocab_size, weights=weight_array, fanout_width=fanout_width,
                               num_nodes=_node_slots(mask, max_phrases, max_phrase_length))


def _node_slots(mask: np.ndarray, max_phrases: int | None, max_phrase_length: int | None) -> int:
  if max_phrases is not None and max_phrase_length is not None:
    return 1 + max_phrases * max_phrase_length
  return 1 + int(mask.sum(axis=(-2, -1)).max(initial=0))


def automaton_fusion(automaton: PhraseAutomaton, bonus_per_token: Any, mode: str = "shallow", *,
                     prefix_automaton: PhraseAutomaton | None = None, prefix_multiplier: Any = 1.0) -> ScoreFusion:
  """Aho-Corasick phrase boosting as a `ScoreFusion` for `beam_search`: kmp.kmp_fusion's bonuses
  (same arguments), at a per-step cost independent of the number of phrases."""
  return phrase_fusion(automaton, bonus_per_token, mode, prefix_table=prefix_automaton,
                       prefix_multiplier=prefix_multiplier)
