"""--gin.CHECKPOINT_STEP picks the checkpoint every eval kind restores; an absent step is an
error listing the steps that exist (issue 12, item 5)."""

import json
import os

import pytest

from memlm_jax.launch import eval_lib, train_lib
from tests import lm_runs

TRAIN_FILES = ["runs/train.gin", "tiny/lm_demo.gin"]
EVAL_FILES = ["runs/eval.gin", "tiny/lm_demo.gin"]


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt_step")
  data = lm_runs.corpus(str(tmp / "data"), train_docs=60, validation_docs=8)
  model_dir = str(tmp / "run")
  bindings = lm_runs.tiny_bindings(data, model_dir, TRAIN_STEPS=6, **{"Checkpointer.save_interval_steps": 3})
  lm_runs.parse(TRAIN_FILES, bindings)
  train_lib.train(model_dir)
  return data, model_dir


def _evaluate(data, model_dir, *extra):
  lm_runs.parse(EVAL_FILES, lm_runs.tiny_bindings(data, model_dir) + list(extra))
  return eval_lib.run_eval(model_dir)


def test_checkpoint_step_selects_the_checkpoint(run_with_two_checkpoints):
  data, model_dir = run_with_two_checkpoints
  newest = _evaluate(data, model_dir)
  older = _evaluate(data, model_dir, "CHECKPOINT_STEP = 3")
  written = sorted(os.listdir(os.path.join(model_dir, "eval")))
  assert any(name.endswith("_step3.json") for name in written), written
  assert any(name.endswith("_step6.json") for name in written), written
  step3 = [n for n in written if n.endswith("_step3.json")][0]
  with open(os.path.join(model_dir, "eval", step3)) as f:
    assert json.load(f)["step"] == 3
  assert older["loss"] != newest["loss"]  # three more updates change the model


def test_an_absent_checkpoint_step_lists_the_steps_that_exist(run_with_two_checkpoints):
  data, model_dir = run_with_two_checkpoints
  with pytest.raises(FileNotFoundError, match=r"step 4 .*\[3, 6\]"):
    _evaluate(data, model_dir, "CHECKPOINT_STEP = 4")
