"""The Aho-Corasick booster against naive string matching, against the KMP booster, and inside the
transducer beam search; its automaton against a dictionary-built trie."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm_jax.decoding.aho_corasick import (ROOT, automaton_fusion, automaton_from_padded, make_automaton,
                                             make_batched_automaton)
from memlm_jax.decoding.boosting import PhraseBooster
from memlm_jax.decoding.kmp import kmp_fusion, make_batched_phrase_table, make_phrase_table
from tests.boosting_reference import (VOCAB, check_unbounded_beam_scores, naive_bonuses, near_miss_model,
                                      random_phrase_list, random_sequence, rnn_model, search)


@functools.cache
def scan_booster(steps):
  """jit: (tables, delta, lambda, tokens [n, steps]) -> (advance bonuses [n, steps] then the final one,
  token_bonus [steps, n, vocab] at every state reached)."""

  @jax.jit
  def run(table, prefix_table, delta, multiplier, tokens):
    booster = PhraseBooster(table, delta, prefix_table, multiplier)

    def step(state, token):
      every = booster.token_bonus(state)
      state, bonus = booster.advance(state, token)
      return state, (bonus, every)

    state, (bonuses, every) = jax.lax.scan(step, booster.init(tokens.shape[:1]), tokens.T)
    return jnp.concatenate([bonuses.T, booster.final_bonus(state)[:, None]], axis=1), every

  return run


@pytest.mark.parametrize("with_prefixes", [False, True])
def test_bonuses_match_naive_string_matching_and_kmp(with_prefixes):
  """Thousands of random phrase lists (prefixes, suffixes, infixes of each other; weights) and
  sequences: advance bonuses equal the naive reference's, and the whole-vocabulary bonuses at every
  step equal the KMP booster's."""
  rng = np.random.default_rng(10 + with_prefixes)
  count, steps = 2000, 14
  phrase_lists = [random_phrase_list(rng) for _ in range(count)]
  weights = [list(rng.uniform(0.5, 2.0, size=len(p))) for p in phrase_lists]
  prefix_lists = [random_phrase_list(rng, max_count=2, max_len=3) for _ in range(count)]
  tokens = jnp.asarray([random_sequence(rng, phrases + prefixes, steps)
                        for phrases, prefixes in zip(phrase_lists, prefix_lists)], jnp.int32)
  delta, multiplier = jnp.float32(0.7), jnp.float32(2.5 if with_prefixes else 1.0)
  shapes = dict(max_phrases=4, max_phrase_length=6)
  automaton = make_batched_automaton(phrase_lists, VOCAB, weights=weights, **shapes)
  prefix_automaton = make_batched_automaton(prefix_lists, VOCAB, max_phrases=2, max_phrase_length=4)
  bonuses, every = scan_booster(steps)(automaton, prefix_automaton if with_prefixes else None, delta, multiplier,
                                       tokens)
  table = make_batched_phrase_table(phrase_lists, VOCAB, weights=weights, **shapes)
  prefix_table = make_batched_phrase_table(prefix_lists, VOCAB, max_phrases=2, max_phrase_length=4)
  kmp_bonuses, kmp_every = scan_booster(steps)(table, prefix_table if with_prefixes else None, delta, multiplier,
                                               tokens)
  np.testing.assert_allclose(bonuses, kmp_bonuses, atol=1e-5)
  np.testing.assert_allclose(every, kmp_every, atol=1e-5)
  completions = 0
  for u in range(count):
    expected = naive_bonuses(phrase_lists[u], list(np.asarray(tokens[u])), float(delta), weights[u],
                             prefix_lists[u] if with_prefixes else (), float(multiplier))
    np.testing.assert_allclose(bonuses[u], expected, atol=1e-5, err_msg=f"{phrase_lists[u]} {tokens[u]}")
    completions += int(np.any(expected[:-1] > 0))
  assert completions > 500


