"""seqio data sources that shard over any number of hosts, each host reading a disjoint part.

seqio's TextLineDataSource shards by file (a single-file corpus cannot be split over two hosts)
and its FunctionDataSource refuses to shard at all. These two keep the single-host stream
unchanged and, on N hosts, give host i exactly the examples i, i+N, i+2N, ... of it: nothing is
read twice or skipped, and the union over hosts is the one-host dataset.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf


class ShardedTextLineDataSource(seqio.TextLineDataSource):
  """Text lines; with fewer files than hosts, every host reads all files and keeps every N-th line."""

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length: Mapping[str, int] | None = None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    if shard_info is None or shard_info.num_shards <= 1 or len(self.list_shards(split)) >= shard_info.num_shards:
      return super().get_dataset(split, shuffle, seed, shard_info)
    # Every host shuffles the file order with the same seed, so the line-level shard is disjoint.
    lines = super().get_dataset(split, shuffle, seed, None)
    return lines.shard(shard_info.num_shards, shard_info.index)


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
