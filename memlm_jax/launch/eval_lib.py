r"""Evaluation launcher: restore a checkpoint, compute validation metrics, write JSON.

  python -m memlm_jax.eval --gin_file=runs/eval.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" [--gin.CHECKPOINT_STEP=300]

Writes MODEL_DIR/eval/<task>_<split>_<settings hash>_step<N>.json (the dataset settings, loss, perplexity, accuracy, tokens)
and the same scalars to TensorBoard under MODEL_DIR/eval.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import gin
import jax
from absl import logging

from memlm_jax import gin_utils
from memlm_jax.data import pipeline
from memlm_jax.evaluation.perplexity import lm_metrics
from memlm_jax.runtime import files, partitioning
from memlm_jax.runtime import train_state as train_state_lib
from memlm_jax.runtime.checkpoints import Checkpointer
from memlm_jax.runtime.partitioning import Partitioner
from memlm_jax.runtime.summaries import MetricsLogger
from memlm_jax.runtime.train_state import InferenceState
from memlm_jax.runtime.trainer import Evaluator


def restore_for_inference(model_dir: str, model: Callable[..., Any], partitioner: Partitioner,
                          checkpoint_step: int | None) -> InferenceState:
  """`model_dir`'s checkpoint (newest if `checkpoint_step` is None), parameters only, placed by
  `partitioner`."""
  graphdef, abstract_params = train_state_lib.abstract_model(lambda rngs: model(rngs=rngs))
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    params, step = gin_utils.restore_or_explain(
        lambda: ckpt.restore_params(checkpoint_step, partitioner.abstract_params(abstract_params)), model_dir)
  finally:
    ckpt.close()
  return InferenceState(graphdef=graphdef, params=params, step=step, partitioner=partitioner)


def settings_name(kind: str, settings: dict[str, Any], step: int) -> str:
  """`<kind>_<hash>_step<N>`: results of different eval settings never share a file name (the
  settings themselves are written inside the result)."""
  digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
  return f"{kind}_{digest}_step{step}"


def check_writable(model_dir: str, subdir: str) -> None:
  """Raises OSError naming MODEL_DIR/subdir if results cannot be written there (checked before the
  work starts, so an eval never computes everything and then loses it)."""
  directory = os.path.join(model_dir, subdir)
  if jax.process_index() != 0:
    return
  try:
    probe = os.path.join(directory, f".write_check_{os.getpid()}")
    files.write_atomic(probe, "")
    files.remove(probe)
  except OSError as error:
    raise OSError(f"cannot write results to {directory} ({error.strerror or error}); fix its permissions or "
                  "choose another MODEL_DIR before evaluating.") from None


def write_json(path: str, payload: dict) -> None:
  """Atomic write (temp file + rename): a crash never leaves a half-written result. `path` may be gs://."""
  files.write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


@gin.configurable(denylist=["model_dir"])
def evaluate(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED,
             dataset: pipeline.DatasetConfig = gin.REQUIRED,
             partitioner: Callable[[], Partitioner] = Partitioner,
             checkpoint_step: int | None = None) -> dict[str, float]:
  """Restores `checkpoint_step` (latest if None) and evaluates on `dataset`; returns the metrics."""
  partitioning.initialize_distributed()
  check_writable(model_dir, "eval")
  restored = restore_for_inference(model_dir, model, partitioner(), checkpoint_step)
  step = restored.step
  evaluator = Evaluator(restored.graphdef, restored.partitioner, jax.tree.map(lambda x: x.sharding, restored.params))
  metrics = lm_metrics(evaluator.eval_totals(restored.params, pipeline.eval_batches(dataset, restored.partitioner.data_shard)))
  settings = dataclasses.asdict(dataset)
  name = settings_name(f"{dataset.mixture_or_task_name}_{dataset.split}", settings, step)
  if jax.process_index() == 0:
    write_json(os.path.join(model_dir, "eval", f"{name}.json"),
               {"step": step, "task": dataset.mixture_or_task_name, "split": dataset.split, "settings": settings,
                **metrics})
  logger = MetricsLogger(model_dir, "eval")
  logger.write(step, metrics)
  logger.close()
  logging.info("Eval %s: %s", name, metrics)
  return metrics


@gin.configurable(denylist=["model_dir"])
def run_eval(model_dir: str, eval_fn: Callable[[str], Any] = evaluate) -> Any:
  """What eval.py runs: `evaluate` (validation metrics) unless a gin file binds another
  evaluation, e.g. `run_eval.eval_fn = @passkey_eval`."""
  return eval_fn(model_dir)
