"""Metric logging: clu writers (log + TensorBoard) and a metrics.jsonl beside them."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
from clu import metric_writers


class MetricsLogger:
  """Writes scalars to stdout, TensorBoard (`<dir>/<name>`) and `<dir>/<name>/metrics.jsonl`.

  Only process 0 writes files; other hosts only log.
  """

  def __init__(self, directory: str, name: str = "train"):
    self.logdir = os.path.join(directory, name)
    is_chief = jax.process_index() == 0
    if is_chief:
      os.makedirs(self.logdir, exist_ok=True)
    self.writer = metric_writers.create_default_writer(self.logdir, just_logging=not is_chief, asynchronous=False)
    self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a") if is_chief else None

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
    if self._jsonl is not None:
      self._jsonl.close()


def read_jsonl(path: str) -> dict[int, dict[str, float]]:
  """metrics.jsonl -> {step: row}; a step written twice (after a resume) keeps the last row."""
  rows = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["step"]] = row
  return rows
