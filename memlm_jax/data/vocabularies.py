"""Vocabularies selectable from gin."""

from __future__ import annotations

import os

import gin
import seqio


@gin.configurable
def byte_vocabulary() -> seqio.Vocabulary:
  """UTF-8 bytes + pad/eos/unk (259 ids); needs no model file."""
  return seqio.ByteVocabulary()


@gin.configurable
def sentencepiece_vocabulary(model_file: str = gin.REQUIRED, extra_ids: int = 0) -> seqio.Vocabulary:
  if not os.path.exists(model_file):
    raise FileNotFoundError(f"sentencepiece_vocabulary.model_file {model_file!r} does not exist.")
  return seqio.SentencePieceVocabulary(model_file, extra_ids=extra_ids)
