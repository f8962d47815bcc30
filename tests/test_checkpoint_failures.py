"""Damaged checkpoints and diverging runs: fall back, stop clearly, never overwrite good state."""

import logging
import os

import jax
import numpy as np
import pytest

from memlm_jax.launch import train_lib as train
from memlm_jax.runtime.checkpoints import Checkpointer
from tests import lm_runs

FILES = ["runs/train.gin", "tiny/lm_demo.gin"]


def _train(tmp_path, name, **extra):
  model_dir = str(tmp_path / name)
  lm_runs.parse(FILES, lm_runs.tiny_bindings(str(tmp_path / "data"), model_dir, **extra))
  return model_dir, train.train(model_dir)


def _abstract_state(tmp_path, model_dir):
  """The abstract TrainState of the tiny run (same gin config as the run)."""
  from memlm_jax.runtime import partitioning
  from memlm_jax.runtime import train_state as train_state_lib
  from memlm_jax.runtime.optimizers import make_optimizer
  import gin
  model = gin.query_parameter("%MODEL").scoped_configurable_fn
  schedule = gin.query_parameter("train.schedule").scoped_configurable_fn()
  graphdef, abstract_params = train_state_lib.abstract_model(lambda rngs: model(rngs=rngs))
  abstract, _ = partitioning.Partitioner().train_state_shardings(abstract_params, make_optimizer(schedule=schedule))
  return abstract


def _damage(step_dir):
  """Truncates every data file of the saved train state."""
  damaged = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and "metadata" not in name:
        with open(path, "r+b") as f:
          f.truncate(16)
        damaged += 1
  assert damaged


def test_corrupted_latest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog, capfd):
  lm_runs.corpus(str(tmp_path / "data"))
  model_dir, _ = _train(tmp_path, "run", TRAIN_STEPS=10)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  ckpt = Checkpointer(ckpt_dir)
  assert ckpt.all_steps() == [5, 10]
  good = jax.device_get(ckpt.restore(5, _abstract_state(tmp_path, model_dir)))
  _damage(os.path.join(ckpt_dir, "10"))
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest(_abstract_state(tmp_path, model_dir))
  ckpt.close()
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, good, jax.device_get(state))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(os.path.join(ckpt_dir, "10") in w and "falling back" in w for w in warnings), warnings
  assert os.listdir(os.path.join(ckpt_dir, "corrupted"))  # quarantined, not deleted
  assert Checkpointer(ckpt_dir).all_steps() == [5]
  assert "Event loop is closed" not in capfd.readouterr().err  # the handled fallback prints no traceback


@pytest.mark.slow  # CI time budget; run by make test-all
def test_training_resumes_past_a_corrupted_checkpoint(tmp_path):
  lm_runs.corpus(str(tmp_path / "data"))
  model_dir, _ = _train(tmp_path, "run", TRAIN_STEPS=10)
  _damage(os.path.join(model_dir, "checkpoints", "10"))
  model_dir, metrics = _train(tmp_path, "run", TRAIN_STEPS=12)
  assert np.isfinite(metrics["loss"])
  assert Checkpointer(os.path.join(model_dir, "checkpoints")).all_steps() == [5, 10, 12]


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
  lm_runs.corpus(str(tmp_path / "data"))
  with pytest.raises(train.TrainingDivergedError, match=r"(loss|grad_norm|param_norm) is (nan|inf|-inf) at step \d+; stopping") as error:
    _train(tmp_path, "diverge", TRAIN_STEPS=20, **{"Checkpointer.save_interval_steps": 1,
                                                    "warmup_cosine_schedule.peak_value": 1e12,
                                                    "warmup_cosine_schedule.warmup_steps": 0,
                                                    "make_optimizer.clip_grad_norm": None})
  bad_step = int(str(error.value).split("at step ")[1].split(";")[0])
  assert bad_step >= 2, "diverged before any checkpoint could be written; the test needs a later NaN"
  ckpt_dir = str(tmp_path / "diverge" / "checkpoints")
  ckpt = Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == bad_step - 1, (ckpt.all_steps(), bad_step)
  state = jax.device_get(ckpt.restore(bad_step - 1, _abstract_state(tmp_path, str(tmp_path / "diverge"))))
  ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_the_same_arrays_in_another_tree_are_a_mismatch_not_damage(tmp_path):
  """A checkpoint of a plain TrainState restored as a CarryingTrainState whose carry has no arrays (the leaf
  shapes all agree, the tree does not) stops with CheckpointMismatchError and moves nothing: a code or
  config change is never treated as a damaged checkpoint."""
  from memlm_jax.runtime.checkpoints import CheckpointMismatchError  # pylint: disable=g-import-not-at-top
  from memlm_jax.runtime.train_state import CarryingTrainState  # pylint: disable=g-import-not-at-top
  lm_runs.corpus(str(tmp_path / "data"))
  model_dir, _ = _train(tmp_path, "run", TRAIN_STEPS=5)
  abstract = _abstract_state(tmp_path, model_dir)
  other_tree = CarryingTrainState(step=abstract.step, params=abstract.params, opt_state=abstract.opt_state, carry=())
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  ckpt = Checkpointer(ckpt_dir)
  with pytest.raises(CheckpointMismatchError, match="another tree structure"):
    ckpt.restore_latest(other_tree)
  ckpt.close()
  assert Checkpointer(ckpt_dir).all_steps() == [5] and not os.path.exists(os.path.join(ckpt_dir, "corrupted"))
