"""What several JAX processes (hosts) must agree on outside compiled steps: Python values
gathered from every host, and eval loops that run the same number of steps everywhere.

With one process every function here is a no-op wrapper (no collective is issued).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def gather_objects(value: Any) -> list[Any]:
  """The JSON-serialisable `value` of every process, in process order (on every process)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(gathered, sizes)]


def fetch(tree: Any) -> Any:
  """numpy values of a pytree of jax arrays, gathering those that span other processes' devices
  (every process must call it at the same point, as for any collective)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def gather_shards(value: Any, shard: tuple[int, int]) -> list[Any]:
  """The JSON-serialisable `value` of each input shard (index, count), in shard order: processes
  that read the same shard (hosts holding the same batch rows) count once."""
  by_shard: dict[int, Any] = {}
  for index, shard_value in gather_objects([shard[0], value]):
    by_shard.setdefault(index, shard_value)
  return [by_shard[index] for index in range(shard[1])]


def interleave(per_process: Sequence[Sequence[T]]) -> list[T]:
  """Rows read as shards i, i+N, i+2N, ... by N processes, back in one-process order."""
  longest = max((len(rows) for rows in per_process), default=0)
  return [rows[k] for k in range(longest) for rows in per_process if k < len(rows)]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on some process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


def in_step(batches: Iterable[T], filler: Callable[[T], T]) -> Iterator[T]:
  """This process's batches, then `filler(first batch)` until every process has run out, so
  every process runs the same number of (collective) steps over shards of unequal length."""
  iterator = iter(batches)
  first = None
  while True:
    batch = next(iterator, None)
    if not any_process(batch is not None):
      return
    if batch is None:
      if first is None:
        raise ValueError(f"process {jax.process_index()} has no data to shape its filler batches (its shard of "
                         "the split is empty); use fewer processes or more examples.")
      batch = filler(first)
    elif first is None:
      first = batch
    yield batch
