"""One trainer per model directory: an exclusive lock on MODEL_DIR/LOCK.

The holder keeps the file open under `flock` (released by the kernel however the process
ends) and writes its host, pid and start time into it. A second launcher stops with an
error naming the holder. A lock file left behind by a process that died on this host is
taken over with a warning; one written from another host is never taken over (we cannot
see whether that process lives): the error says to delete it. Only process 0 of a
multi-host run locks. Remote model directories (gs://...) have no file locks: a warning says
the directory is unguarded.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

import jax
from absl import logging

LOCK_NAME = "LOCK"


class ModelDirLockedError(RuntimeError):
  """Another process holds the model directory's lock."""


def _read_holder(fd: int) -> dict[str, Any]:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode("utf-8", "replace")
  try:
    holder = json.loads(text) if text.strip() else {}
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "an unknown process"
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
  return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {when}"


class ModelDirLock:
  """Context manager: holds MODEL_DIR/LOCK for the duration of a training run.

    with ModelDirLock(model_dir):
      ...  # nothing else can train into model_dir here
  """

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return
    if "://" in self.path:
      logging.warning("%s is not on a local file system: no lock guards it against a second trainer.", self.path)
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    host = socket.gethostname()
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ModelDirLockedError(f"{os.path.dirname(self.path)} is in use by another trainer ({_describe(holder)}; "
                                  f"lock file {self.path}).") from None
      try:
        same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:  # the previous holder removed the file between our open and our flock
        os.close(fd)
        continue
      holder = _read_holder(fd)
      if holder.get("host") not in (None, host):
        os.close(fd)
        raise ModelDirLockedError(
            f"{os.path.dirname(self.path)} has a lock from another host ({_describe(holder)}; lock file {self.path}). "
            "If that trainer is gone, delete the lock file.")
      if holder:
        logging.warning("Taking over the lock %s left by a process that no longer runs (%s).", self.path,
                        _describe(holder))
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps({"host": host, "pid": os.getpid(), "started": time.time()}).encode())
      os.fsync(fd)
      self._fd = fd
      return

  def release(self) -> None:
    if self._fd is None:
      return
    os.remove(self.path)  # while still holding the flock, so nobody locks the file we unlink
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "ModelDirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
