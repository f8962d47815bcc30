"""ROUGE against hand-worked examples, rouge-score's RougeScorer called directly, and a brute-force n-gram count."""

import collections
import math

import nltk
import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenizers

from memlm_jax.evaluation import rouge
from memlm_jax.evaluation.rouge import example_rouge, geometric_mean, rouge_scores, split_sentences

TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

TEXTS = [
    ("Mr. Darcy arrived at Netherfield on a cold morning. Elizabeth refused him! Why would she accept? "
     "Years later, after Dr. Grant's letter, they married.",
     "Elizabeth Bennet refuses Mr. Darcy's first proposal. She later learns the truth about Wickham.\n"
     "Darcy helps her sister Lydia, and Elizabeth accepts his second proposal."),
    ("The whale destroys the ship. Ishmael alone survives, floating on a coffin.",
     "Captain Ahab pursues the white whale across the oceans. In the end the whale sinks the Pequod; "
     "only Ishmael survives, buoyed by Queequeg's coffin."),
    ("Pip receives 3.5 thousand pounds from an unknown benefactor. He says \"I am a gentleman!\" "
     "The benefactor is Magwitch, e.g. the convict.",
     "An orphan, Pip, is raised by his sister. A mysterious benefactor, the convict Magwitch, makes him rich.\n\n"
     "He loses his fortune but gains wisdom."),
    ("Nothing in common here whatsoever.", "Completely different words appear in this reference."),
]


