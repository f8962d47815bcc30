"""Training launcher (t5x style).

  python -m memlm_jax.train --gin_file=configs/tiny/lm_demo.gin \
      --gin.TRAIN_STEPS=100 --gin.MODEL_DIR="'runs/tiny'"

Resumes from the newest complete checkpoint in MODEL_DIR/checkpoints, with the
input pipeline where it was, so a killed run continues exactly.
"""

import gin

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  pylint: disable=unused-import  (every configurable, launchers included)
from memlm_jax.launch import train_lib


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}")
  gin_utils.parse_flags_and_gin()
  model_dir = gin_utils.model_dir()
  gin_utils.write_config(model_dir, "config.gin", gin.config_str())
  try:
    with gin_utils.one_line_gin_errors():
      train_lib.train(model_dir)
  except (train_lib.TrainingDivergedError, ValueError, FileNotFoundError) as error:
    gin_utils.exit_with_error(error)


if __name__ == "__main__":
  gin_utils.run(main)
