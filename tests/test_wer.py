"""WER and B-WER / U-WER against a naive edit distance and hand-worked examples."""

import math

import numpy as np
import pytest

from memlm_jax.evaluation.wer import biased_wer, normalize_text, spoken_phrase_cer, word_error_rate


def naive_edit_distance(ref, hyp):
  """Levenshtein distance between two word lists by the textbook dynamic programme."""
  table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
  for i in range(len(ref) + 1):
    for j in range(len(hyp) + 1):
      if i == 0 or j == 0:
        table[i][j] = i + j
      else:
        table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                          table[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]))
  return table[-1][-1]


def random_sentences(rng, count, vocab):
  return [" ".join(rng.choice(vocab, size=rng.integers(0, 9))) for _ in range(count)]


def test_normalize_text():
  assert normalize_text("  Hello,   WORLD!  It's\tstate-of-the-art. ") == "hello world it's state of the art"
  assert normalize_text("?!") == ""


def test_wer_matches_naive_edit_distance_on_random_sentences():
  rng = np.random.default_rng(0)
  vocab = ["a", "b", "c", "d", "e"]
  for _ in range(20):
    refs, hyps = random_sentences(rng, 6, vocab), random_sentences(rng, 6, vocab)
    result = word_error_rate(refs, hyps)
    distances = [naive_edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)]
    ref_words = sum(len(r.split()) for r in refs)
    hyp_words = sum(len(h.split()) for h in hyps)
    errors = result.substitutions + result.deletions + result.insertions
    assert errors == sum(distances)
    assert result.reference_words == ref_words
    assert result.insertions - result.deletions == hyp_words - ref_words
    if ref_words:
      assert result.wer == pytest.approx(sum(distances) / ref_words)


def test_normalisation_flag_and_empty_utterances():
  assert word_error_rate(["Hello, world."], ["hello world"]).wer == 0.0
  raw = word_error_rate(["Hello, world."], ["hello world"], normalize=False)
  assert raw.substitutions == 2 and raw.wer == 1.0
  empty = word_error_rate(["", "a b"], ["", "a b"])
  assert (empty.substitutions, empty.deletions, empty.insertions, empty.reference_words) == (0, 0, 0, 2)
  only_insertions = word_error_rate([""], ["x y"])
  assert only_insertions.insertions == 2 and math.isinf(only_insertions.wer)
  assert word_error_rate([], []).wer == 0.0


def test_mismatched_lengths_are_rejected():
  with pytest.raises(ValueError, match=r"2 references but 3 hypotheses"):
    word_error_rate(["a", "b"], ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"1 bias lists for 2 references"):
    biased_wer(["a", "b"], ["a", "b"], [["a"]])
  with pytest.raises(ValueError, match=r"1 references but 2 hypotheses"):
    biased_wer(["a"], ["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="not a single string"):
    biased_wer(["a"], ["a"], ["a"])


def test_substitution_of_a_bias_word():
  result = biased_wer(["Call John Smith now."], ["call jon smith now"], [["John Smith"]])
  assert (result.bias_errors, result.bias_reference_words) == (1, 2)
  assert (result.unbiased_errors, result.unbiased_reference_words) == (0, 2)
  assert result.b_wer == 0.5 and result.u_wer == 0.0 and result.wer == 0.25


def test_insertion_of_a_bias_word_and_of_an_ordinary_word():
  result = biased_wer(["play music by john smith", "play music"],
                      ["play music smith by john smith", "play the music"], [["john smith"], ["john smith"]])
  # utterance 1: inserted "smith" is a bias word; utterance 2: inserted "the" is not.
  assert (result.bias_errors, result.bias_reference_words) == (1, 2)
  assert (result.unbiased_errors, result.unbiased_reference_words) == (1, 5)
  assert result.overall.insertions == 2
  assert result.b_wer == 0.5 and result.u_wer == pytest.approx(1 / 5)


def test_error_on_an_ordinary_word_and_per_utterance_bias_lists():
  # "smith" is a bias word only in the first utterance.
  result = biased_wer(["call john smith now", "smith said hi"], ["call john smith", "smyth said hi"],
                      [["john smith"], ["hello"]])
  assert (result.bias_errors, result.bias_reference_words) == (0, 2)
  assert (result.unbiased_errors, result.unbiased_reference_words) == (2, 5)
  assert result.overall.deletions == 1 and result.overall.substitutions == 1
  assert result.b_wer == 0.0 and result.u_wer == pytest.approx(2 / 5)


def test_bias_split_adds_up_on_random_sentences():
  rng = np.random.default_rng(1)
  vocab = ["a", "b", "c", "d", "e", "f"]
  for _ in range(20):
    refs, hyps = random_sentences(rng, 5, vocab), random_sentences(rng, 5, vocab)
    bias_lists = [[" ".join(rng.choice(vocab, size=2))] for _ in refs]
    result = biased_wer(refs, hyps, bias_lists)
    bias_words = sum(w in bias[0].split() for r, bias in zip(refs, bias_lists) for w in r.split())
    assert result.bias_reference_words == bias_words
    assert result.bias_reference_words + result.unbiased_reference_words == result.overall.reference_words
    assert result.bias_errors + result.unbiased_errors == sum(
        naive_edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))


def test_spoken_phrase_cer_on_a_hand_worked_example():
  references = ["call kori beibul at home", "play some music", "call nupil staiflo", "call zeflo at homestead"]
  hypotheses = ["call kori beibol at home", "Play some musik", "", "call zeflo at homestead"]
  lists = [["kori beibul", "zeflo kashos"],  # only the spoken phrase counts: 1 substitution in 11 characters
           ["music"],                        # 1 in 5, after normalisation
           ["nupil staiflo"],                # an empty hypothesis: every character missed
           ["home", "zeflo kashos"]]         # "home" is not a word of the reference: no phrase here
  assert spoken_phrase_cer(references, hypotheses, lists) == pytest.approx((1 / 11 + 1 / 5 + 1) / 3)
  assert spoken_phrase_cer(references[3:], hypotheses[3:], lists[3:]) is None
  # The best window may be shorter or longer than the phrase: "kori bei bul" is two edits from "kori beibul".
  assert spoken_phrase_cer(["call kori beibul"], ["call kori bei bul now"], [["kori beibul"]]) == pytest.approx(1 / 11)
  with pytest.raises(ValueError, match="one of each per utterance"):
    spoken_phrase_cer(references, hypotheses[:2], lists)
