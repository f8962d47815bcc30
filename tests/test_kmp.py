"""KMP phrase boosting against naive string matching, and inside the transducer beam search."""

import ast
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from memlm_jax.decoding.kmp import (KmpBooster, failure_function, kmp_fusion, make_batched_phrase_table,
                                    make_phrase_table, phrase_table_from_padded, sequence_bonuses)
from memlm_jax.evaluation.bias_lists import phrase_arrays
from tests.boosting_reference import (VOCAB, check_unbounded_beam_scores, hypotheses, naive_bonuses, near_miss_model,
                                      random_phrase_list, random_sequence, rnn_model, search)

@functools.cache
def scan_booster(steps):
  """jit: (tables, delta, lambda, tokens [n, steps]) -> (bonuses [n, steps + 1] from `advance`, then the
  final bonus; max |token_bonus - advance bonus| over every state reached and every label)."""

  @jax.jit
  def run(table, prefix_table, delta, multiplier, tokens):
    booster = KmpBooster(table, delta, prefix_table, multiplier)

    def step(state, token):
      every = booster.token_bonus(state)  # [n, vocab]
      one_by_one = jax.vmap(lambda v: booster.advance(state, jnp.full(token.shape, v))[1], out_axes=-1)(
          jnp.arange(every.shape[-1]))
      state, bonus = booster.advance(state, token)
      return state, (bonus, jnp.max(jnp.abs(every[:, 1:] - one_by_one[:, 1:])))

    state, (bonuses, mismatch) = jax.lax.scan(step, booster.init(tokens.shape[:1]), tokens.T)
    return jnp.concatenate([bonuses.T, booster.final_bonus(state)[:, None]], axis=1), jnp.max(mismatch)

  return run


def check_against_naive(seed, count, steps, with_prefixes):
  rng = np.random.default_rng(seed)
  phrase_lists = [random_phrase_list(rng) for _ in range(count)]
  weights = [list(rng.uniform(0.5, 2.0, size=len(p))) for p in phrase_lists]
  prefix_lists = [random_phrase_list(rng, max_count=2, max_len=3) for _ in range(count)]
  tokens = np.array([random_sequence(rng, phrases + prefixes, steps)
                     for phrases, prefixes in zip(phrase_lists, prefix_lists)], np.int32)
  delta, multiplier = 0.7, 2.5
  table = make_batched_phrase_table(phrase_lists, VOCAB, weights=weights, max_phrases=4, max_phrase_length=6)
  prefix_table = make_batched_phrase_table(prefix_lists, VOCAB, max_phrases=2, max_phrase_length=4)
  bonuses, mismatch = scan_booster(steps)(table, prefix_table if with_prefixes else None, jnp.float32(delta),
                                          jnp.float32(multiplier if with_prefixes else 1.0), jnp.asarray(tokens))
  assert float(mismatch) < 1e-5
  completions = 0
  for u in range(count):
    expected = naive_bonuses(phrase_lists[u], list(tokens[u]), delta, weights[u],
                             prefix_lists[u] if with_prefixes else (), multiplier)
    np.testing.assert_allclose(bonuses[u], expected, atol=1e-5, err_msg=f"{phrase_lists[u]} {tokens[u]}")
    completions += int(np.any(expected[:-1] > 0))
  return completions


@pytest.mark.parametrize("with_prefixes", [False, True])
def test_bonuses_match_naive_string_matching(with_prefixes):
  """Thousands of random phrase sets (one per row of a batched table) and sequences; the
  whole-vocabulary bonus equals the per-token advance bonus at every step."""
  assert check_against_naive(seed=int(with_prefixes), count=2000, steps=14, with_prefixes=with_prefixes) > 500


def test_failure_function_with_shortcut_matches_naive_definition():
  rng = np.random.default_rng(0)
  count, max_len = 400, 10
  lengths = rng.integers(1, max_len + 1, size=count)
  tokens = np.where(np.arange(max_len) < lengths[:, None], rng.integers(1, 3 + rng.integers(0, 2, (count, 1)),
                                                                          size=(count, max_len)), -1)
  pi, shortcut = failure_function(tokens)
  nontrivial = 0
  for b in range(count):
    p = list(tokens[b, :lengths[b]])
    borders = lambda i: [k for k in range(i) if p[:k] == p[i - k:i]]  # noqa: E731  proper borders of p[:i]
    for i in range(len(p)):
      expected_pi = max(borders(i)) if i else -1
      expected_shortcut = max([k for k in borders(i) if p[k] != p[i]], default=-1) if i else -1
      assert (pi[b, i], shortcut[b, i]) == (expected_pi, expected_shortcut), (p, i)
      nontrivial += expected_shortcut != expected_pi
  assert nontrivial > 100


