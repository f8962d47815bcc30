"""Metric logging: clu writers (log + TensorBoard) and a metrics.jsonl beside them.

The directory may be any path runtime/files.py takes (gs:// on a pod).
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
from clu import metric_writers

from memlm_jax.runtime import files


class MetricsLogger:
  """Writes scalars to stdout, TensorBoard (`<dir>/<name>`) and `<dir>/<name>/metrics.jsonl`.

  Only process 0 writes files; other hosts only log. A local metrics.jsonl is appended to; on a
  filesystem without append (gs://) the logger keeps the file's lines, those written before it
  opened included, and rewrites the whole file at each write.
  """

  def __init__(self, directory: str, name: str = "train"):
    self.logdir = os.path.join(directory, name)
    is_chief = jax.process_index() == 0
    if is_chief:
      files.makedirs(self.logdir)
    self.writer = metric_writers.create_default_writer(self.logdir, just_logging=not is_chief, asynchronous=False)
    self._path = os.path.join(self.logdir, "metrics.jsonl")
    self._jsonl = open(self._path, "a") if is_chief and files.is_local(self._path) else None
    self._lines: list[str] | None = None  # every line of a non-local metrics.jsonl
    if is_chief and not files.is_local(self._path):
      self._lines = files.read_text(self._path).splitlines(keepends=True) if files.exists(self._path) else []
      if self._lines and not self._lines[-1].endswith("\n"):
        self._lines[-1] += "\n"

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    line = json.dumps({"step": step, "time": time.time(), **scalars}) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._lines is not None:
      self._lines.append(line)
      files.write_atomic(self._path, "".join(self._lines))

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
    if self._jsonl is not None:
      self._jsonl.close()


def read_jsonl(path: str) -> dict[int, dict[str, float]]:
  """metrics.jsonl -> {step: row}; a step written twice (after a resume) keeps the last row."""
  rows = {}
  for line in files.read_text(path).splitlines():
    if line.strip():
      row = json.loads(line)
      rows[row["step"]] = row
  return rows
