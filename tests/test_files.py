"""Files under a non-local MODEL_DIR (gs:// on a pod): tf.io.gfile's in-memory ram:// filesystem
stands in for the bucket, and nothing may appear on the local disk instead."""

from __future__ import annotations

import json
import os
import uuid

import gin
import pytest
import tensorflow as tf

from memlm_jax import gin_utils
from memlm_jax.evaluation import kmp_table
from memlm_jax.evaluation import passkey_report as pk
from memlm_jax.launch import asr_lib, eval_lib
from memlm_jax.runtime import checkpoints, files, summaries
from memlm_jax.runtime.summaries import MetricsLogger, read_jsonl


@pytest.fixture
def remote_dir(tmp_path, monkeypatch) -> str:
  """A fresh ram:// MODEL_DIR; the test runs in an empty local directory that must stay empty
  (a path mistaken for a local one would create `ram:/...` there)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield f"ram://{uuid.uuid4().hex}/run"
  assert os.listdir(cwd) == []


def test_helpers_on_a_non_local_path(remote_dir):
  path = f"{remote_dir}/a/b.txt"
  assert not files.is_local(path) and files.is_local("runs/tiny") and files.is_local("/tmp/x")
  assert not files.exists(path) and not files.isdir(remote_dir)
  files.write_atomic(path, "one")
  files.write_atomic(path, "two")
  assert files.read_text(path) == "two" and files.isdir(f"{remote_dir}/a") and files.exists(path)
  assert files.listdir(f"{remote_dir}/a") == ["b.txt"]
  assert files.glob(f"{remote_dir}/a/*.txt") == [path]
  files.write_atomic(f"{remote_dir}/c.bin", b"\x89PNG")
  with tf.io.gfile.GFile(f"{remote_dir}/c.bin", "rb") as f:
    assert f.read() == b"\x89PNG"
  files.remove(path)
  assert not files.exists(path)
  with pytest.raises(FileNotFoundError, match=f"{remote_dir}/missing"):
    files.read_text(f"{remote_dir}/missing")


@pytest.mark.parametrize("where", ["local", "remote"])
def test_metrics_logger_keeps_earlier_rows_when_a_run_resumes(where, tmp_path, remote_dir, monkeypatch):
  directory = str(tmp_path / "model") if where == "local" else remote_dir
  # TensorBoard files go through etils.epath, which has no ram:// (gs:// it has): log only.
  create = summaries.metric_writers.create_default_writer
  monkeypatch.setattr(summaries.metric_writers, "create_default_writer", lambda logdir, **kw: create(None, **kw))
  logger = MetricsLogger(directory, "train")
  logger.write(1, {"loss": 3.0})
  logger.write(2, {"loss": 2.5})
  logger.close()
  logger = MetricsLogger(directory, "train")  # a resumed run
  logger.write(2, {"loss": 2.4})
  logger.write(3, {"loss": 2.0})
  path = os.path.join(directory, "train", "metrics.jsonl")
  assert files.read_text(path).count("\n") == 4  # written at each write, before close
  logger.close()
  rows = read_jsonl(path)
  assert sorted(rows) == [1, 2, 3] and [rows[s]["loss"] for s in (1, 2, 3)] == [3.0, 2.4, 2.0]


def test_operative_config_round_trip(remote_dir):
  gin.parse_config("Checkpointer.max_to_keep = 5")
  gin_utils.write_config(remote_dir, "operative_config.gin", "Checkpointer.max_to_keep = 2\n")
  assert files.read_text(f"{remote_dir}/operative_config.gin") == "Checkpointer.max_to_keep = 2\n"
  assert files.listdir(remote_dir) == ["operative_config.gin"]
  assert "Checkpointer.max_to_keep: 2 -> 5" in gin_utils.explain_config_change(remote_dir)
  assert "is missing" in gin_utils.explain_config_change(f"{remote_dir}/other")


def test_eval_results_are_written_to_a_non_local_model_dir(remote_dir):
  eval_lib.check_writable(remote_dir, "eval")
  assert files.listdir(f"{remote_dir}/eval") == []  # the probe is gone
  eval_lib.write_json(f"{remote_dir}/eval/x_step3.json", {"step": 3, "loss": 1.5})
  asr_lib._write_rows(f"{remote_dir}/eval/asr_test_beam2_step3", [{"id": "a"}, {"id": "b"}])
  assert json.loads(files.read_text(f"{remote_dir}/eval/x_step3.json")) == {"step": 3, "loss": 1.5}
  assert files.read_text(f"{remote_dir}/eval/asr_test_beam2_step3.jsonl") == '{"id": "a"}\n{"id": "b"}\n'
  assert sorted(files.listdir(f"{remote_dir}/eval")) == ["asr_test_beam2_step3.jsonl", "x_step3.json"]


def test_result_tables_read_a_non_local_model_dir(remote_dir):
  summary = [{"length": 2048, "bucket": "start", "examples": 1, "exact_match": 1.0, "token_accuracy": 1.0,
              "status": "ok"}]
  results = [{"length": 2048, "depth": 0.1, "bucket": "start", "key": "123", "predicted": "123",
              "exact_match": True, "token_accuracy": 1.0}]
  for step in (2, 7):
    eval_lib.write_json(f"{remote_dir}/eval/passkey_ab12_step{step}.json",
                        {"model": "m", "step": step, "summary": summary, "results": results})
  assert pk.latest_results_path(remote_dir) == f"{remote_dir}/eval/passkey_ab12_step7.json"
  assert pk.load_results(remote_dir)["step"] == 7
  heatmap = pk.passkey_heatmap(pk.load_results(remote_dir), f"{remote_dir}/heat.png")
  with tf.io.gfile.GFile(heatmap, "rb") as f:
    assert f.read().startswith(b"\x89PNG")
  eval_lib.write_json(f"{remote_dir}/eval/asr_test_step4.json", {"split": "test", "beam_size": 4, "step": 4})
  assert kmp_table.load_results(f"{remote_dir}/eval") == [{"split": "test", "beam_size": 4, "step": 4}]


def test_warm_start_finds_the_checkpoints_of_a_non_local_run(remote_dir, monkeypatch):
  """Orbax cannot open ram://, so a stand-in Checkpointer records which directory it was given."""
  opened = []

  def checkpointer(directory):
    opened.append(directory)
    raise RuntimeError("stop here")

  monkeypatch.setattr(checkpoints, "Checkpointer", checkpointer)
  with pytest.raises(FileNotFoundError, match=f"init_from '{remote_dir}' is not a model directory"):
    checkpoints.warm_start_params(remote_dir, {})
  files.makedirs(f"{remote_dir}/checkpoints")
  for init_from in (remote_dir, f"{remote_dir}/checkpoints"):
    with pytest.raises(RuntimeError, match="stop here"):
      checkpoints.warm_start_params(init_from, {})
  assert opened == [f"{remote_dir}/checkpoints"] * 2