def test_sequence_bonuses_hand_worked():
  # Phrases "123" and "23" (a suffix of it); "124" breaks at 4, then "123" completes.
  np.testing.assert_allclose(sequence_bonuses([[1, 2, 3], [2, 3]], [1, 2, 4, 1, 2, 3, 0, 2], 1.5),
                             [1.5, 1.5, -3.0, 1.5, 1.5, 1.5, 0.0, 1.5, -1.5])
  # A completed phrase at weight 2 keeps 2 * delta * len; the pending "x" of "xy" is cancelled.
  np.testing.assert_allclose(sequence_bonuses([[1, 2], [3, 4]], [1, 2, 3], 1.0, weights=[2.0, 1.0]),
                             [2.0, 2.0, 1.0, -1.0])


def test_prefix_boosting_hand_worked():
  """Prefix "56" ("call "), phrase "12" ("mom"), delta 1, lambda 2 (rule in the module docstring)."""
  bonuses = functools.partial(sequence_bonuses, [[1, 2]], bonus_per_token=1.0, prefixes=[[5, 6]],
                              prefix_multiplier=2.0)
  # Right after the prefix the phrase is paid double: 0, 0, 2, 2; its completion turns the flag off.
  np.testing.assert_allclose(bonuses(tokens=[5, 6, 1, 2, 1, 2]), [0, 0, 2, 2, 1, 1, 0])
  # A token that starts no phrase right after the prefix turns the flag off.
  np.testing.assert_allclose(bonuses(tokens=[5, 6, 3, 1, 2]), [0, 0, 0, 1, 1, 0])
  # A broken match gives back its doubled bonus and turns the flag off.
  np.testing.assert_allclose(bonuses(tokens=[5, 6, 1, 3, 1, 2]), [0, 0, 2, -2, 1, 1, 0])
  # Blanks do not break anything; a pending doubled match is cancelled at the end.
  np.testing.assert_allclose(bonuses(tokens=[5, 0, 6, 0, 1]), [0, 0, 0, 0, 2, -2])
  # Without a prefix table the same sequence earns single bonuses.
  np.testing.assert_allclose(sequence_bonuses([[1, 2]], [5, 6, 1, 2], 1.0), [0, 0, 1, 1, 0])


def test_batched_equals_one_hypothesis_at_a_time():
  rng = np.random.default_rng(5)
  phrase_lists = [random_phrase_list(rng) for _ in range(3)]
  prefixes = [[4, 4]]
  batched = KmpBooster(make_batched_phrase_table(phrase_lists, VOCAB, max_phrases=5, max_phrase_length=6),
                       0.9, make_phrase_table(prefixes, VOCAB), 1.7)
  singles = [KmpBooster(make_phrase_table(p, VOCAB, max_phrases=5, max_phrase_length=6, chain_width=6), 0.9,
                        make_phrase_table(prefixes, VOCAB), 1.7) for p in phrase_lists]  # one compilation
  beams, steps = 4, 8
  history = jnp.asarray(rng.integers(0, VOCAB, size=(3, beams, steps)))

  @jax.jit
  def run(booster_tables, tokens):  # tokens [..., steps] -> token_bonus [steps, ..., vocab], bonus [steps, ...]
    booster = KmpBooster(booster_tables[0], 0.9, booster_tables[1], 1.7)

    def step(state, token):
      every = booster.token_bonus(state)
      state, bonus = booster.advance(state, token)
      return state, (every, bonus)

    return jax.lax.scan(step, booster.init(tokens.shape[:-1]), jnp.moveaxis(tokens, -1, 0))[1]

  every, bonus = run((batched.table, batched.prefix_table), history)
  for u in range(3):
    for k in range(beams):
      single_every, single_bonus = run((singles[u].table, singles[u].prefix_table), history[u, k][None])
      np.testing.assert_allclose(every[:, u, k], single_every[:, 0], atol=1e-6)
      np.testing.assert_allclose(bonus[:, u, k], single_bonus[:, 0], atol=1e-6)
  assert np.abs(np.asarray(bonus)).max() > 0
  # A shared (unbatched) table takes any leading shape.
  shared = KmpBooster(make_phrase_table(phrase_lists[0], VOCAB), 0.9)
  flat_state = shared.init((6,))
  grid_state = shared.init((2, 3))
  for t in range(history.shape[-1]):
    flat_tokens = jnp.asarray(history[:2, :3, t].reshape(6))
    flat_state, flat_bonus = shared.advance(flat_state, flat_tokens)
    grid_state, grid_bonus = shared.advance(grid_state, flat_tokens.reshape(2, 3))
    np.testing.assert_allclose(grid_bonus.reshape(6), flat_bonus)
    np.testing.assert_allclose(shared.token_bonus(grid_state).reshape(6, VOCAB), shared.token_bonus(flat_state))


