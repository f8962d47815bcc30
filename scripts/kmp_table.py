r"""KMP biasing table (experiments/kmp_synthetic) from asr_eval's JSON; the table code is
memlm_jax/evaluation/kmp_table.py.

  python scripts/kmp_table.py runs/asr/eval [--split=test] [--beam_size=4] [--step=N]

Reads every MODEL_DIR/eval/asr_*.json of that split and beam width (the newest step unless
--step) and prints one row per biasing setting (values in %).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm_jax.evaluation.kmp_table import format_table, load_results  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("eval_dir", help="MODEL_DIR/eval of the asr_eval runs")
  parser.add_argument("--split", default="test")
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  args = parser.parse_args(argv)
  try:
    print(format_table(load_results(args.eval_dir, args.split, args.beam_size, args.step)))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
