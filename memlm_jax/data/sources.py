"""A seqio data source for generated streams that shards over hosts without generating the
whole stream on every host.

seqio's Task.get_dataset shards any source: one that cannot shard itself is read whole on
every host and split at the examples (host i keeps examples i, i+N, ...). For a generator that
would make each host build every example and keep 1/N of them. IndexedFunctionDataSource gives
the same examples to the same host, generating only those: nothing is read twice or skipped,
and the single-host stream is unchanged.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf


class IndexedFunctionDataSource(seqio.FunctionDataSource):
  """A generated stream whose example k is a pure function of k.

  `dataset_fn(split, shard_index, num_shards)` returns the examples with indices
  shard_index, shard_index + num_shards, ... (all of them for (0, 1)).
  """

  def __init__(self, dataset_fn: Callable[[str, int, int], tf.data.Dataset], splits: Sequence[str]):
    self._indexed_fn = dataset_fn
    super().__init__(lambda split, shuffle_files: dataset_fn(split, 0, 1), splits=splits)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length: Mapping[str, int] | None = None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs  # the stream is defined by the task's own seed
    if shard_info is None:
      return self._indexed_fn(split, 0, 1)
    return self._indexed_fn(split, shard_info.index, shard_info.num_shards)
