"""scripts/name_evidence.py: the candidate transcripts a spoken name is ranked among, and the rank."""

import numpy as np
import pytest

from scripts import name_evidence


def test_candidates_replace_the_first_entity_by_each_other_phrase():
  texts = name_evidence.candidate_transcripts(
      "play kori by kori beibul", ["kori", "kori beibul"], ["zeflo", "kori", "kori beibul", "tuma", "nu pil"], 3)
  # Only the whole word "kori" (the first entity) is replaced, once; the other entity is no candidate.
  assert texts == ["play kori by kori beibul", "play zeflo by kori beibul", "play tuma by kori beibul"]
  with pytest.raises(ValueError, match="not in the transcript"):
    name_evidence.candidate_transcripts("call korib", ["kori"], ["zeflo"], 3)


def test_rank_counts_strictly_better_candidates():
  assert name_evidence.rank_of_reference(np.array([2.0, 3.0, 2.0, 5.0])) == 0
  assert name_evidence.rank_of_reference(np.array([2.0, 1.0, 1.5, 5.0])) == 2


def test_alignment_lines():
  lines = name_evidence.alignment_lines([["▁call", "▁ko"], ["▁a"]], np.array([[0, 7], [3, -1]]), np.array([40, 12]))
  assert lines == ["40 frames: ▁call@0 ▁ko@7", "12 frames: ▁a@3"]


def test_spotting_gains_are_per_token_of_each_phrase():
  """The phrases are tokenized into one padded array; each gain is divided by its own token count."""

  class Letters:  # one token per letter
    def encode(self, text):
      return [ord(c) - 96 for c in text.replace(" ", "")]

  seen = {}

  def gains_of(out, pad, tokens, paddings):
    seen.update(tokens=np.asarray(tokens), paddings=np.asarray(paddings))
    return -np.sum(paddings <= 0, axis=-1, keepdims=False)[None].reshape(1, -1) * np.array([[1.0, 2.0, 3.0]])

  per_token = name_evidence.phrase_gains_per_token(gains_of, None, None, ["ab", "c", "de f"], Letters())
  np.testing.assert_allclose(per_token, [-1.0, -2.0, -3.0])
  assert seen["tokens"].tolist() == [[[1, 2, 0], [3, 0, 0], [4, 5, 6]]]
  assert seen["paddings"].tolist() == [[[0, 0, 1], [0, 1, 1], [0, 0, 0]]]