def test_long_lists_match_kmp():
  """Lists of 300 phrases over 12 labels (many shared prefixes, wide nodes) with a prefix table: the
  same bonuses as KMP on sequences built from the phrases."""
  rng = np.random.default_rng(3)
  vocab, count, steps = 13, 6, 40
  phrase_lists = [random_phrase_list(rng, max_count=300, max_len=7, alphabet=vocab - 1) for _ in range(count)]
  weights = [list(rng.uniform(0.5, 2.0, size=len(p))) for p in phrase_lists]
  prefixes = [[1, 2], [3]]
  tokens = jnp.asarray([random_sequence(rng, p, steps, alphabet=vocab - 1) for p in phrase_lists], jnp.int32)
  shapes = dict(max_phrases=300, max_phrase_length=8)
  automaton = make_batched_automaton(phrase_lists, vocab, weights=weights, **shapes)
  assert automaton.fanout_width >= 8  # wide nodes: the binary search and the scatter both work
  table = make_batched_phrase_table(phrase_lists, vocab, weights=weights, **shapes)
  args = (jnp.float32(0.4), jnp.float32(1.5), tokens)
  bonuses, every = scan_booster(steps)(automaton, make_automaton(prefixes, vocab), *args)
  kmp_bonuses, kmp_every = scan_booster(steps)(table, make_phrase_table(prefixes, vocab), *args)
  np.testing.assert_allclose(bonuses, kmp_bonuses, atol=1e-5)
  np.testing.assert_allclose(every, kmp_every, atol=1e-5)
  assert (np.asarray(bonuses) > 0).mean() > 0.2


def _strings(automaton):
  """{node: its token string} by a walk of the edges from the root (unbatched automaton)."""
  child_start, edge_tokens = np.asarray(automaton.child_start), np.asarray(automaton.edge_tokens)
  strings, frontier = {ROOT: ()}, [ROOT]
  while frontier:
    node = frontier.pop()
    for edge in range(child_start[node], child_start[node + 1]):
      strings[edge + 1] = strings[node] + (int(edge_tokens[edge]),)
      frontier.append(edge + 1)
  return strings


def test_automaton_against_a_dictionary_trie():
  """Nodes are exactly the phrases' prefixes; each failure link is the longest proper suffix that is a
  node; `after` and `completes` follow their definitions, computed from the strings."""
  rng = np.random.default_rng(4)
  phrases = random_phrase_list(rng, max_count=400, max_len=8, alphabet=6)
  weights = list(rng.uniform(0.5, 2.0, size=len(phrases)))
  automaton = make_automaton(phrases, 7, weights=weights)
  strings = _strings(automaton)
  prefixes = {tuple(p[:k]) for p in phrases for k in range(len(p) + 1)}
  assert set(strings.values()) == prefixes and len(strings) == len(prefixes) <= automaton.num_nodes
  node_of = {s: v for v, s in strings.items()}
  fail, after, completes = (np.asarray(x) for x in (automaton.fail, automaton.after, automaton.completes))
  for node, string in strings.items():
    suffixes = [string[i:] for i in range(1, len(string) + 1)]  # proper, longest first; () last
    if string:
      assert fail[node] == node_of[next(s for s in suffixes if s in prefixes)]
    ended = [w * len(p) for p, w in zip(phrases, weights) if string[len(string) - len(p):] == tuple(p)
             and len(p) <= len(string)]
    partial = [w * k for p, w in zip(phrases, weights) for k in range(len(p))
               if k <= len(string) and string[len(string) - k:] == tuple(p[:k])]
    assert completes[node] == bool(ended)
    np.testing.assert_allclose(after[node], max(ended) if ended else max(partial), rtol=1e-6)
  # Ids are breadth-first: a deeper node has a larger id.
  depths = [len(strings[v]) for v in range(len(strings))]
  assert depths == sorted(depths)


