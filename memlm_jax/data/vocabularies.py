"""Vocabularies selectable from gin."""

from __future__ import annotations

import os

import gin
import seqio


@gin.configurable
def byte_vocabulary() -> seqio.Vocabulary:
  """UTF-8 bytes + pad/eos/unk (259 ids); needs no model file."""
  return seqio.ByteVocabulary()


PASSKEY_BPE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "passkey_bpe.model")


@gin.configurable
def passkey_vocabulary() -> seqio.Vocabulary:
  """The passkey recipe's 160-piece BPE (every digit its own piece), shipped with the package.

  Rebuilt exactly by: python scripts/train_spm.py --passkey_texts=2000
  --model_prefix=memlm_jax/data/assets/passkey_bpe --vocab_size=160 --model_type=bpe --split_digits --nolowercase
  """
  return seqio.SentencePieceVocabulary(PASSKEY_BPE_MODEL)


@gin.configurable
def sentencepiece_vocabulary(model_file: str = gin.REQUIRED, extra_ids: int = 0) -> seqio.Vocabulary:
  if not os.path.exists(model_file):
    raise FileNotFoundError(f"sentencepiece_vocabulary.model_file {model_file!r} does not exist.")
  return seqio.SentencePieceVocabulary(model_file, extra_ids=extra_ids)
