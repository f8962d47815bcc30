r"""Tiny Conformer transducer on the espeak-ng corpus, on a CPU, in one process: corpus, vocabulary,
training (configs/tiny/transducer_synthetic.gin: 2000 steps), then WER on the test split at each
beam width, printed as a table.

  python experiments/transducer_synthetic/run.py [--data_dir=runs/synth_speech] [--model_dir=runs/asr] \
      [--beam_sizes=1,4] [--binding='TRAIN_STEPS = 500'] [--binding=...]

Every step resumes: an existing corpus or vocabulary is kept, and training continues from the
newest checkpoint (a finished run only evaluates). Each beam width writes
MODEL_DIR/eval/asr_test_beam<K>_step<N>.json and .jsonl (beam 1 is greedy decoding); the table
goes to stdout and MODEL_DIR/eval/wer_table_test.md. Phrase boosting: experiments/kmp_synthetic.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import gin  # noqa: E402

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (every gin configurable)
from memlm_jax.evaluation.passkey_report import markdown  # noqa: E402
from memlm_jax.launch import asr_lib, train_lib  # noqa: E402
from scripts import make_synthetic_speech, train_spm  # noqa: E402

CONFIG = "tiny/transducer_synthetic.gin"


def corpus_bindings(data_dir: str) -> list[str]:
  """Gin bindings pointing tiny/transducer_synthetic.gin at the corpus in data_dir."""
  return [f"{macro} = '{os.path.join(data_dir, name)}'" for macro, name in (
      ("TRAIN_MANIFEST", "train.jsonl"), ("DEV_MANIFEST", "dev.jsonl"), ("TEST_MANIFEST", "test.jsonl"),
      ("SPM_MODEL", "spm.model"))]


def _parse(run_file: str, bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin([run_file, CONFIG], bindings, [os.path.join(REPO, "configs"), REPO])


def make_data(data_dir: str, num_utterances: int, vocab_size: int) -> None:
  """The espeak-ng corpus and its SentencePiece vocabulary, unless data_dir has them."""
  if not os.path.isfile(os.path.join(data_dir, "train.jsonl")):
    if make_synthetic_speech.main([f"--output_dir={data_dir}", f"--num_utterances={num_utterances}"]):
      raise ValueError(f"making the corpus in {data_dir!r} failed.")
  if not os.path.isfile(os.path.join(data_dir, "spm.model")):
    if train_spm.main([f"--input={os.path.join(data_dir, 'train.jsonl')}",
                       f"--model_prefix={os.path.join(data_dir, 'spm')}", f"--vocab_size={vocab_size}"]):
      raise ValueError(f"training the SentencePiece vocabulary in {data_dir!r} failed.")


def wer_table(payloads: Sequence[dict]) -> str:
  """Markdown table: one row per beam width (WER, S / D / I, B-WER, U-WER in %)."""
  percent = lambda payload, key: f"{100 * payload[key]:.1f}%" if key in payload else "-"  # noqa: E731
  rows = [["greedy" if p["beam_size"] == 1 else f"beam {p['beam_size']} ({p['beam_method']})",
           percent(p, "wer"), f"{p['substitutions']} / {p['deletions']} / {p['insertions']}",
           percent(p, "b_wer"), percent(p, "u_wer")] for p in payloads]
  first = payloads[0]
  title = f"{first['task']} {first['split']} split, step {first['step']}, {first['reference_words']} words"
  return title + "\n\n" + markdown(["decoding", "WER", "S / D / I", "B-WER (names)", "U-WER (other words)"], rows)


def run(data_dir: str, model_dir: str, beam_sizes: Sequence[int], bindings: Sequence[str] = (),
        num_utterances: int = 400, vocab_size: int = 128) -> str:
  """Data, training (resumed) and the eval at each beam width; returns the table."""
  make_data(data_dir, num_utterances, vocab_size)
  common = corpus_bindings(data_dir) + [f"MODEL_DIR = {model_dir!r}", *bindings]
  _parse("runs/train.gin", common)
  train_lib.train(model_dir)
  _parse("runs/asr_eval.gin", common)
  table = wer_table([asr_lib.asr_eval(model_dir, beam_size=beam) for beam in beam_sizes])
  with open(os.path.join(model_dir, "eval", "wer_table_test.md"), "w") as f:
    f.write(table + "\n")
  return table


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="runs/synth_speech", help="where the corpus and spm.model go")
  parser.add_argument("--model_dir", default="runs/asr")
  parser.add_argument("--beam_sizes", default="1,4", help="comma-separated beam widths (1 = greedy)")
  parser.add_argument("--num_utterances", type=int, default=400)
  parser.add_argument("--vocab_size", type=int, default=128)
  parser.add_argument("--binding", action="append", default=[],
                      help="extra gin binding for training and eval, e.g. --binding='TRAIN_STEPS = 500' (repeatable)")
  args = parser.parse_args(argv)
  try:
    beam_sizes = [int(b) for b in args.beam_sizes.split(",") if b]
    print(run(args.data_dir, args.model_dir, beam_sizes, args.binding, args.num_utterances, args.vocab_size))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