def test_hand_worked_automaton():
  """Phrases "123", "23", "24" (weight 2): the trie 1-12-123, 2-23-24; "12" fails to "2", so after
  "12" the output holds "2" of "23" and "24" (r = 2 * 1 = 2 > 1 * 2 of "12")."""
  automaton = make_automaton([[1, 2, 3], [2, 3], [2, 4]], 5, weights=[1.0, 1.0, 2.0])
  strings = _strings(automaton)
  node = {s: v for v, s in strings.items()}
  assert sorted(strings.values()) == [(), (1,), (1, 2), (1, 2, 3), (2,), (2, 3), (2, 4)]
  fail = np.asarray(automaton.fail)
  assert fail[node[(1, 2)]] == node[(2,)] and fail[node[(1, 2, 3)]] == node[(2, 3)]
  after = np.asarray(automaton.after)
  assert after[node[(1,)]] == 1.0 and after[node[(1, 2)]] == 2.0 and after[node[(2,)]] == 2.0
  assert after[node[(1, 2, 3)]] == 3.0 and after[node[(2, 3)]] == 2.0 and after[node[(2, 4)]] == 4.0
  np.testing.assert_array_equal(automaton.completes[:len(strings)], [strings[v] in {(1, 2, 3), (2, 3), (2, 4)}
                                                                     for v in range(len(strings))])
  # Output 1 2 4: +1, +1 (r 2: the "2" of weight-2 "24"), then "24" completes: 2 * 2 = 4, bonus +2.
  booster = PhraseBooster(automaton, 1.0)
  state, paid = booster.init((1,)), []
  for token in (1, 2, 4):
    state, bonus = booster.advance(state, jnp.asarray([token]))
    paid.append(float(bonus[0]))
  assert paid == [1.0, 1.0, 2.0] and int(state.match[0]) == ROOT


def test_batched_lists_of_different_sizes_equal_one_list_at_a_time():
  rng = np.random.default_rng(5)
  phrase_lists = [random_phrase_list(rng, max_count=n) for n in (1, 4, 9)]
  prefixes = [[4, 4]]
  batched = make_batched_automaton(phrase_lists, VOCAB, max_phrases=9, max_phrase_length=6)
  beams, steps = 4, 8
  history = jnp.asarray(rng.integers(0, VOCAB, size=(3, beams, steps)))

  @jax.jit
  def run(automaton, tokens):  # tokens [..., steps] -> token_bonus [steps, ..., vocab], bonus [steps, ...]
    booster = PhraseBooster(automaton, 0.9, make_automaton(prefixes, VOCAB), 1.7)

    def step(state, token):
      every = booster.token_bonus(state)
      state, bonus = booster.advance(state, token)
      return state, (every, bonus)

    return jax.lax.scan(step, booster.init(tokens.shape[:-1]), jnp.moveaxis(tokens, -1, 0))[1]

  every, bonus = run(batched, history)
  for u in range(3):
    alone = make_automaton(phrase_lists[u], VOCAB)
    for k in range(beams):
      single_every, single_bonus = run(alone, history[u, k][None])
      np.testing.assert_allclose(every[:, u, k], single_every[:, 0], atol=1e-6)
      np.testing.assert_allclose(bonus[:, u, k], single_bonus[:, 0], atol=1e-6)
  assert np.abs(np.asarray(bonus)).max() > 0


# Beam search: the same hypotheses and scores as with KMP.


def _both_fusions(phrase_lists, delta, mode, vocab=VOCAB):
  return (kmp_fusion(make_batched_phrase_table(phrase_lists, vocab), delta, mode),
          automaton_fusion(make_batched_automaton(phrase_lists, vocab), delta, mode))


@pytest.mark.parametrize("mode,top_k", [("shallow", None), ("shallow", 2), ("rescore", None)])
def test_beam_search_equals_kmp(mode, top_k):
  rng = np.random.default_rng(8)
  fns = rnn_model(seed=9)
  enc = jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)
  paddings = jnp.asarray(np.arange(7)[None] >= np.array([[7], [5], [6]]), jnp.float32)
  phrase_lists = [[[1, 2], [3, 1, 4], [2]], [[2, 2, 2], [2, 3]], [[4, 1], [1, 4, 1, 3]]]
  kwargs = dict(beam_size=4, max_symbols_per_frame=2, max_output_length=10, fusion_top_k=top_k)
  kmp, automaton = _both_fusions(phrase_lists, 1.3, mode)
  with_kmp = search(fns, enc, paddings, fusion=kmp, **kwargs)
  with_automaton = search(fns, enc, paddings, fusion=automaton, **kwargs)
  np.testing.assert_array_equal(with_kmp.tokens, with_automaton.tokens)
  np.testing.assert_array_equal(with_kmp.lengths, with_automaton.lengths)
  np.testing.assert_allclose(with_kmp.scores, with_automaton.scores, atol=1e-5)
  plain = search(fns, enc, paddings, **kwargs | dict(fusion_top_k=None))
  assert not np.array_equal(plain.scores, with_automaton.scores)


