"""Merging spotted phrases into a transducer hypothesis, as NeMo's CTC word spotter (Andrusenko et al.
2024) merges into a transducer's output: the phrases a CTC head spots (losses/ctc_spotting.py) replace
the words emitted in their windows of frames (launch/biasing.py: CtcWordSpotting)."""

from __future__ import annotations

from typing import Sequence


def replace_spotted_words(tokens: Sequence[int], frames: Sequence[int], phrase: Sequence[int], start: int, end: int,
                          starts_word: Sequence[bool], margin: int = 0,
                          max_extra_words: int | None = None) -> tuple[list[int], list[int]] | None:
  """A hypothesis with a spotted phrase merged in, as NeMo's CTC word spotter merges into a transducer's
  output: the words whose frames (first to last label) overlap [start - margin, end + margin] give way to
  the phrase; when no word does, the phrase goes in before the first word emitted after `end`.

  Args:
    tokens, frames: the hypothesis's labels and the encoder frame each was emitted at (nondecreasing).
    phrase: the spotted phrase's labels; start, end: its window (Spots).
    starts_word: [vocab] whether a label begins a word (SentencePiece: its piece starts with "▁").
    margin: frames added on both sides of the window.
    max_extra_words: None, or the most words the merge may replace beyond the phrase's own count;
      a window over more words is not trusted (blank frames cost nothing, so a phrase's few labels can
      stretch over a sentence) and the merge is refused.
  Returns:
    (tokens, frames) after the merge, the phrase's labels at frame `start`; None if refused.
  """
  words: list[list[int]] = []  # token positions of each word
  for i, token in enumerate(tokens):
    if not words or starts_word[token]:
      words.append([])
    words[-1].append(i)
  inside = [w for w, positions in enumerate(words)
            if frames[positions[0]] <= end + margin and frames[positions[-1]] >= start - margin]
  phrase_words = sum(1 for i, token in enumerate(phrase) if i == 0 or starts_word[token])
  if max_extra_words is not None and len(inside) > phrase_words + max_extra_words:
    return None
  if inside:
    first, last = words[inside[0]][0], words[inside[-1]][-1] + 1
  else:
    first = last = next((positions[0] for positions in words if frames[positions[0]] > end), len(tokens))
  return (list(tokens[:first]) + list(phrase) + list(tokens[last:]),
          list(frames[:first]) + [start] * len(phrase) + list(frames[last:]))
