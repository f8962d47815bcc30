r"""Training launcher (t5x style).

  python -m memlm_jax.train --gin_file=configs/tiny/lm_demo.gin \
      --gin.TRAIN_STEPS=100 --gin.MODEL_DIR="'runs/tiny'"

Resumes from the newest complete checkpoint in MODEL_DIR/checkpoints, with the
input pipeline where it was, so a killed run continues exactly.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable

import gin
import jax
import numpy as np
import optax
from absl import logging
from clu import periodic_actions

from memlm_jax import gin_utils
from memlm_jax.data import pipeline
from memlm_jax.evaluation.perplexity import lm_metrics
from memlm_jax.runtime import partitioning
from memlm_jax.runtime import progress as progress_line
from memlm_jax.runtime import train_state as train_state_lib
from memlm_jax.runtime.checkpoints import Checkpointer, warm_start_params
from memlm_jax.runtime.model_dir_lock import ModelDirLock
from memlm_jax.runtime.optimizers import make_optimizer
from memlm_jax.runtime.partitioning import Partitioner
from memlm_jax.runtime.summaries import MetricsLogger
from memlm_jax.runtime.trainer import Trainer


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


class _Preemption:
  """Turns SIGTERM into a flag the train loop checks (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


@gin.configurable(denylist=["model_dir"])
def train(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          train_dataset: pipeline.DatasetConfig = gin.REQUIRED,
          schedule: optax.Schedule = gin.REQUIRED,
          optimizer: Callable[..., optax.GradientTransformation] = make_optimizer,
          partitioner: Callable[[], Partitioner] = Partitioner,
          checkpointer: Callable[[str], Checkpointer] = Checkpointer,
          accum_steps: int = 1, seed: int = 0, log_every_steps: int = 10,
          eval_dataset: pipeline.DatasetConfig | None = None, eval_every_steps: int = 0,
          init_from: str | None = None) -> dict[str, float]:
  """Trains `model` for `train_steps` optimizer updates; returns the last logged metrics.

  Args:
    model_dir: where checkpoints, configs and summaries go.
    model: a model class/factory called as model(rngs=nnx.Rngs(seed)).
    train_steps: total number of optimizer updates (a resumed run continues to it).
    train_dataset: global-batch DatasetConfig.
    schedule: learning-rate schedule; `optimizer(schedule=schedule)` builds the optimizer.
    accum_steps: microbatches per update (the global batch is split accum_steps ways).
    eval_dataset, eval_every_steps: optional periodic validation perplexity.
    init_from: another run's MODEL_DIR (or checkpoints dir): a run that starts without a
      checkpoint of its own takes that run's newest parameters (optimizer and data fresh); the
      model may have parameters the checkpoint lacks (they keep their init, and are listed).
  """
  if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
    raise ValueError(f"train.train_steps (TRAIN_STEPS) must be an integer >= 0, got {train_steps!r}.")
  partitioning.initialize_distributed()
  with ModelDirLock(model_dir):
    return _train(model_dir, model=model, train_steps=train_steps, train_dataset=train_dataset, schedule=schedule,
                  optimizer=optimizer, partitioner=partitioner, checkpointer=checkpointer, accum_steps=accum_steps,
                  seed=seed, log_every_steps=log_every_steps, eval_dataset=eval_dataset,
                  eval_every_steps=eval_every_steps, init_from=init_from)


def _train(model_dir: str, *, model, train_steps, train_dataset, schedule, optimizer, partitioner, checkpointer,
           accum_steps, seed, log_every_steps, eval_dataset, eval_every_steps, init_from) -> dict[str, float]:
  """`train` once the model directory is locked."""
  parts = partitioner()
  tx = optimizer(schedule=schedule)
  model_fn = lambda rngs: model(rngs=rngs)  # noqa: E731
  graphdef, abstract_params = train_state_lib.abstract_model(model_fn, seed)
  abstract_carry = None
  if train_dataset.feature_converter == "long_document":  # lanes read documents in order: carry the memory
    abstract_carry = train_state_lib.abstract_carry(model_fn, train_dataset.batch_size)
    if abstract_carry is None:
      name = getattr(model, "__name__", type(model).__name__)
      raise ValueError(f"{name} cannot be trained with feature_converter='long_document': it has no init_carry / "
                       "carried_loss (the state it carries from one chunk of a document to the next).")
  abstract_state, shardings = parts.train_state_shardings(abstract_params, tx, abstract_carry)
  trainer = Trainer(graphdef, tx, schedule, parts, shardings, accum_steps=accum_steps, dropout_seed=seed + 1)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
  logging.info("Model: %d parameters; mesh %s.", num_params, dict(parts.mesh.shape))

  iterator = pipeline.make_iterator(train_dataset, shard=parts.data_shard)
  ckpt = checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    restored = gin_utils.restore_or_explain(lambda: ckpt.restore_latest(abstract_state, iterator), model_dir)
  except BaseException:
    ckpt.close()
    raise
  if jax.process_index() == 0:
    gin_utils.write_config(model_dir, "config.gin", gin.config_str())
  if restored is None:
    with parts.context():
      state = train_state_lib.init_train_state(
          model_fn, tx, shardings, seed, carry_batch_size=None if abstract_carry is None else train_dataset.batch_size)
    start = 0
    logging.info("No checkpoint in %s: initialised from seed %d.", model_dir, seed)
    if init_from:
      params, left_at_init = warm_start_params(init_from, state.params)
      state = state.replace(params=params)
      logging.info("Warm start: parameters from %s; left at init: %s.", init_from, left_at_init or "none")
  else:
    state, start = restored
    logging.info("Restored checkpoint at step %d.", start)

  logger = MetricsLogger(model_dir, "train")
  eval_logger = MetricsLogger(model_dir, "validation") if eval_dataset is not None and eval_every_steps else None
  progress = periodic_actions.ReportProgress(num_train_steps=train_steps, writer=logger.writer,
                                             every_steps=log_every_steps)
  # On several hosts each would see SIGTERM at its own step and stop out of step with the others;
  # there the cluster's preemption notice (reached_preemption, agreed by all hosts) decides.
  preemption = _Preemption() if jax.process_count() == 1 else None
  pending: list[tuple[int, dict]] = []  # (step number after the update, device metrics)
  last: dict[str, float] = {}
  window_tokens, window_start = 0.0, time.time()
  run_name = os.path.basename(os.path.normpath(model_dir))
  rate_start = (start, time.time())  # steps/s for the ETA, measured from the first step after the compile

  def check(upto: int) -> None:
    """Fetches pending metrics for steps <= upto; raises on a non-finite loss, gradient or
    parameter norm (checked before the state of that step can be saved)."""
    nonlocal last, window_tokens, window_start
    while pending and pending[0][0] <= upto:
      step, metrics = pending.pop(0)
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(values[k])]
      if bad:
        ckpt.wait()
        raise TrainingDivergedError(
            f"{bad[0]} is {values[bad[0]]} at step {step}; stopping without saving. The last good checkpoint "
            f"(step {ckpt.latest_step()}) in {model_dir}/checkpoints is untouched.")
      window_tokens += values["tokens"]
      if step % log_every_steps == 0 or step == train_steps:
        elapsed = max(time.time() - window_start, 1e-9)
        values["tokens_per_sec"] = window_tokens / elapsed
        logger.write(step, values)
        window_tokens, window_start = 0.0, time.time()
        report_progress(step, values["loss"])
      last = values

  def report_progress(step: int, loss: float) -> None:
    nonlocal rate_start
    if rate_start[0] == start:  # the first report: start the clock here, leaving the compile out of the rate
      rate_start = (step, time.time())
    rate = (step - rate_start[0]) / max(time.time() - rate_start[1], 1e-9)
    speed = f"  {rate:.1f} steps/s  ETA {progress_line.format_duration((train_steps - step) / rate)}" if rate else ""
    progress_line.update(f"train {run_name}: step {step}/{train_steps}  loss {loss:.4f}{speed}")

  try:
    for step in range(start + 1, train_steps + 1):
      state, metrics = trainer.train_step(state, parts.global_batch(next(iterator)))
      pending.append((step, metrics))
      if step == start + 1 and jax.process_index() == 0:
        gin_utils.write_config(model_dir, "operative_config.gin", gin.operative_config_str())
      progress(step)
      preempted = preemption.requested if preemption is not None else ckpt.reached_preemption(step)
      must_save = ckpt.should_save(step) or step == train_steps or preempted
      check(step if (must_save or step % log_every_steps == 0) else step - 1)
      if must_save:
        ckpt.save(step, state, iterator, force=True)
      if eval_logger is not None and step % eval_every_steps == 0:
        totals = trainer.evaluator.eval_totals(state.params, pipeline.eval_batches(eval_dataset, parts.data_shard))
        eval_logger.write(step, lm_metrics(totals))
      if preempted:
        logging.warning("Stopped at step %d after preemption; checkpoint saved.", step)
        break
    check(train_steps)
    ckpt.wait()
    loss_text = f"  loss {last['loss']:.4f}" if last else ""
    progress_line.done(f"train {run_name}: step {ckpt.latest_step()}/{train_steps}{loss_text}  (checkpoints: "
                       f"{model_dir}/checkpoints)")
  finally:
    if preemption is not None:
      preemption.restore()
    ckpt.close()
    logger.close()
    if eval_logger is not None:
      eval_logger.close()
  return last