@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_unbounded_beam_scores_are_model_plus_sequence_bonus(mode):
  check_unbounded_beam_scores(lambda phrases, vocab, delta, mode: automaton_fusion(make_automaton(phrases, vocab),
                                                                                   delta, mode), mode)


def test_boosting_turns_near_miss_into_phrase():
  fns, enc = near_miss_model()
  enc, paddings = jnp.concatenate([enc, enc]), jnp.zeros((2, 3))
  fusion = automaton_fusion(make_batched_automaton([[[1, 2, 3]], [[3, 3]]], 4), 1.0)
  result = search(fns, enc, paddings, beam_size=2, max_symbols_per_frame=2, max_output_length=4, fusion=fusion)
  best = [tuple(int(t) for t in result.tokens[row, 0, :int(result.lengths[row, 0])]) for row in range(2)]
  assert best == [(1, 2, 3), (1, 2, 2)]


# Shapes and bad input.


def test_pipeline_arrays_share_one_shape_and_empty_lists_earn_nothing():
  tokens = np.array([[[1, 2, 0], [3, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
  automaton = automaton_from_padded(tokens, tokens > 0, VOCAB)
  assert automaton.num_nodes == 1 + 2 * 3 and automaton.batch_size == 2  # fixed by the array shape
  booster = PhraseBooster(automaton, 1.0)
  state = booster.init((2,))
  state, bonus = booster.advance(state, jnp.asarray([1, 1]))
  np.testing.assert_allclose(bonus, [1.0, 0.0])
  assert not np.asarray(booster.token_bonus(state)[1]).any()
  assert automaton.nbytes == sum(x.nbytes for x in jax.tree.leaves(automaton))


def test_bad_input_raises_or_warns(caplog):
  with caplog.at_level(logging.WARNING):
    automaton = make_automaton([[1, 2], [], [1, 2], [3]], VOCAB)
  assert "empty" in caplog.text and "duplicate" in caplog.text
  assert automaton.num_nodes == 4
  with pytest.raises(ValueError, match=r"\[1, 7\].*token id 7.*vocabulary"):
    make_automaton([[1, 7]], VOCAB)
  with pytest.raises(ValueError, match=r"\[1, 2, 3\].*max_phrase_length=2"):
    make_automaton([[1, 2, 3]], VOCAB, max_phrase_length=2)
  with pytest.raises(ValueError, match="3 children, more than fanout_width=2"):
    make_automaton([[1, 1], [1, 2], [1, 3]], VOCAB, fanout_width=2)
  with pytest.raises(ValueError, match="need 4 automaton nodes, more than num_nodes=3"):
    automaton_from_padded(np.array([[1, 2, 3]]), np.ones((1, 3), bool), VOCAB, num_nodes=3)
  with pytest.raises(ValueError, match="mask"):
    automaton_from_padded(np.ones((2, 3)), np.array([[True, False, True], [True, True, False]]), VOCAB)
  with pytest.raises(ValueError, match="weights"):
    make_automaton([[1]], VOCAB, weights=[-1.0])
  with pytest.raises(ValueError, match="holds 2 phrase lists"):
    automaton_fusion(make_batched_automaton([[[1]], [[2]]], VOCAB), 1.0).init(3, 2)
  with pytest.raises(ValueError, match="vocab_size"):
    PhraseBooster(make_automaton([[1]], VOCAB), 1.0, make_automaton([[1]], VOCAB + 1))
