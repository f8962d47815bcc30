"""A run killed with SIGKILL at a random step and relaunched continues exactly."""

import os
import random
import signal
import subprocess
import time
import pytest

from memlm_jax.launch import train_lib as train
from memlm_jax.runtime.summaries import read_jsonl
from tests import lm_runs

FILES = ["runs/train.gin", "tiny/lm_demo.gin"]


def _steps_logged(model_dir):
  path = os.path.join(model_dir, "train", "metrics.jsonl")
  return max(read_jsonl(path)) if os.path.exists(path) and os.path.getsize(path) else 0


def _finished_checkpoints(model_dir):
  directory = os.path.join(model_dir, "checkpoints")
  return [d for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []


def test_sigkill_then_relaunch_reproduces_the_uninterrupted_losses(tmp_path):
  data = lm_runs.corpus(str(tmp_path / "data"))
  reference_dir, killed_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
  extra = {"TRAIN_STEPS": 24, "Checkpointer.save_interval_steps": 4, "TransformerLM.dropout_rate": 0.1}
  lm_runs.parse(FILES, lm_runs.tiny_bindings(data, reference_dir, **extra))
  train.train(reference_dir)  # the uninterrupted run, in this process (same XLA flags as the launcher's)

  kill_at = random.Random(os.getpid()).randint(6, 20)
  argv = lm_runs.launcher("train", FILES, lm_runs.tiny_bindings(data, killed_dir, **extra))
  process = subprocess.Popen(argv, cwd=lm_runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while ((_steps_logged(killed_dir) < kill_at or not _finished_checkpoints(killed_dir))
         and process.poll() is None and time.time() < deadline):
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  logged_before_kill = _steps_logged(killed_dir)
  assert 0 < logged_before_kill < 24, f"the run was not killed mid-way (logged {logged_before_kill} steps)"

  resumed = lm_runs.run(argv)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  restored = [line for line in resumed.stderr.splitlines() if "Restored checkpoint at step" in line]
  assert restored, "the relaunch did not restore a checkpoint"
  restored_step = int(restored[0].rsplit(" ", 1)[-1].rstrip("."))
  assert restored_step % 4 == 0 and restored_step <= logged_before_kill

  want = read_jsonl(os.path.join(reference_dir, "train", "metrics.jsonl"))
  got = read_jsonl(os.path.join(killed_dir, "train", "metrics.jsonl"))
  for step in range(restored_step + 1, 25):
    assert got[step]["loss"] == want[step]["loss"], f"step {step}: {got[step]['loss']} != {want[step]['loss']}"
    assert got[step]["grad_norm"] == want[step]["grad_norm"]


@pytest.mark.slow  # CI time budget; run by make test-all
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  data = lm_runs.corpus(str(tmp_path / "data"))
  model_dir = str(tmp_path / "run")
  argv = lm_runs.launcher("train", FILES, lm_runs.tiny_bindings(
      data, model_dir, TRAIN_STEPS=100000, **{"Checkpointer.save_interval_steps": 100000}))
  process = subprocess.Popen(argv, cwd=lm_runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while _steps_logged(model_dir) < 3 and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  steps = sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())
  assert len(steps) == 1 and 3 <= steps[0] <= _steps_logged(model_dir)
