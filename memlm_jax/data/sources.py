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


class PreparedTfdsDataSource(seqio.TfdsDataSource):
  """A TFDS source that reads a prepared dataset and never downloads or builds one.

  seqio's TfdsDataSource otherwise lets tfds.load build a missing dataset, which for PG19 starts an
  11 GB download in the middle of a training launch. A dataset that is not prepared is one error
  saying where it was looked for and how to prepare it (`how_to_prepare`).
  """

  def __init__(self, tfds_name: str, tfds_data_dir: str | None, splits: Mapping[str, str], how_to_prepare: str):
    super().__init__(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=dict(splits), read_only=True)
    self._where = tfds_data_dir or "the default tfds data directory (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    self._how_to_prepare = how_to_prepare

  def _not_prepared(self, error: Exception) -> Exception:
    if "could not find data" not in str(error) and "has not been generated" not in str(error):
      return error
    return FileNotFoundError(f"the tfds dataset {self.tfds_dataset.name!r} is not prepared in {self._where}; "
                             f"{self._how_to_prepare}")

  def get_dataset(self, *args, **kwargs) -> tf.data.Dataset:
    try:
      return super().get_dataset(*args, **kwargs)
    except (AssertionError, KeyError) as error:
      raise self._not_prepared(error) from None

  def list_shards(self, split: str) -> Sequence[str]:  # seqio asks for the files first when reading a shard
    try:
      return super().list_shards(split)
    except (AssertionError, KeyError) as error:
      raise self._not_prepared(error) from None
