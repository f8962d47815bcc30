"""Training launcher (t5x style).

  python -m memlm_jax.train --gin_file=configs/tiny/lm_demo.gin \
      --gin.TRAIN_STEPS=100 --gin.MODEL_DIR="'runs/tiny'"

Resumes from the newest complete checkpoint in MODEL_DIR/checkpoints, with the
input pipeline where it was, so a killed run continues exactly.
"""

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  (every gin configurable, launchers included)
from memlm_jax.launch import train_lib
from memlm_jax.runtime.model_dir_lock import ModelDirLockedError


if __name__ == "__main__":
  gin_utils.run_launcher(train_lib.train, on_result=lambda _: None,
                          user_errors=(train_lib.TrainingDivergedError, ModelDirLockedError))