def direct_f1(reference, prediction, use_stemmer=True):
  """rouge-score's own F1 x 100; rougeLsum gets our sentences joined by newlines, as rouge-score expects."""
  scorer = rouge_scorer.RougeScorer(list(TYPES), use_stemmer=use_stemmer)
  plain = scorer.score(reference, prediction)
  lsum = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
  scores = {name: 100 * plain[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}
  scores["rougeLsum"] = 100 * lsum["rougeLsum"].fmeasure
  return scores


def brute_force_rouge_n(reference, prediction, n, use_stemmer=True):
  """ROUGE-n F1 x 100 from clipped n-gram multiset overlap, on rouge-score's tokens."""
  tokenizer = tokenizers.DefaultTokenizer(use_stemmer)
  ref_tokens, pred_tokens = tokenizer.tokenize(reference), tokenizer.tokenize(prediction)
  ref_grams = collections.Counter(tuple(ref_tokens[i:i + n]) for i in range(len(ref_tokens) - n + 1))
  pred_grams = collections.Counter(tuple(pred_tokens[i:i + n]) for i in range(len(pred_tokens) - n + 1))
  overlap = sum((ref_grams & pred_grams).values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / sum(pred_grams.values()), overlap / sum(ref_grams.values())
  return 100 * 2 * precision * recall / (precision + recall)


def test_hand_worked_single_sentence():
  # "the cat sat on the mat" vs "the cat lay on the mat", six tokens each.
  # rouge-1: the x2, cat, on, mat match -> 5/6 both ways, F1 = 5/6.
  # rouge-2: {the cat, on the, the mat} of five bigrams each -> F1 = 3/5.
  # rouge-L: LCS "the cat on the mat" has length 5 -> F1 = 5/6.
  scores = example_rouge("the cat sat on the mat", "the cat lay on the mat")
  assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
  assert scores["rouge2"] == pytest.approx(60.0)
  assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
  assert scores["rougeLsum"] == pytest.approx(100 * 5 / 6)


def test_hand_worked_stemming():
  # Lin (2004): "police killed the gunman" vs "police kill the gunman". Porter stems "killed" to "kill".
  stemmed = example_rouge("police killed the gunman", "police kill the gunman")
  assert stemmed["rouge1"] == pytest.approx(100.0) and stemmed["rouge2"] == pytest.approx(100.0)
  plain = example_rouge("police killed the gunman", "police kill the gunman", use_stemmer=False)
  assert plain["rouge1"] == pytest.approx(75.0)  # 3 of 4 unigrams
  assert plain["rouge2"] == pytest.approx(100 / 3)  # "the gunman" is 1 of 3 bigrams
  # "the gunman kill police": LCS with "police kill the gunman" is "the gunman" (2 of 4 tokens).
  assert example_rouge("the gunman kill police", "police kill the gunman")["rougeL"] == pytest.approx(50.0)


def test_hand_worked_summary_level_lcs():
  # Reference r = one two three four five (5 tokens); the prediction has two sentences, 10 tokens:
  #   c1 = one three eight nine five, c2 = one two six seven eight.
  # rouge-L over the whole prediction: LCS "one three five" = 3 -> P = 3/10, R = 3/5, F1 = 0.4.
  # rouge-Lsum: LCS(r, c1) covers {one, three, five}, LCS(r, c2) covers {one, two}; the union is 4 tokens of r
  #   -> P = 4/10, R = 4/5, F1 = 8/15.
  # rouge-1: one, two, three, five match -> the same 8/15. rouge-2: only "one two" of 9 / 4 bigrams -> 2/13.
  scores = example_rouge("One three eight nine five. One two six seven eight.", "One two three four five.")
  assert scores["rougeL"] == pytest.approx(40.0)
  assert scores["rougeLsum"] == pytest.approx(100 * 8 / 15)
  assert scores["rouge1"] == pytest.approx(100 * 8 / 15)
  assert scores["rouge2"] == pytest.approx(100 * 2 / 13)


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_matches_rouge_score_directly(use_stemmer):
  for prediction, reference in TEXTS + [(r, p) for p, r in TEXTS]:
    ours = example_rouge(prediction, reference, use_stemmer=use_stemmer)
    expected = direct_f1(reference, prediction, use_stemmer)
    assert set(ours) == set(TYPES)
    for name in TYPES:
      assert ours[name] == pytest.approx(expected[name], abs=1e-9), name


def test_rougelsum_differs_from_unsplit_text():
  prediction, reference = TEXTS[0]
  scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
  one_line = 100 * scorer.score(reference.replace("\n", " "), prediction)["rougeLsum"].fmeasure
  assert example_rouge(prediction, reference)["rougeLsum"] != pytest.approx(one_line)


def test_best_of_references_mean_and_overall():
  predictions = [p for p, _ in TEXTS]
  references = [[r, p[: len(p) // 2]] if i % 2 == 0 else r for i, (p, r) in enumerate(TEXTS)]
  references[3] = [TEXTS[3][1], TEXTS[0][1], "Nothing in common"]
  result = rouge_scores(predictions, references)
  assert result["examples"] == len(TEXTS)

  per_example = []
  for prediction, refs in zip(predictions, references):
    refs = [refs] if isinstance(refs, str) else refs
    singles = [direct_f1(ref, prediction) for ref in refs]
    best = {name: max(s[name] for s in singles) for name in TYPES}
    assert example_rouge(prediction, refs) == pytest.approx(best)
    per_example.append(best)
  for name in TYPES:
    assert result[name] == pytest.approx(np.mean([e[name] for e in per_example]))
  assert result["overall"] == pytest.approx((result["rouge1"] * result["rouge2"] * result["rougeL"]) ** (1 / 3))

  # The best reference may differ per metric: each metric takes its own maximum.
  mixed = example_rouge("a b c d", ["a b c x y z", "d c b a"])
  assert mixed["rouge2"] == pytest.approx(example_rouge("a b c d", "a b c x y z")["rouge2"])
  assert mixed["rouge1"] == pytest.approx(example_rouge("a b c d", "d c b a")["rouge1"]) == pytest.approx(100.0)


def test_geometric_mean():
  assert geometric_mean([2.0, 8.0, 4.0]) == pytest.approx(4.0)
  assert geometric_mean([5.0, 0.0, 3.0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rouge_n_matches_brute_force_on_random_words(seed):
  rng = np.random.default_rng(seed)
  vocab = ["the", "The", "cat", "cats", "running", "ran", "a", "mat,", "mat.", "on", "42", "x-ray", "Dr."]

  def sentence():
    return " ".join(rng.choice(vocab, size=rng.integers(0, 12)))

  predictions, references = [sentence() for _ in range(12)], [sentence() for _ in range(12)]
  for use_stemmer in (True, False):
    result = rouge_scores(predictions, references, use_stemmer=use_stemmer)
    for n in (1, 2):
      expected = [brute_force_rouge_n(r, p, n, use_stemmer) for p, r in zip(predictions, references)]
      for p, r, e in zip(predictions, references, expected):
        assert example_rouge(p, r, use_stemmer=use_stemmer)[f"rouge{n}"] == pytest.approx(e)
      assert result[f"rouge{n}"] == pytest.approx(np.mean(expected))


def test_empty_prediction_scores_zero():
  scores = rouge_scores(["", "the cat"], ["the cat", "the cat"])
  for name in TYPES:
    assert example_rouge("", "the cat")[name] == 0.0
    assert scores[name] == pytest.approx(50.0)
  assert rouge_scores([""], ["anything"])["overall"] == 0.0


@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith met Mrs. Jones. They talked.", ["Mr. Smith met Mrs. Jones.", "They talked."]),
    ("Dr. Who lives on Baker St. Near the park.", ["Dr. Who lives on Baker St. Near the park."]),
    ("Use tools, e.g. Hammers. Or i.e. Nails. And etc. Also vs. Them.",
     ["Use tools, e.g. Hammers.", "Or i.e. Nails.", "And etc. Also vs. Them."]),
    ("J. R. R. Tolkien wrote it. Sam Jr. Was there.", ["J. R. R. Tolkien wrote it.", "Sam Jr. Was there."]),
    ("Pi is 3.14 roughly. It costs $2.50 today.", ["Pi is 3.14 roughly.", "It costs $2.50 today."]),
    ("It was 1984. 2000 came later.", ["It was 1984.", "2000 came later."]),
    ('He shouted "Run!" Then he ran. "Why?" she asked.', ['He shouted "Run!"', "Then he ran.", '"Why?" she asked.']),
    ("Really?! Yes. (It happened.) Then what? Nothing!", ["Really?!", "Yes.", "(It happened.)", "Then what?",
                                                         "Nothing!"]),
    ("Wait... Then go.", ["Wait...", "Then go."]),
    ("lower case after. a period stays.", ["lower case after. a period stays."]),
    ("Line one\nline two\r\n\n   \n  Line three.  ", ["Line one", "line two", "Line three."]),
    ("\u00c9mile left. \u00c9lise stayed.", ["\u00c9mile left.", "\u00c9lise stayed."]),
    ("", []),
    ("   \n ", []),
])
def test_split_sentences(text, expected):
  assert split_sentences(text) == expected


def test_no_download_or_nltk_data_is_used(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("nltk data access is not allowed")

  monkeypatch.setattr(nltk, "download", forbidden)
  monkeypatch.setattr(nltk.data, "find", forbidden)
  monkeypatch.setattr(nltk.data, "load", forbidden)
  monkeypatch.setattr(nltk, "sent_tokenize", forbidden)
  rouge._scorer.cache_clear()  # construct the scorer (and its stemmer) under the patch too
  try:
    result = rouge_scores([p for p, _ in TEXTS], [r for _, r in TEXTS])
  finally:
    rouge._scorer.cache_clear()
  assert result["rougeLsum"] > 0


@pytest.mark.parametrize("predictions, references, message", [
    (["a", "b"], ["a"], "2 predictions but 1 references"),
    ([], [], "0 examples"),
    (["a", "b"], ["a", []], r"references\[1\] is an empty list"),
    (["a", 3], ["a", "b"], r"predictions\[1\] must be a string, got int 3"),
    (["a", None], ["a", "b"], r"predictions\[1\] must be a string, got NoneType"),
    (["a"], [["x", b"y"]], r"references\[0\]\[1\] must be a string, got bytes"),
    (["a"], [7], r"references\[0\] must be a string or a non-empty sequence of strings, got int 7"),
    ("abc", ["a", "b", "c"], "predictions must be a sequence with one entry per example, got str"),
    (["a"], "a", "references must be a sequence with one entry per example, got str"),
])
def test_bad_input_raises_before_scoring(monkeypatch, predictions, references, message):
  monkeypatch.setattr(rouge, "_score", lambda *args: pytest.fail("scored before validating"))
  with pytest.raises(ValueError, match=message):
    rouge_scores(predictions, references)


def test_example_rouge_bad_input():
  with pytest.raises(ValueError, match="prediction must be a string, got int"):
    example_rouge(1, "a")
  with pytest.raises(ValueError, match="references is an empty list"):
    example_rouge("a", [])
  with pytest.raises(ValueError, match="split_sentences expects a string"):
    split_sentences(None)
  assert math.isfinite(example_rouge("a", ("a", "b"))["rougeL"])