# Beam search.


@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_zero_bonus_is_plain_beam_search(mode):
  rng = np.random.default_rng(2)
  fns = rnn_model(seed=3)
  enc = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
  paddings = jnp.asarray(np.arange(6)[None] >= np.array([[6], [4]]), jnp.float32)
  kwargs = dict(beam_size=4, max_symbols_per_frame=2, max_output_length=8)
  plain = search(fns, enc, paddings, **kwargs)
  table = make_batched_phrase_table([[[1, 2], [3, 1, 4]], [[2, 2, 2]]], VOCAB)
  top_k = 2 if mode == "shallow" else None
  zero = search(fns, enc, paddings, fusion=kmp_fusion(table, 0.0, mode), fusion_top_k=top_k, **kwargs)
  no_phrases = search(fns, enc, paddings, fusion=kmp_fusion(make_phrase_table([], VOCAB), 3.0, mode),
                      fusion_top_k=top_k, **kwargs)
  for fused in (zero, no_phrases):
    for a, b in zip(plain, fused):
      np.testing.assert_array_equal(a, b)
  boosted = search(fns, enc, paddings, fusion=kmp_fusion(table, 3.0, mode), fusion_top_k=top_k, **kwargs)
  assert not np.array_equal(plain.scores, boosted.scores)


@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_unbounded_beam_scores_are_model_plus_sequence_bonus(mode):
  check_unbounded_beam_scores(lambda phrases, vocab, delta, mode: kmp_fusion(make_phrase_table(phrases, vocab), delta,
                                                                             mode), mode)


@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_boosting_turns_near_miss_into_phrase(mode):
  """Row 0 biases [1, 2, 3], row 1 an unrelated phrase: only row 0 flips. Both modes flip with
  beam 2; with beam 1 only shallow fusion can (rescore prunes [1, 2, 3] before paying it)."""
  fns, enc = near_miss_model()
  enc, paddings = jnp.concatenate([enc, enc]), jnp.zeros((2, 3))
  phrase, delta = (1, 2, 3), 1.0
  table = make_batched_phrase_table([[list(phrase)], [[3, 3]]], 4)
  kwargs = dict(max_symbols_per_frame=2, max_output_length=4)
  best = lambda result, row: tuple(int(t) for t in result.tokens[row, 0, :int(result.lengths[row, 0])])  # noqa
  plain = search(fns, enc, paddings, beam_size=2, **kwargs)
  assert best(plain, 0) == best(plain, 1) == (1, 2, 2)
  assert phrase in hypotheses(plain, 0)
  boosted = search(fns, enc, paddings, beam_size=2, fusion=kmp_fusion(table, delta, mode), **kwargs)
  assert best(boosted, 0) == phrase and best(boosted, 1) == (1, 2, 2)
  np.testing.assert_allclose(boosted.scores[0, 0], hypotheses(plain, 0)[phrase] + 3 * delta, atol=1e-4)
  # Each row alone with its own phrase list gives the same result.
  for row in range(2):
    alone = search(fns, enc[:1], paddings[:1], beam_size=2,
                   fusion=kmp_fusion(make_batched_phrase_table([[list(phrase)], [[3, 3]]][row:row + 1], 4),
                                     delta, mode), **kwargs)
    np.testing.assert_array_equal(alone.tokens[0], boosted.tokens[row])
    np.testing.assert_allclose(alone.scores[0], boosted.scores[row], atol=1e-5)
  greedy = search(fns, enc, paddings, beam_size=1, fusion=kmp_fusion(table, delta, mode), **kwargs)
  assert best(greedy, 0) == (phrase if mode == "shallow" else (1, 2, 2))


# The data pipeline's phrase arrays (text is tokenized there: tests/test_speech_data.py) and bad input.


