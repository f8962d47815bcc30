"""What the transducer diagnostics (scripts/asr_errors.py, scripts/nam_diagnostics.py) share: a trained
Transducer restored from MODEL_DIR's newest checkpoint and the first batch of a split, in order."""

from __future__ import annotations

import os
from typing import Sequence

import gin
import numpy as np
import seqio
from flax import nnx

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  (every gin configurable)
from memlm_jax.data import speech, speech_features
from memlm_jax.models.transducer import Transducer
from memlm_jax.runtime.checkpoints import warm_start_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def restored_transducer_and_batch(config: str, model_dir: str, split: str, batch_size: int,
                                  bindings: Sequence[str] = (), include_text: bool = False
                                  ) -> tuple[Transducer, dict[str, np.ndarray], seqio.Vocabulary]:
  """(the model of `config` with model_dir's newest parameters, the first host batch of `split` as the
  speech pipeline makes it, the targets' vocabulary). Raises ValueError when the checkpoint lacks some
  of the model's parameters (e.g. a biaser config over a base model)."""
  gin_utils.parse_gin(["runs/train.gin", config], [f"MODEL_DIR = {model_dir!r}", *bindings],
                      [os.path.join(REPO, "configs"), REPO])
  task = speech.manifest_task()
  vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
  max_audio, max_target = gin.query_parameter("%MAX_AUDIO_SAMPLES"), gin.query_parameter("%MAX_TARGET_LENGTH")
  batch = next(speech_features.speech_batches(task, split, batch_size, max_audio, max_target, shuffle=False,
                                              include_text=include_text))
  with nnx.use_eager_sharding(False):
    model = Transducer(rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  restored, left_at_init = warm_start_params(model_dir, params.to_pure_dict())
  if left_at_init:
    raise ValueError(f"{model_dir} lacks {left_at_init[:3]}...; was it trained with {config}?")
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return model, batch, vocabulary
