"""Inference launcher: restore a checkpoint and continue prompts into a JSONL file.

  python -m memlm_jax.infer --gin_file=runs/infer.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.INPUT_FILE="'prompts.txt'"

INPUT_FILE holds one prompt per line (or JSONL with a "prompt" field). Output:
MODEL_DIR/infer/<input name>_step<N>.jsonl, one {"prompt", "output", "tokens"} per line,
in input order.
"""

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  pylint: disable=unused-import  (every configurable, launchers included)
from memlm_jax.launch import infer_lib


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}")
  gin_utils.parse_flags_and_gin()
  model_dir = gin_utils.model_dir()
  try:
    with gin_utils.one_line_gin_errors():
      print(infer_lib.infer(model_dir))
  except (ValueError, FileNotFoundError) as error:
    gin_utils.exit_with_error(error)


if __name__ == "__main__":
  gin_utils.run(main)
