r"""KMP biasing on the synthetic rare-name corpus: the whole sweep in one process, then the table.

  python experiments/kmp_synthetic/run.py [--data_dir=runs/synth_speech] [--model_dir=runs/asr] \
      [--splits=test,validation] [--binding='kmp_sweep.shallow_deltas = [0.25, 2.0]'] [--binding=...]

Needs the trained transducer of experiments/transducer_synthetic/run.py. The settings are
runs/asr_eval.gin, tiny/transducer_synthetic.gin and sweep.gin (beside this script; --binding
changes any of them): beam 4; no biasing, KMP shallow
fusion at each kmp_sweep.shallow_deltas and on-the-fly rescoring at each kmp_sweep.rescore_deltas,
on the utterances' own lists and on anti-biasing lists. Per split the model is restored once and
one decoder compiled per mode; each setting writes
MODEL_DIR/eval/asr_<split>_beam4[_kmp<delta><mode>][_anti]_step<N>.json and .jsonl (which
scripts/kmp_table.py reads too), and the table goes to stdout and MODEL_DIR/eval/kmp_table_<split>.md.
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
from memlm_jax.evaluation import kmp_table  # noqa: E402
from memlm_jax.launch import asr_lib  # noqa: E402

SWEEP_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.gin")


def corpus_bindings(data_dir: str) -> list[str]:
  """Gin bindings pointing tiny/transducer_synthetic.gin at the corpus in data_dir."""
  return [f"{macro} = '{os.path.join(data_dir, name)}'" for macro, name in (
      ("TRAIN_MANIFEST", "train.jsonl"), ("DEV_MANIFEST", "dev.jsonl"), ("TEST_MANIFEST", "test.jsonl"),
      ("SPM_MODEL", "spm.model"))]


def run_sweep(model_dir: str, splits: Sequence[str], bindings: Sequence[str] = ()) -> dict[str, str]:
  """Parses sweep.gin with `bindings`, runs the sweep on each split; returns {split: table}."""
  gin.clear_config()
  gin_utils.parse_gin(["runs/asr_eval.gin", "tiny/transducer_synthetic.gin", SWEEP_GIN],
                      [f"MODEL_DIR = {model_dir!r}", *bindings], [os.path.join(REPO, "configs"), REPO])
  tables = {}
  for split in splits:
    runs = asr_lib.asr_eval(model_dir, split=split)["runs"]
    tables[split] = kmp_table.format_table(runs)
    with open(os.path.join(model_dir, "eval", f"kmp_table_{split}.md"), "w") as f:
      f.write(tables[split] + "\n")
  return tables


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="runs/synth_speech", help="the corpus and its spm.model")
  parser.add_argument("--model_dir", default="runs/asr", help="the trained transducer's MODEL_DIR")
  parser.add_argument("--splits", default="test", help="comma-separated, of train, validation, test")
  parser.add_argument("--binding", action="append", default=[],
                      help="extra gin binding, e.g. --binding='asr_eval.beam_size = 8' (repeatable)")
  args = parser.parse_args(argv)
  if not os.path.isdir(os.path.join(args.model_dir, "checkpoints")) or not os.path.isfile(
      os.path.join(args.data_dir, "spm.model")):
    print(f"error: no trained model in {args.model_dir} or no corpus in {args.data_dir}: run "
          "experiments/transducer_synthetic/run.py first.", file=sys.stderr)
    return 1
  splits = [s for s in args.splits.split(",") if s]
  try:
    tables = run_sweep(args.model_dir, splits, corpus_bindings(args.data_dir) + args.binding)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print("\n\n".join(tables.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
