r"""Trains a SentencePiece model on speech transcripts (the Transducer's output vocabulary) or
on passkey prompts (the passkey recipe's vocabulary).

  python scripts/train_spm.py --input=data/synth_speech/train.jsonl --model_prefix=data/synth_speech/spm_256 \
      --vocab_size=256
  python scripts/train_spm.py --input=transcripts.txt --model_prefix=/tmp/spm_bpe --vocab_size=1024 --model_type=bpe
  python scripts/train_spm.py --passkey_texts=2000 --model_prefix=memlm_jax/data/assets/passkey_bpe \
      --vocab_size=160 --model_type=bpe --split_digits --nolowercase      # the shipped passkey vocabulary

--passkey_texts=N trains on N passkey prompts (memlm_jax.data.passkey.passkey_texts, seed 0)
instead of --input. --split_digits makes every digit its own piece (keys are read digit by digit).
Training runs on one thread, so the same arguments give the same model.

--input is a manifest (.jsonl: the "text" of every line, see memlm_jax.data.speech) or a text
file (any other suffix: one transcript per line, empty lines skipped). Transcripts are normalized
as the speech tasks normalize them (memlm_jax.data.speech.normalize_transcript): whitespace
collapsed and lower-cased; --nolowercase keeps the case (then register the tasks with
lowercase=False too). SentencePiece adds no normalization of its own (identity rule), so
decoding the ids of a normalized transcript gives it back exactly.

Ids follow seqio's convention (pad 0, eos 1, unk 2, no bos), so
vocabularies.sentencepiece_vocabulary(model_file=<prefix>.model) reads the model; targets never
use id 0, free for the transducer's blank. Writes <prefix>.model and <prefix>.vocab.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # speech.py imports TensorFlow

import sentencepiece  # noqa: E402

from memlm_jax.data import speech  # noqa: E402

MODEL_TYPES = ("unigram", "bpe")


def read_transcripts(path: str, lowercase: bool = True) -> list[str]:
  """Normalized transcripts of a manifest (.jsonl) or a text file (one per line)."""
  if path.endswith(".jsonl"):
    return [entry.text for entry in speech.parse_manifest(path, lowercase)]
  if not os.path.isfile(path):
    raise ValueError(f"--input {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    lines = [speech.normalize_transcript(line, lowercase) for line in f]
  lines = [line for line in lines if line]
  if not lines:
    raise ValueError(f"--input {path!r} has no transcripts.")
  return lines


def train_spm(input_path: str | None, model_prefix: str, vocab_size: int, model_type: str = "unigram",
              lowercase: bool = True, character_coverage: float = 1.0, split_digits: bool = False,
              passkey_count: int = 0) -> str:
  """Trains the model on `input_path`'s transcripts or on `passkey_count` passkey prompts;
  returns the path of <model_prefix>.model."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"--model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
  if vocab_size < 4:
    raise ValueError(f"--vocab_size must be at least 4 (pad, eos, unk and one piece), got {vocab_size}.")
  if (input_path is None) == (passkey_count <= 0):
    raise ValueError("give exactly one of --input and --passkey_texts (a positive count).")
  if input_path is None:
    from memlm_jax.data import passkey  # pylint: disable=g-import-not-at-top
    transcripts = [speech.normalize_transcript(text, lowercase) for text in passkey.passkey_texts(passkey_count)]
    input_path = f"{passkey_count} passkey prompts"
  else:
    transcripts = read_transcripts(input_path, lowercase)
  if os.path.dirname(model_prefix):
    os.makedirs(os.path.dirname(model_prefix), exist_ok=True)
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(transcripts), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, normalization_rule_name="identity",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, split_digits=split_digits, num_threads=1, minloglevel=2)
  except RuntimeError as error:  # e.g. a vocabulary larger than the transcripts allow
    raise ValueError(f"SentencePiece training on {len(transcripts)} transcripts of {input_path!r} with "
                     f"vocab_size={vocab_size} failed: {error}") from error
  return model_prefix + ".model"


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", help="manifest .jsonl or text file of transcripts")
  parser.add_argument("--passkey_texts", type=int, default=0, help="train on this many passkey prompts instead")
  parser.add_argument("--split_digits", default=False, action=argparse.BooleanOptionalAction,
                      help="every digit its own piece")
  parser.add_argument("--model_prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--model_type", default="unigram", choices=MODEL_TYPES)
  parser.add_argument("--lowercase", default=True, action=argparse.BooleanOptionalAction,
                      help="lower-case transcripts (default; --nolowercase keeps case)")
  parser.add_argument("--character_coverage", type=float, default=1.0)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  absl_style = {"--nolowercase": "--no-lowercase", "--nosplit_digits": "--no-split_digits"}
  argv = [absl_style.get(a, a) for a in argv]  # absl-style spelling too
  args = _build_parser().parse_args(argv)
  try:
    model = train_spm(args.input, args.model_prefix, args.vocab_size, args.model_type, args.lowercase,
                      args.character_coverage, args.split_digits, args.passkey_texts)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"wrote {model} and {args.model_prefix}.vocab ({args.vocab_size} pieces, {args.model_type})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
