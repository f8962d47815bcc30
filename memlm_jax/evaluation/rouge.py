"""ROUGE for summarisation, scored the way SCROLLS and Unlimiformer score book summaries.

Per example, rouge-1, rouge-2, rouge-L and rouge-Lsum F1 come from `rouge_score.rouge_scorer.RougeScorer` (Porter
stemming on by default), each taking its best value over the example's references. The corpus score is the mean
over examples times 100, and "overall" is the geometric mean of rouge-1, rouge-2 and rouge-L (SCROLLS's summary
score).

rouge-Lsum treats each line of its input as a sentence. SCROLLS puts one sentence per line with nltk's punkt
splitter, which needs a data download; `split_sentences` is a rule-based stand-in so that nothing is ever
downloaded. Joining the sentences with newlines changes no tokens, so rouge-1/2/L are unaffected by it.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A candidate sentence end: terminators, then any closing quotes or brackets, then whitespace. Whether the next
# character may start a sentence (unicode upper case needs str.isupper) and whether the word before the terminator
# is an abbreviation are checked in split_sentences.
_SENTENCE_END = re.compile(r"([.!?]+)([\"'\u201d\u2019)\]]*)(\s+)(?=\S)")
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "gen", "col", "capt", "lt", "sgt", "mt", "hon",
    "vs", "etc", "cf", "fig", "e.g", "i.e",
})
# Dotted initials such as "U.S" or "e.g" (the final period is the terminator itself), or one capital initial.
_INITIALS = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]|[A-Z]")
_OPENERS = "\"'\u201c\u2018(["


def _is_abbreviation(line: str, end: int) -> bool:
  """Whether the word of `line` ending at `end` (just before a period) is an abbreviation or an initial."""
  start = end
  while start > 0 and not line[start - 1].isspace():
    start -= 1
  word = line[start:end].lstrip(_OPENERS)
  return word.lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def split_sentences(text: str) -> list[str]:
  """Rule-based sentence splitter: one stripped, non-empty string per sentence.

  A sentence ends after ".", "!" or "?" (and any closing quotes or brackets) when whitespace and then an
  upper-case letter, a digit or an opening quote follows, except after a period ending a common abbreviation
  ("Mr.", "Dr.", "St.", "e.g.", "etc.", ...) or an initial ("J.", "U.S."). Every line break also ends a sentence.
  """
  if not isinstance(text, str):
    raise ValueError(f"split_sentences expects a string, got {type(text).__name__}: {text!r:.80}")
  sentences = []
  for line in text.splitlines():
    start = 0
    for match in _SENTENCE_END.finditer(line):
      following = line[match.end()]
      if not (following.isupper() or following.isdigit() or following in _OPENERS):
        continue
      if match.group(1) == "." and _is_abbreviation(line, match.start(1)):
        continue
      sentences.append(line[start:match.start(3)])
      start = match.end(3)
    sentences.append(line[start:])
  return [s for s in (s.strip() for s in sentences) if s]


@functools.lru_cache(maxsize=None)
def _scorer(use_stemmer: bool) -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def _describe(value: object) -> str:
  return f"{type(value).__name__} {value!r:.80}"


def _check_prediction(prediction: object, where: str) -> None:
  if not isinstance(prediction, str):
    raise ValueError(f"{where} must be a string, got {_describe(prediction)}.")


def _as_reference_list(references: object, where: str) -> list[str]:
  """One example's references as a non-empty list of strings, or a ValueError saying what is wrong."""
  if isinstance(references, str):
    return [references]
  if not isinstance(references, Sequence):
    raise ValueError(f"{where} must be a string or a non-empty sequence of strings, got {_describe(references)}.")
  if len(references) == 0:
    raise ValueError(f"{where} is an empty list of references; each example needs at least one reference string.")
  for j, reference in enumerate(references):
    if not isinstance(reference, str):
      raise ValueError(f"{where}[{j}] must be a string, got {_describe(reference)}.")
  return list(references)


def _score(prediction: str, references: list[str], use_stemmer: bool) -> dict[str, float]:
  scorer = _scorer(use_stemmer)
  prediction = "\n".join(split_sentences(prediction))
  best = dict.fromkeys(ROUGE_TYPES, 0.0)
  for reference in references:
    scores = scorer.score("\n".join(split_sentences(reference)), prediction)
    for name in ROUGE_TYPES:
      best[name] = max(best[name], 100.0 * scores[name].fmeasure)
  return best


def example_rouge(prediction: str, references: str | Sequence[str], *, use_stemmer: bool = True) -> dict[str, float]:
  """One example's rouge1 / rouge2 / rougeL / rougeLsum F1 x 100, each the best over the references."""
  _check_prediction(prediction, "prediction")
  return _score(prediction, _as_reference_list(references, "references"), use_stemmer)


def geometric_mean(values: Sequence[float]) -> float:
  """Geometric mean of non-negative values; 0 when any of them is 0."""
  if any(v <= 0 for v in values):
    return 0.0
  return math.exp(sum(math.log(v) for v in values) / len(values))


def rouge_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
                 use_stemmer: bool = True) -> dict[str, float]:
  """Corpus ROUGE: per-example F1 x 100 (best over references) averaged over examples.

  Returns rouge1, rouge2, rougeL, rougeLsum, "overall" (geometric mean of rouge1, rouge2 and rougeL, as in
  SCROLLS) and "examples" (the count). Every input is checked before anything is scored.
  """
  for name, value in (("predictions", predictions), ("references", references)):
    if isinstance(value, str) or not isinstance(value, Sequence):
      raise ValueError(f"{name} must be a sequence with one entry per example, got {_describe(value)}.")
  if len(predictions) != len(references):
    raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                     "they must pair up one to one.")
  if not predictions:
    raise ValueError("got 0 examples; ROUGE needs at least one prediction / reference pair.")
  for i, prediction in enumerate(predictions):
    _check_prediction(prediction, f"predictions[{i}]")
  reference_lists = [_as_reference_list(refs, f"references[{i}]") for i, refs in enumerate(references)]

  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, refs in zip(predictions, reference_lists):
    for name, value in _score(prediction, refs, use_stemmer).items():
      totals[name] += value
  result = {name: total / len(predictions) for name, total in totals.items()}
  result["overall"] = geometric_mean([result["rouge1"], result["rouge2"], result["rougeL"]])
  result["examples"] = len(predictions)
  return result
