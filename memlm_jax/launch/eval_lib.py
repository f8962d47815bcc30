r"""Evaluation launcher: restore a checkpoint, compute validation metrics, write JSON.

  python -m memlm_jax.eval --gin_file=runs/eval.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" [--gin.evaluate.checkpoint_step=300]

Writes MODEL_DIR/eval/<task>_<split>_step<N>.json (loss, perplexity, accuracy, tokens)
and the same scalars to TensorBoard under MODEL_DIR/eval.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin
import jax
from absl import logging

from memlm_jax.data import lm_dataset
from memlm_jax.evaluation.perplexity import lm_metrics
from memlm_jax.runtime import partitioning
from memlm_jax.runtime import train_state as train_state_lib
from memlm_jax.runtime.checkpoints import Checkpointer
from memlm_jax.runtime.summaries import MetricsLogger
from memlm_jax.runtime.trainer import Trainer


def restore_for_inference(model_dir: str, model: Callable[..., Any], mesh: jax.sharding.Mesh,
                          checkpoint_step: int | None) -> tuple[Trainer, Any, int]:
  """(eval-only Trainer, params restored onto `mesh`, step) for `model_dir`'s checkpoint."""
  rules = partitioning.logical_axis_rules()
  graphdef, abstract_params = train_state_lib.abstract_model(lambda rngs: model(rngs=rngs))
  p_shardings = partitioning.param_shardings(abstract_params, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params.to_pure_dict(), p_shardings)
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    params, step = ckpt.restore_params(checkpoint_step, abstract)
  finally:
    ckpt.close()
  shardings = train_state_lib.TrainState(step=partitioning.replicated(mesh), params=p_shardings, opt_state=None)
  return Trainer(graphdef, None, None, mesh, rules, shardings), params, step


def write_json(path: str, payload: dict) -> None:
  """Atomic write (temp file + rename): a crash never leaves a half-written result."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


@gin.configurable(denylist=["model_dir"])
def evaluate(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED,
             dataset: lm_dataset.DatasetConfig = gin.REQUIRED,
             mesh: Callable[[], jax.sharding.Mesh] = partitioning.make_mesh,
             checkpoint_step: int | None = None) -> dict[str, float]:
  """Restores `checkpoint_step` (latest if None) and evaluates on `dataset`; returns the metrics."""
  partitioning.initialize_distributed()
  trainer, params, step = restore_for_inference(model_dir, model, mesh(), checkpoint_step)
  metrics = lm_metrics(trainer.eval_totals(params, lm_dataset.eval_batches(dataset)))
  name = f"{dataset.mixture_or_task_name}_{dataset.split}_step{step}"
  if jax.process_index() == 0:
    write_json(os.path.join(model_dir, "eval", f"{name}.json"),
               {"step": step, "task": dataset.mixture_or_task_name, "split": dataset.split, **metrics})
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
