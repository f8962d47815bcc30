"""Word error rate, and the biased / unbiased WER split used for contextual biasing.

The word alignment (edit distance) comes from `jiwer.process_words`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jiwer

_PUNCTUATION = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> str:
  """Lower case, punctuation other than apostrophes replaced by spaces, whitespace collapsed."""
  return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@dataclasses.dataclass(frozen=True)
class WerResult:
  """Corpus totals; wer = (substitutions + deletions + insertions) / reference_words."""
  substitutions: int
  deletions: int
  insertions: int
  reference_words: int
  wer: float


@dataclasses.dataclass(frozen=True)
class BiasedWerResult:
  """Overall WER plus its split into bias words (B-WER) and other words (U-WER)."""
  overall: WerResult
  bias_reference_words: int
  bias_errors: int
  unbiased_reference_words: int
  unbiased_errors: int
  b_wer: float
  u_wer: float

  @property
  def wer(self) -> float:
    return self.overall.wer


def _rate(errors: int, words: int) -> float:
  """errors / words; with no reference words, 0.0 without errors and inf with some."""
  if words:
    return errors / words
  return 0.0 if errors == 0 else float("inf")


def _check_lengths(references: Sequence[str], hypotheses: Sequence[str]) -> None:
  if isinstance(references, str) or isinstance(hypotheses, str):
    raise ValueError("references and hypotheses must be sequences of strings, not single strings.")
  if len(references) != len(hypotheses):
    raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses; "
                     "they must pair up one to one.")


def _align(references: Sequence[str], hypotheses: Sequence[str], normalize: bool) -> jiwer.WordOutput | None:
  """jiwer word alignment of the (optionally normalised) pairs; None for an empty corpus."""
  _check_lengths(references, hypotheses)
  if not references:
    return None
  prepare = normalize_text if normalize else (lambda text: " ".join(text.split()))
  return jiwer.process_words([prepare(r) for r in references], [prepare(h) for h in hypotheses])


def _totals(output: jiwer.WordOutput | None) -> WerResult:
  if output is None:
    return WerResult(0, 0, 0, 0, 0.0)
  words = sum(len(words) for words in output.references)
  errors = output.substitutions + output.deletions + output.insertions
  return WerResult(output.substitutions, output.deletions, output.insertions, words, _rate(errors, words))


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], *, normalize: bool = True) -> WerResult:
  """Corpus WER over paired utterances; `normalize` applies `normalize_text` to both sides first.

  An empty reference with an empty hypothesis counts no errors; with no reference words at all,
  wer is 0.0 without errors and inf with some.
  """
  return _totals(_align(references, hypotheses, normalize))


def bias_word_set(phrases: Sequence[str], normalize: bool = True) -> set[str]:
  """Every word of every (possibly multi-word) phrase, normalised like the transcripts."""
  prepare = normalize_text if normalize else (lambda text: text)
  return {word for phrase in phrases for word in prepare(phrase).split()}


def biased_wer(references: Sequence[str], hypotheses: Sequence[str], bias_lists: Sequence[Sequence[str]], *,
               normalize: bool = True) -> BiasedWerResult:
  """WER split into B-WER and U-WER (Le et al. 2021, "Contextualized streaming end-to-end speech
  recognition with trie-based deep biasing and shallow fusion").

  Rule, per utterance, on jiwer's minimum-edit word alignment (after normalisation):
    * a reference word is a bias word if it is a word of any phrase in that utterance's bias list;
    * a substituted or deleted reference word is an error of B-WER if it is a bias word, of U-WER
      otherwise (a substitution is attributed by its reference word, whatever the hypothesis word);
    * an inserted hypothesis word is an error of B-WER if it is a bias word, of U-WER otherwise.
  B-WER = B errors / bias words in the references; U-WER = U errors / other reference words.
  The overall WER is the usual one, so B errors + U errors = S + D + I.
  """
  if len(bias_lists) != len(references):
    raise ValueError(f"got {len(bias_lists)} bias lists for {len(references)} references; "
                     "need one (possibly empty) list per utterance.")
  if any(isinstance(phrases, str) for phrases in bias_lists):
    raise ValueError("each bias list must be a sequence of phrases, not a single string.")
  output = _align(references, hypotheses, normalize)
  counts = {"bias_words": 0, "bias_errors": 0, "other_words": 0, "other_errors": 0}
  if output is not None:
    for ref, hyp, chunks, phrases in zip(output.references, output.hypotheses, output.alignments, bias_lists):
      bias = bias_word_set(phrases, normalize)
      for chunk in chunks:
        for word in ref[chunk.ref_start_idx:chunk.ref_end_idx]:
          kind = "bias" if word in bias else "other"
          counts[f"{kind}_words"] += 1
          counts[f"{kind}_errors"] += chunk.type in ("substitute", "delete")
        if chunk.type == "insert":
          for word in hyp[chunk.hyp_start_idx:chunk.hyp_end_idx]:
            counts["bias_errors" if word in bias else "other_errors"] += 1
  return BiasedWerResult(
      overall=_totals(output),
      bias_reference_words=counts["bias_words"], bias_errors=counts["bias_errors"],
      unbiased_reference_words=counts["other_words"], unbiased_errors=counts["other_errors"],
      b_wer=_rate(counts["bias_errors"], counts["bias_words"]),
      u_wer=_rate(counts["other_errors"], counts["other_words"]))


def spoken_phrase_cer(references: Sequence[str], hypotheses: Sequence[str], bias_lists: Sequence[Sequence[str]], *,
                      normalize: bool = True) -> float | None:
  """How near a miss the recognised bias phrases are: for every phrase of an utterance's list that its
  reference contains (as whole words), the character error rate of the phrase against the window of the
  hypothesis (one word fewer to one more than the phrase, anywhere) that matches it best; the mean over
  all such phrases, or None when no reference contains one.

  B-WER counts a name missed by one letter as a whole word wrong; this is 0 for a name written exactly,
  small for a near miss and about 1 for a guess, so it tells a biaser that could sharpen the acoustic
  evidence from one that has nothing to sharpen.
  """
  if not len(references) == len(hypotheses) == len(bias_lists):
    raise ValueError(f"got {len(references)} references, {len(hypotheses)} hypotheses and {len(bias_lists)} bias "
                     "lists; need one of each per utterance.")
  prepare = normalize_text if normalize else (lambda text: text)
  rates = []
  for reference, hypothesis, phrases in zip(references, hypotheses, bias_lists):
    padded_reference, hyp_words = f" {prepare(reference)} ", prepare(hypothesis).split()
    for phrase in {prepare(p) for p in phrases}:
      if not phrase or f" {phrase} " not in padded_reference:
        continue
      size = len(phrase.split())
      windows = [" ".join(hyp_words[start:start + width]) for width in range(max(1, size - 1), size + 2)
                 for start in range(max(1, len(hyp_words) - width + 1))]
      rates.append(min(min(jiwer.cer(phrase, window), 1.0) if window else 1.0 for window in windows))
  return sum(rates) / len(rates) if rates else None
