"""Evaluation launcher: restore a checkpoint, compute validation metrics, write JSON.

  python -m memlm_jax.eval --gin_file=runs/eval.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" [--gin.evaluate.checkpoint_step=300]

Writes MODEL_DIR/eval/<task>_<split>_step<N>.json (loss, perplexity, accuracy, tokens)
and the same scalars to TensorBoard under MODEL_DIR/eval.
"""

import json


from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  pylint: disable=unused-import  (every configurable, launchers included)
from memlm_jax.launch import eval_lib


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}")
  gin_utils.parse_flags_and_gin()
  model_dir = gin_utils.model_dir()
  try:
    with gin_utils.one_line_gin_errors():
      metrics = eval_lib.evaluate(model_dir)
  except (ValueError, FileNotFoundError) as error:
    gin_utils.exit_with_error(error)
  print(json.dumps(metrics))


if __name__ == "__main__":
  gin_utils.run(main)
