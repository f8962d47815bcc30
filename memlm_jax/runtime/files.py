"""Files under MODEL_DIR on any filesystem tf.io.gfile knows (a local disk, gs://, ram://).

A path without a `scheme://` is local and goes through `os` and `open`, exactly as before
these helpers existed; any other path goes through tf.io.gfile. Failures are raised as
OSError (FileNotFoundError, PermissionError, ...) naming the path, on every filesystem.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def is_local(path: str) -> bool:
  """Whether `path` is on the local disk (no `scheme://` prefix such as gs://)."""
  return "://" not in os.fspath(path)


def _gfile():
  # TensorFlow loads only for a non-local path: tools that read local results stay quick to start.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


@contextlib.contextmanager
def _os_errors(path: str) -> Iterator[None]:
  """tf.errors.OpError raised inside -> the matching OSError subclass naming `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except tf.errors.OpError as error:
    kind = {tf.errors.NotFoundError: FileNotFoundError, tf.errors.PermissionDeniedError: PermissionError,
            tf.errors.AlreadyExistsError: FileExistsError}.get(type(error), OSError)
    raise kind(f"{path}: {error.message or type(error).__name__}") from error


def exists(path: str) -> bool:
  """Whether a file or directory `path` exists."""
  if is_local(path):
    return os.path.exists(path)
  with _os_errors(path):
    return _gfile().exists(path)


def isdir(path: str) -> bool:
  """Whether `path` is a directory."""
  if is_local(path):
    return os.path.isdir(path)
  with _os_errors(path):
    return _gfile().isdir(path)


def listdir(path: str) -> list[str]:
  """The names (not paths) of the entries of directory `path`."""
  if is_local(path):
    return os.listdir(path)
  with _os_errors(path):
    return [name.rstrip("/") for name in _gfile().listdir(path)]


def glob(pattern: str) -> list[str]:
  """The paths matching `pattern` (`*`, `?`, `[...]`), in no particular order."""
  if is_local(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return glob_lib.glob(pattern)
  with _os_errors(pattern):
    return _gfile().glob(pattern)


def getmtime(path: str) -> float:
  """When `path` was last written, in seconds since the epoch."""
  if is_local(path):
    return os.path.getmtime(path)
  with _os_errors(path):
    return _gfile().stat(path).mtime_nsec / 1e9


def makedirs(path: str) -> None:
  """Creates directory `path` and its parents; nothing when it exists."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)
    return
  with _os_errors(path):
    _gfile().makedirs(path)


def remove(path: str) -> None:
  """Deletes the file `path`."""
  if is_local(path):
    os.remove(path)
    return
  with _os_errors(path):
    _gfile().remove(path)


def read_text(path: str) -> str:
  """The whole of text file `path`."""
  if is_local(path):
    with open(path) as f:
      return f.read()
  with _os_errors(path), _gfile().GFile(path, "r") as f:
    return f.read()


def write_atomic(path: str, contents: str | bytes) -> None:
  """Writes `contents` to `path` through `path`.tmp and a rename (creating the directory), so a
  reader never sees a half-written file."""
  mode, tmp = ("wb" if isinstance(contents, bytes) else "w"), path + ".tmp"
  parent = os.path.dirname(path)
  if parent:
    makedirs(parent)
  if is_local(path):
    with open(tmp, mode) as f:
      f.write(contents)
    os.replace(tmp, path)
    return
  with _os_errors(path):
    with _gfile().GFile(tmp, mode) as f:
      f.write(contents)
    _gfile().rename(tmp, path, overwrite=True)
