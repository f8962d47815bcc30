"""Helpers shared by the runtime tests: a tiny corpus and the tiny LM's gin setup."""

from __future__ import annotations

import os
import subprocess
import sys

import gin

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  (every gin configurable, launchers included)
from memlm_jax.data.synthetic import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH_PATHS = [os.path.join(REPO, "configs"), REPO]


def corpus(directory: str, train_docs: int = 300, validation_docs: int = 24) -> str:
  write_corpus(directory, train_docs=train_docs, validation_docs=validation_docs, seed=1)
  return directory


def tiny_bindings(data_dir: str, model_dir: str, **extra) -> list[str]:
  """Bindings for a fast tiny-LM run (small batch/sequence, log every step)."""
  bindings = {
      "DATA_DIR": repr(data_dir), "MODEL_DIR": repr(model_dir), "TRAIN_STEPS": 20, "SEQUENCE_LENGTH": 32,
      "BATCH_SIZE": 8, "EVAL_BATCH_SIZE": 8, "train.log_every_steps": 1, "Checkpointer.save_interval_steps": 5,
      "warmup_cosine_schedule.warmup_steps": 2,
  }
  bindings.update(extra)
  return [f"{k} = {v}" for k, v in bindings.items()]


def parse(files: list[str], bindings: list[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin(files, bindings, SEARCH_PATHS)


def launcher(module: str, files: list[str], bindings: list[str]) -> list[str]:
  """argv for `python -m memlm_jax.<module>` with the given gin files and --gin.X=Y bindings."""
  argv = [sys.executable, "-m", f"memlm_jax.{module}"] + [f"--gin_file={f}" for f in files]
  for binding in bindings:
    name, value = (part.strip() for part in binding.split("=", 1))
    argv.append(f"--gin.{name}={value}")
  return argv


def run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def partitioner(mesh):
  """A Partitioner on `mesh` with the standard rules of configs/mesh/logical_axis_rules.gin."""
  from memlm_jax.runtime.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  rules = gin_utils.read_binding("mesh/logical_axis_rules.gin", "Partitioner.logical_axis_rules")
  return Partitioner(rules, mesh=mesh)


ONE_DEVICE = ["make_mesh.num_devices = 1", "make_mesh.data = 1"]
FSDP2_TENSOR4 = ["make_mesh.data = 1", "make_mesh.fsdp = 2", "make_mesh.tensor = 4"]


def losses_on_meshes(tmp_path, files: list[str], steps: int, **extra) -> dict[str, tuple]:
  """Trains the same run on 1 device and on a 2x4 (fsdp x tensor) mesh; per mesh, the
  (losses, grad norms) of steps 1..steps."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from memlm_jax.launch import train_lib  # pylint: disable=g-import-not-at-top
  from memlm_jax.runtime.summaries import read_jsonl  # pylint: disable=g-import-not-at-top
  corpus(str(tmp_path / "data"))
  out = {}
  for name, mesh_bindings in (("one", ONE_DEVICE), ("mesh", FSDP2_TENSOR4)):
    model_dir = str(tmp_path / name)
    parse(files, tiny_bindings(str(tmp_path / "data"), model_dir, TRAIN_STEPS=steps, **extra) + mesh_bindings)
    train_lib.train(model_dir)
    rows = read_jsonl(f"{model_dir}/train/metrics.jsonl")
    out[name] = tuple(np.array([rows[s][key] for s in range(1, steps + 1)]) for key in ("loss", "grad_norm"))
  return out
