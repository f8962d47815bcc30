"""Evaluation launcher: restore a checkpoint, compute validation metrics, write JSON.

  python -m memlm_jax.eval --gin_file=runs/eval.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" [--gin.evaluate.checkpoint_step=300]

Writes MODEL_DIR/eval/<task>_<split>_step<N>.json (loss, perplexity, accuracy, tokens)
and the same scalars to TensorBoard under MODEL_DIR/eval.
"""

import json

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  (every gin configurable, launchers included)
from memlm_jax.launch import eval_lib


def print_scalars(metrics: dict) -> None:
  """One JSON line of the scalar results; per-example lists stay in the written JSON file.
  With --quiet the launcher has shown its results already."""
  if gin_utils.QUIET.value:
    return
  print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}))


if __name__ == "__main__":
  gin_utils.run_launcher(eval_lib.run_eval, on_result=print_scalars)
