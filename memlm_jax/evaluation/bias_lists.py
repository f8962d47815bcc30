"""Biasing phrase lists for evaluation: anti-biasing distractor lists, the check that a phrase's
tokens spell it, and phrase lists as the padded arrays the data pipeline emits
(data/speech_features.py)."""

from __future__ import annotations

import collections
import zlib
from typing import Any, Sequence

import numpy as np

from memlm_jax.evaluation.wer import normalize_text


def anti_bias_lists(ids: Sequence[str], texts: Sequence[str], bias_lists: Sequence[Sequence[str]],
                    seed: int = 0) -> list[list[str]]:
  """Anti-biasing distractor lists: for utterance u, len(set(bias_lists[u])) phrases (fewer when
  fewer qualify) drawn without replacement from the phrases of the other utterances' lists
  that do not occur in texts[u] as a run of whole words (both normalized as for WER).
  Depends only on (seed, ids[u]) and the set of phrases, not on the order of the utterances."""
  if not len(ids) == len(texts) == len(bias_lists):
    raise ValueError(f"got {len(ids)} ids, {len(texts)} texts and {len(bias_lists)} bias lists; need one each "
                     "per utterance.")
  repeated = sorted(i for i, count in collections.Counter(ids).items() if count > 1)
  if repeated:
    raise ValueError(f"anti-biasing lists need distinct utterance ids; {repeated[0]!r} repeats.")
  owners: dict[str, set[str]] = {}
  for ident, phrases in zip(ids, bias_lists):
    for phrase in phrases:
      owners.setdefault(phrase, set()).add(ident)
  padded = {p: f" {normalize_text(p)} " for p in owners}
  lists = []
  for ident, text, phrases in zip(ids, texts, bias_lists):
    words = f" {normalize_text(text)} "
    pool = sorted(p for p, who in owners.items() if who - {ident} and padded[p] not in words)
    size = min(len(set(phrases)), len(pool))
    rng = np.random.default_rng([seed, zlib.crc32(ident.encode("utf-8"))])
    lists.append([pool[i] for i in rng.choice(len(pool), size=size, replace=False)])
  return lists


def phrase_arrays(phrase_lists: Sequence[Sequence[Sequence[int]]], max_phrases: int, max_phrase_length: int,
                  utterance_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token-id phrase lists, one per utterance, as (bias_tokens [utterances, max_phrases,
  max_phrase_length] int32, 0 where padded; bias_paddings of that shape, float32, 1.0 = padded).
  A list with more phrases, or a phrase with more tokens, is a ValueError naming its utterance
  (`utterance_ids[u]`, else its index in `phrase_lists`)."""
  tokens = np.zeros((len(phrase_lists), max_phrases, max_phrase_length), np.int32)
  paddings = np.ones(tokens.shape, np.float32)
  for u, phrases in enumerate(phrase_lists):
    owner = f"utterance {utterance_ids[u]!r}" if utterance_ids is not None else f"phrase list {u}"
    if len(phrases) > max_phrases:
      raise ValueError(f"{owner} has {len(phrases)} bias phrases, more than max_phrases={max_phrases}.")
    for b, phrase in enumerate(phrases):
      if len(phrase) > max_phrase_length:
        raise ValueError(f"{owner}: phrase {list(phrase)} has {len(phrase)} tokens, more than "
                         f"max_phrase_length={max_phrase_length}.")
      tokens[u, b, :len(phrase)] = phrase
      paddings[u, b, :len(phrase)] = 0.0
  return tokens, paddings


def check_spelling(phrase: str, tokens: Sequence[int], vocabulary: Any) -> None:
  """Raises ValueError naming `phrase` when its tokens (the data pipeline's encoding) do not
  spell it: part of it maps to the vocabulary's unknown id, or they decode to other text
  (compared with whitespace collapsed). vocabulary: a seqio.Vocabulary (decode, unk_id)."""
  ids = [int(t) for t in tokens]
  unk_id = getattr(vocabulary, "unk_id", None)
  if unk_id is not None and unk_id in ids:
    raise ValueError(f"the vocabulary cannot encode the bias phrase {phrase!r}: it maps part of it to the unknown "
                     f"id {unk_id}.")
  decoded = vocabulary.decode(ids)
  if " ".join(decoded.split()) != " ".join(phrase.split()):
    raise ValueError(f"the vocabulary cannot encode the bias phrase {phrase!r}: it decodes back as {decoded!r}.")