def test_phrase_table_from_the_pipeline_arrays():
  vocabulary = seqio.ByteVocabulary()
  tokens, paddings = phrase_arrays([[vocabulary.encode(p) for p in ("call mom", "play jazz")], []], 3, 12)
  table = phrase_table_from_padded(tokens, paddings == 0, vocabulary.vocab_size, chain_width=12)
  assert table.tokens.shape == (2, 3, 12) and table.vocab_size == vocabulary.vocab_size
  ids = vocabulary.encode("call mom")
  np.testing.assert_array_equal(table.tokens[0, 0, :len(ids)], ids)
  np.testing.assert_array_equal(table.lengths, [[8, 9, 0], [0, 0, 0]])
  # Row 1 has no phrases: every bonus is 0.
  booster = KmpBooster(table, 1.0)
  state = booster.init((2,))
  for token in vocabulary.encode("call mo"):
    state, bonus = booster.advance(state, jnp.asarray([token, token]))
    assert float(bonus[0]) == 1.0 and float(bonus[1]) == 0.0
  assert not np.asarray(booster.token_bonus(state)[1]).any()
  with pytest.raises(ValueError, match=r"phrase \[1, 2, 3\] has 3 tokens, more than max_phrase_length=2"):
    phrase_arrays([[[1, 2, 3]]], 2, 2)
  with pytest.raises(ValueError, match="phrase list 0 has 3 bias phrases, more than max_phrases=2"):
    phrase_arrays([[[1], [2], [3]]], 2, 2)
  with pytest.raises(ValueError, match="utterance 'u9' has 3 bias phrases, more than max_phrases=2"):
    phrase_arrays([[[1]], [[1], [2], [3]]], 2, 2, utterance_ids=["u8", "u9"])  # the 2nd list, named by its id


def test_an_oversized_phrase_list_error_names_the_utterance_and_stays_short():
  phrase_lists = [[[1]], [[t // 4**i % 4 + 1 for i in range(6)] for t in range(2000)]]  # distinct
  with pytest.raises(ValueError) as error:
    make_batched_phrase_table(phrase_lists, VOCAB, max_phrases=8)
  message = str(error.value)
  assert "(utterance 1)" in message and "(utterance 0)" not in message and "2000 in all" in message
  assert len(message) < 300, len(message)


def test_bad_input_raises_or_warns(caplog):
  with caplog.at_level(logging.WARNING):
    table = make_phrase_table([[1, 2], [], [1, 2], [3]], VOCAB)
  assert "empty" in caplog.text and "duplicate" in caplog.text and "[1, 2]" in caplog.text
  np.testing.assert_array_equal(table.lengths, [2, 1])
  with pytest.raises(ValueError, match=r"\[1, 2, 3\].*max_phrase_length=2"):
    make_phrase_table([[1, 2, 3]], VOCAB, max_phrase_length=2)
  with pytest.raises(ValueError, match="max_phrases=1"):
    make_phrase_table([[1], [2]], VOCAB, max_phrases=1)
  with pytest.raises(ValueError, match=r"\[1, 7\].*token id 7.*vocabulary"):
    make_phrase_table([[1, 7]], VOCAB)
  with pytest.raises(ValueError, match="token id 0"):
    make_batched_phrase_table([[[1]], [[0, 1]]], VOCAB)
  with pytest.raises(ValueError, match="mask"):
    phrase_table_from_padded(np.ones((2, 3)), np.array([[True, False, True], [True, True, False]]), VOCAB)
  with pytest.raises(ValueError, match="weights"):
    make_phrase_table([[1]], VOCAB, weights=[0.0])
  with pytest.raises(ValueError, match="chain_width=1"):
    make_phrase_table([[1, 1, 2]], VOCAB, chain_width=1)  # state 2 of "112" has chain 2, 1
  with pytest.raises(ValueError, match="holds 2 phrase lists"):
    kmp_fusion(make_batched_phrase_table([[[1]], [[2]]], VOCAB), 1.0).init(3, 2)
  with pytest.raises(ValueError, match="prefix_multiplier"):
    kmp_fusion(make_phrase_table([[1]], VOCAB), 1.0, prefix_multiplier=2.0)
  with pytest.raises(ValueError, match="mode"):
    kmp_fusion(make_phrase_table([[1]], VOCAB), 1.0, "deep")


def _imports(folder):
  """{module file: the memlm_jax modules and top-level packages it imports} of memlm_jax/<folder>/."""
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memlm_jax", folder)
  found = {}
  for name in sorted(os.listdir(root)):
    if name.endswith(".py"):
      tree = ast.parse(open(os.path.join(root, name)).read())
      found[name] = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
      found[name] |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
  return found


def test_decoding_takes_no_gin_and_models_import_no_decoding():
  for name, modules in _imports("decoding").items():
    assert "gin" not in modules, name
    assert not any(m.startswith(("memlm_jax.models", "memlm_jax.launch", "memlm_jax.data")) for m in modules), name
  for name, modules in _imports("models").items():
    assert not any(m.startswith(("memlm_jax.decoding", "memlm_jax.launch")) for m in modules), name
