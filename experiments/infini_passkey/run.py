r"""The passkey recipe's ablations and its seed spread, in one process; prints the table.

  python experiments/infini_passkey/run.py --variants=recipe,linear,no_augmentation --seeds=0 \
      --lengths=2048,32768,1048576 --output_dir=runs/passkey_ablation
  python experiments/infini_passkey/run.py --variants=recipe --seeds=0,1,2       # the 3-seed check

Each (variant, seed) trains stage 1 (configs/tiny/infini_passkey.gin) and stage 2
(configs/tiny/infini_passkey_stage2.gin, warm-started from stage 1), then evaluates passkey
retrieval at --lengths. Runs resume (a finished stage is skipped; an eval already written
with the same lengths and examples is reused), so the script can be stopped and rerun.
Variants (gin bindings on top of the recipe):
  recipe           BPE vocabulary, delta rule, long-haystack write weights in stage 2
  linear           the linear update rule instead of delta
  no_augmentation  stage 2 without write weights (the same steps, plain data)
  bytes            the byte vocabulary (prompts 300..1000 bytes in 1024-token sequences)
  dense            the dense baseline, 5000 steps (its eval stops at 32K: exceeds context beyond)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gin  # noqa: E402
import numpy as np  # noqa: E402

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (every gin configurable)
from memlm_jax.evaluation import passkey_report  # noqa: E402
from memlm_jax.launch import eval_lib, train_lib  # noqa: E402
from memlm_jax.runtime import progress  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEARCH_PATHS = [os.path.join(REPO, "configs"), REPO]
STAGE1, STAGE2 = "tiny/infini_passkey.gin", "tiny/infini_passkey_stage2.gin"
BYTE_LENGTHS = list(range(300, 1001, 50))

# variant -> (stage-1 gin, stage-2 gin or None, bindings for every stage and the eval, bindings for
# stage 2 only). Variants without bindings of their own share the recipe's stage 1 (same seed).
VARIANTS = {
    "recipe": (STAGE1, STAGE2, [], []),
    "linear": (STAGE1, STAGE2, ["InfiniTransformerLM.update_rule = 'linear'"], []),
    "no_augmentation": (STAGE1, STAGE2, [], ["passkey_task.long_haystack_probability = 0.0",
                                             "train/DatasetConfig.passthrough_features = []"]),
    "bytes": (STAGE1, STAGE2, ["PASSKEY_VOCABULARY = @byte_vocabulary()", "InfiniTransformerLM.vocab_size = 384",
                               "SEQUENCE_LENGTH = 1024", f"passkey_task.lengths = {BYTE_LENGTHS}"], []),
    "dense": ("tiny/dense_passkey.gin", None, [], []),
}


def _parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin(files, bindings, SEARCH_PATHS)


def run_one(variant: str, seed: int, lengths: Sequence[int], examples: int, output_dir: str,
            bindings: Sequence[str] = ()) -> dict:
  """Trains both stages of (variant, seed) (resuming) and returns its passkey results;
  `bindings` (gin) apply on top of every variant (e.g. fewer steps for a smoke test)."""
  stage1, stage2, extra, stage2_only = VARIANTS[variant]
  run_dir = os.path.join(output_dir, f"{variant}_seed{seed}")
  common = extra + [f"train.seed = {seed}", f"passkey_task.seed = {seed}"] + list(bindings)
  stage1_owner = variant if extra or stage1 != STAGE1 else "recipe"
  final_dir = os.path.join(output_dir, f"{stage1_owner}_seed{seed}", "stage1")
  _parse(["runs/train.gin", stage1], common + [f"MODEL_DIR = {final_dir!r}"])
  train_lib.train(final_dir)
  if stage2 is not None:
    stage2_dir = os.path.join(run_dir, "stage2")
    _parse(["runs/train.gin", stage2], common + stage2_only + [f"MODEL_DIR = {stage2_dir!r}",
                                                               f"INIT_FROM = {final_dir!r}"])
    train_lib.train(stage2_dir)
    final_dir = stage2_dir
  saved = os.path.join(run_dir, "passkey.json")
  if os.path.exists(saved):
    with open(saved) as f:
      payload = json.load(f)
    if payload.get("lengths") == list(lengths) and payload.get("examples_per_bucket") == examples:
      return payload
  _parse(["runs/passkey_eval.gin", stage1], common + [
      f"MODEL_DIR = {final_dir!r}", f"PASSKEY_LENGTHS = {list(lengths)}",
      f"passkey_eval.examples_per_bucket = {examples}", f"passkey_eval.label = '{variant} seed {seed}'"])
  payload = eval_lib.run_eval(final_dir)
  payload.update(lengths=list(lengths), examples_per_bucket=examples)
  eval_lib.write_json(saved, payload)
  return payload


def exact_by_length(payload: dict) -> dict[int, float | None]:
  """Exact match over all depths per length (None where the model was not run)."""
  out: dict[int, list] = {}
  for row in payload["summary"]:
    if row["status"] == "ok":
      out.setdefault(row["length"], []).append((row["exact_match"], row["examples"]))
    else:
      out.setdefault(row["length"], [])
  return {length: (sum(e * n for e, n in cells) / sum(n for _, n in cells) if cells else None)
          for length, cells in out.items()}


def summary_table(results: dict[tuple[str, int], dict], lengths: Sequence[int]) -> str:
  """Rows per (variant, seed), then per variant with several seeds: mean and min..max."""
  header = ["Variant", "Seed"] + [passkey_report.length_label(n) for n in lengths]
  rows = []
  by_variant: dict[str, list[dict]] = {}
  for (variant, seed), payload in results.items():
    exact = exact_by_length(payload)
    by_variant.setdefault(variant, []).append(exact)
    rows.append([variant, str(seed)] + [_pct(exact.get(n)) for n in lengths])
  for variant, runs in by_variant.items():
    if len(runs) > 1:
      cells = []
      for n in lengths:
        values = [r[n] for r in runs if r.get(n) is not None]
        cells.append(f"{100 * np.mean(values):.0f} ({100 * min(values):.0f}..{100 * max(values):.0f})"
                     if values else "n/a")
      rows.append([variant, f"mean of {len(runs)}"] + cells)
  return ("Passkey exact match (%) over all depths, per length (tokens of the run's vocabulary)\n"
          + passkey_report.markdown(header, rows))


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.0f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default="recipe", help=f"comma-separated, of {sorted(VARIANTS)}")
  parser.add_argument("--seeds", default="0", help="comma-separated ints")
  parser.add_argument("--lengths", default="2048,8192,32768,131072,524288,1048576")
  parser.add_argument("--examples_per_bucket", type=int, default=4)
  parser.add_argument("--output_dir", default="runs/passkey_experiments")
  parser.add_argument("--binding", action="append", default=[],
                      help="extra gin binding for every run, e.g. --binding='TRAIN_STEPS = 10' (repeatable)")
  args = parser.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    print(f"error: --variants: unknown {unknown[0]!r}; expected some of {sorted(VARIANTS)}.", file=sys.stderr)
    return 2
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s]
    lengths = [int(n) for n in args.lengths.split(",") if n]
  except ValueError as error:
    print(f"error: --seeds and --lengths take comma-separated ints ({error}).", file=sys.stderr)
    return 2
  if not seeds or not lengths or min(lengths) <= 0:
    print("error: --seeds and --lengths need at least one value; lengths must be positive.", file=sys.stderr)
    return 2
  progress.enable()
  results = {}
  for variant in variants:
    for seed in seeds:
      results[(variant, seed)] = run_one(variant, seed, lengths, args.examples_per_bucket, args.output_dir,
                                         args.binding)
  table = summary_table(results, lengths)
  print(table)
  os.makedirs(args.output_dir, exist_ok=True)
  with open(os.path.join(args.output_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
