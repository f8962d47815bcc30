"""Inference launcher: restore a checkpoint and continue prompts into a JSONL file.

  python -m memlm_jax.infer --gin_file=runs/infer.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.INPUT_FILE="'prompts.txt'"

INPUT_FILE holds one prompt per line (or JSONL with a "prompt" field). Output:
MODEL_DIR/infer/<input name>_step<N>.jsonl, one {"prompt", "output", "tokens"} per line,
in input order.
"""

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  (every gin configurable, launchers included)
from memlm_jax.launch import infer_lib


if __name__ == "__main__":
  gin_utils.run_launcher(infer_lib.infer)
