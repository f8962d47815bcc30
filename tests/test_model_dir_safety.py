"""A changed config never costs a checkpoint: resume, eval and a second trainer stop with one
clear error and leave the model directory exactly as it was."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from memlm_jax.launch import eval_lib
from memlm_jax.launch import train_lib as train
from memlm_jax.runtime.checkpoints import CheckpointMismatchError, Checkpointer
from memlm_jax.runtime.model_dir_lock import LOCK_NAME, ModelDirLock, ModelDirLockedError
from tests import lm_runs

FILES = ["runs/train.gin", "tiny/lm_demo.gin"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-layer tiny LM trained 5 steps (checkpoint at step 5, operative config beside it)."""
  root = tmp_path_factory.mktemp("trained")
  lm_runs.corpus(str(root / "data"))
  model_dir = str(root / "run")
  lm_runs.parse(FILES, lm_runs.tiny_bindings(str(root / "data"), model_dir, TRAIN_STEPS=5))
  train.train(model_dir)
  assert Checkpointer(os.path.join(model_dir, "checkpoints")).all_steps() == [5]
  return root


def _copy(trained, tmp_path) -> str:
  model_dir = str(tmp_path / "run")
  shutil.copytree(str(trained / "run"), model_dir)
  return model_dir


def _snapshot(directory: str) -> dict:
  """{relative path: (size, mtime)} of every file under `directory`."""
  found = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      found[os.path.relpath(path, directory)] = (os.path.getsize(path), os.path.getmtime(path))
  return found


def _parse(trained, model_dir, **extra):
  lm_runs.parse(FILES, lm_runs.tiny_bindings(str(trained / "data"), model_dir, **extra))


def test_resuming_with_another_model_stops_naming_parameter_and_binding_and_changes_nothing(trained, tmp_path):
  model_dir = _copy(trained, tmp_path)
  before = _snapshot(model_dir)
  _parse(trained, model_dir, TRAIN_STEPS=10, **{"TransformerLM.num_layers": 3})
  with pytest.raises(CheckpointMismatchError) as error:
    train.train(model_dir)
  message = str(error.value)
  assert "'params/layers/2/" in message and "not in the checkpoint" in message, message
  assert "TransformerLM.num_layers: 2 -> 3" in message, message
  assert "operative_config.gin" in message
  assert _snapshot(model_dir) == before  # nothing quarantined, overwritten or added (config.gin included)


def test_resuming_with_another_batch_size_stops_with_both_shapes(trained, tmp_path):
  model_dir = _copy(trained, tmp_path)
  before = _snapshot(model_dir)
  _parse(trained, model_dir, TRAIN_STEPS=10, BATCH_SIZE=16)
  with pytest.raises(CheckpointMismatchError) as error:
    train.train(model_dir)
  message = str(error.value)
  assert "(8, 32)" in message and "(16, 32)" in message and "batch size" in message, message
  assert "BATCH_SIZE: 8 -> 16" in message, message
  assert _snapshot(model_dir) == before


def test_eval_of_another_model_stops_before_computing_anything(trained, tmp_path):
  model_dir = _copy(trained, tmp_path)
  before = _snapshot(model_dir)
  lm_runs.parse(["runs/eval.gin", "tiny/lm_demo.gin"],
                lm_runs.tiny_bindings(str(trained / "data"), model_dir, **{"TransformerLM.num_layers": 1}))
  with pytest.raises(CheckpointMismatchError, match=r"'layers/1/.*of the checkpoint is not in the configured model"):
    eval_lib.run_eval(model_dir)
  assert _snapshot(model_dir) == before  # no result file written
  lm_runs.parse(["runs/eval.gin", "tiny/lm_demo.gin"],
                lm_runs.tiny_bindings(str(trained / "data"), model_dir, **{"TransformerLM.mlp_dim": 96}))
  with pytest.raises(CheckpointMismatchError, match=r"has shape \((64, 192|192, 64)\) in the checkpoint but \((64, 96|96, 64)\)"):
    eval_lib.run_eval(model_dir)


def test_a_second_trainer_on_a_locked_model_dir_stops_naming_the_holder(trained, tmp_path):
  model_dir = _copy(trained, tmp_path)
  before = _snapshot(model_dir)
  _parse(trained, model_dir, TRAIN_STEPS=10)
  with ModelDirLock(model_dir):
    holder = json.load(open(os.path.join(model_dir, LOCK_NAME)))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ModelDirLockedError, match=rf"in use by another trainer \(pid {os.getpid()} on host"):
      train.train(model_dir)
  assert _snapshot(model_dir) == before  # and the lock file is gone again


@pytest.mark.slow  # CI time: a launcher process; the lock itself is tested in-process above
def test_the_train_launcher_reports_a_held_lock_in_one_line(trained, tmp_path):
  model_dir = str(tmp_path / "locked")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom memlm_jax.runtime.model_dir_lock import ModelDirLock\n"
       f"ModelDirLock({model_dir!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
      cwd=lm_runs.REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    argv = lm_runs.launcher("train", FILES, lm_runs.tiny_bindings(str(trained / "data"), model_dir))
    proc = lm_runs.run(argv)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 1, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"pid {holder.pid} on host" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert os.listdir(model_dir) == [LOCK_NAME]  # nothing of the second run was written


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  finished = subprocess.Popen(["true"])
  finished.wait()  # its pid no longer runs
  lock_file = tmp_path / LOCK_NAME
  lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": finished.pid, "started": time.time() - 60}))
  with caplog.at_level("WARNING"):
    with ModelDirLock(str(tmp_path)):
      assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert any("Taking over the lock" in r.getMessage() and f"pid {finished.pid}" in r.getMessage()
             for r in caplog.records)
  assert not lock_file.exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
  lock_file = tmp_path / LOCK_NAME
  lock_file.write_text(json.dumps({"host": "some-other-host", "pid": 1234, "started": time.time()}))
  with pytest.raises(ModelDirLockedError, match=r"from another host \(pid 1234 on host 'some-other-host'.*delete"):
    ModelDirLock(str(tmp_path)).acquire()
  assert json.loads(lock_file.read_text())["host"] == "some-other-host"
