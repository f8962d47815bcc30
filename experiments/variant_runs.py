"""What experiments/infini_lm/run.py and experiments/infini_booksum/run.py share: their command line (variants,
steps, extra gin bindings) and where they write the table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence


def parse_args(argv: Optional[Sequence[str]], description: str, variants: Sequence[str], out_dir: str,
               data_dir: str) -> tuple[argparse.Namespace, list[str]] | None:
  """(the flags with `variants` a list, the gin bindings every run adds), or None after printing the error of a
  bad flag (an unknown variant, a non-positive --train_steps)."""
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default=out_dir, help="the models and the table")
  parser.add_argument("--data_dir", default=data_dir, help="the generated corpus and its vocabulary")
  parser.add_argument("--variants", default=",".join(variants), help=f"of {tuple(variants)}")
  parser.add_argument("--train_steps", type=int, default=None, help="override TRAIN_STEPS for every model")
  parser.add_argument("--binding", action="append", default=[], help="extra gin binding for every run")
  args = parser.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in args.variants if v not in variants]
  if unknown:
    print(f"error: unknown variant {unknown[0]!r}; choose from {tuple(variants)}.", file=sys.stderr)
    return None
  if args.train_steps is not None and args.train_steps < 1:
    print(f"error: --train_steps must be >= 1, got {args.train_steps}.", file=sys.stderr)
    return None
  return args, list(args.binding) + ([f"TRAIN_STEPS = {args.train_steps}"] if args.train_steps else [])


def write_table(out_dir: str, text: str, results: Mapping[str, Any]) -> None:
  """OUT_DIR/table.md and OUT_DIR/results.json, and the table on stdout."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(text)
