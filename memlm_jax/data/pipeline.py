"""The input pipeline: DatasetConfig -> per-host batches (LM tokens or speech) from a seqio task or
mixture, with a checkpointable position.

The pipeline is deterministic given the seed: seqio shuffles with it, tf.data runs
deterministically, and the iterator's position is saved with each checkpoint
(`TfDataIterator.save/restore`), as t5x does.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from memlm_jax.data import long_documents, speech_features
from memlm_jax.runtime.checkpoints import CheckpointMismatchError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read and how to batch it (t5x's DatasetConfig, for decoder-only LMs).

  batch_size is the global batch; each input shard (a host, or hosts holding the same rows) reads
  batch_size / shards rows.
  """

  mixture_or_task_name: str = gin.REQUIRED
  sequence_length: int = gin.REQUIRED
  batch_size: int = gin.REQUIRED
  split: str = "train"
  shuffle: bool = True
  seed: int = 0
  pack: bool = True
  num_epochs: int | None = None  # None repeats forever
  module: str | None = None  # imported first: registers user seqio tasks
  # 'decoder': LM loss on every token of "targets"; 'prefix_lm': "inputs" then "targets" in
  # one sequence, loss on the targets only (their length: targets_length) unless
  # loss_on_targets_only is False; 'speech': speech_features.speech_dataset's batches, "audio"
  # padded to sequence_length samples (MAX_AUDIO_SAMPLES in the speech configs) and "targets"
  # to targets_length labels, with paddings and the bias phrases as arrays; 'long_document': whole
  # documents read in order, each batch row one document's next sequence_length tokens with a
  # start_of_sequence flag (data/long_documents.py; the trainer then carries the model's memory).
  feature_converter: str = "decoder"
  targets_length: int = 8
  loss_on_targets_only: bool = True
  use_cached: bool = False
  # Float task features already in the decoder's layout (length <= sequence_length), padded
  # with zeros and handed to the model as they are, e.g. ['memory_write_weights'] (data/passkey.py).
  # Only with pack=False and the 'decoder' or 'prefix_lm' converter.
  passthrough_features: tuple[str, ...] = ()
  # Only with feature_converter 'speech': replaces each example's bias list before batching,
  # e.g. train/DatasetConfig.bias_sampler = @TrainingBiasLists() (data/bias_sampling.py); None
  # keeps the task's own lists.
  bias_sampler: speech_features.BiasSampler | None = None
  # Only with feature_converter 'long_document': documents held in the shuffle buffer (each
  # is saved whole in every checkpoint of the reader's position, so it stays small; the
  # source's files are shuffled as well).
  document_shuffle_buffer: int = 16

  def __post_init__(self):
    for name in ("sequence_length", "batch_size", "targets_length", "document_shuffle_buffer"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        macro = {"sequence_length": " (SEQUENCE_LENGTH)", "batch_size": " (BATCH_SIZE / EVAL_BATCH_SIZE)"}.get(name, "")
        raise ValueError(f"DatasetConfig.{name}{macro} must be a positive integer, got {value!r} "
                         f"(dataset {self.mixture_or_task_name!r}).")


def get_task(config: DatasetConfig) -> seqio.Task | seqio.Mixture:
  if config.module:
    importlib.import_module(config.module)
  try:
    return seqio.get_mixture_or_task(config.mixture_or_task_name)
  except ValueError as error:
    raise ValueError(f"DatasetConfig.mixture_or_task_name {config.mixture_or_task_name!r} is not a registered seqio "
                     f"task or mixture (import its module with DatasetConfig.module).") from error


def input_shard(shard: tuple[int, int] | None) -> seqio.ShardInfo:
  """(index, count) of the shard to read (a Partitioner's data_shard) as seqio's ShardInfo;
  None: one shard per process."""
  index, count = (jax.process_index(), jax.process_count()) if shard is None else shard
  return seqio.ShardInfo(index=index, num_shards=count)


def get_dataset(config: DatasetConfig, *, drop_remainder: bool = True,
                shard: tuple[int, int] | None = None) -> tf.data.Dataset:
  """Shard `shard` (index, count; default: this process of all) of the converted, batched
  dataset (numpy-ready features): batch_size / count rows a batch."""
  shard_info = input_shard(shard)
  if config.batch_size % shard_info.num_shards:
    raise ValueError(f"DatasetConfig.batch_size={config.batch_size} must be divisible by the number of input "
                     f"shards ({shard_info.num_shards}, one per host or per group of hosts holding the same rows).")
  local_batch = config.batch_size // shard_info.num_shards
  task = get_task(config)
  if config.split not in task.splits:
    raise ValueError(f"split {config.split!r} is not in task {task.name!r} (it has {list(task.splits)}).")
  passthrough = _passthrough_specs(config, task)
  if config.bias_sampler is not None and config.feature_converter != "speech":
    raise ValueError(f"DatasetConfig.bias_sampler is for feature_converter='speech', got "
                     f"{config.feature_converter!r}.")
  if config.feature_converter == "decoder":
    converter = seqio.DecoderFeatureConverter(pack=config.pack, passthrough_features=passthrough)
    feature_lengths = {"targets": config.sequence_length}
  elif config.feature_converter == "prefix_lm":
    if not 0 < config.targets_length < config.sequence_length:
      raise ValueError(f"DatasetConfig.targets_length must be in 1..sequence_length-1={config.sequence_length - 1},"
                       f" got {config.targets_length}.")
    converter = seqio.PrefixLMFeatureConverter(pack=config.pack, loss_on_targets_only=config.loss_on_targets_only,
                                              passthrough_features=passthrough)
    feature_lengths = {"inputs": config.sequence_length - config.targets_length,
                       "targets": config.targets_length}
  elif config.feature_converter == "speech":
    if config.pack:
      raise ValueError("DatasetConfig.pack must be False for feature_converter='speech' (utterances are not packed).")
    return speech_features.speech_dataset(
        config.mixture_or_task_name, config.split, local_batch, config.sequence_length,
        config.targets_length, shuffle=config.shuffle, seed=config.seed, num_epochs=config.num_epochs,
        drop_remainder=drop_remainder, shard_info=shard_info, bias_sampler=config.bias_sampler)
  elif config.feature_converter == "long_document":
    raise ValueError("DatasetConfig.feature_converter='long_document' is read by a LongDocumentReader "
                     "(pipeline.make_iterator / long_document_reader), not as a batched dataset.")
  else:
    raise ValueError(f"DatasetConfig.feature_converter must be 'decoder', 'prefix_lm', 'speech' or "
                     f"'long_document', got {config.feature_converter!r}.")
  feature_lengths.update({name: config.sequence_length for name in passthrough or {}})
  dataset = seqio.get_dataset(
      config.mixture_or_task_name,
      task_feature_lengths=feature_lengths,
      dataset_split=config.split,
      shuffle=config.shuffle,
      num_epochs=config.num_epochs,
      feature_converter=converter,
      shard_info=shard_info,
      use_cached=config.use_cached,
      seed=config.seed,
      trim_output_features=False,  # an example longer than its feature length is an error, never cut
  )
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options)
  return dataset.batch(local_batch, drop_remainder=drop_remainder)


def long_document_reader(config: DatasetConfig, shard: tuple[int, int] | None = None, *,
                         record_documents: bool = False) -> long_documents.LongDocumentReader:
  """Shard `shard` (see get_dataset) of the task's whole documents, read in order by batch_size /
  shards lanes of sequence_length tokens (feature_converter 'long_document')."""
  if config.feature_converter != "long_document":
    raise ValueError(f"long_document_reader needs DatasetConfig.feature_converter='long_document', got "
                     f"{config.feature_converter!r}.")
  if config.pack:
    raise ValueError("DatasetConfig.pack must be False for feature_converter='long_document' (a lane reads one "
                     "document at a time; set --gin.train/DatasetConfig.pack=False).")
  shard_info = input_shard(shard)
  if config.batch_size % shard_info.num_shards:
    raise ValueError(f"DatasetConfig.batch_size={config.batch_size} must be divisible by the number of input "
                     f"shards ({shard_info.num_shards}, one per host or per group of hosts holding the same rows).")
  task = get_task(config)
  if config.split not in task.splits:
    raise ValueError(f"split {config.split!r} is not in task {task.name!r} (it has {list(task.splits)}).")
  if "targets" not in task.output_features:
    raise ValueError(f"task {task.name!r} has no 'targets' feature for the long-document reader (it has "
                     f"{sorted(task.output_features)}).")
  documents = task.get_dataset(sequence_length=None, split=config.split, use_cached=config.use_cached,
                               shuffle=config.shuffle, shuffle_buffer_size=config.document_shuffle_buffer,
                               seed=config.seed, shard_info=shard_info, num_epochs=config.num_epochs)
  kept = [name for name in ("targets", "title", "num_words") if name in documents.element_spec]
  documents = documents.map(lambda document: {name: document[name] for name in kept})
  options = tf.data.Options()
  options.deterministic = True
  return long_documents.LongDocumentReader(documents.with_options(options), config.batch_size // shard_info.num_shards,
                                           config.sequence_length, record_documents=record_documents)


def make_iterator(config: DatasetConfig, shard: tuple[int, int] | None = None
                  ) -> TfDataIterator | long_documents.LongDocumentReader:
  """The checkpointable training iterator of `config`: batches of shard `shard` (see get_dataset)."""
  if config.feature_converter == "long_document":
    return long_document_reader(config, shard)
  return TfDataIterator(get_dataset(config, shard=shard))


def _passthrough_specs(config: DatasetConfig,
                       task: seqio.Task | seqio.Mixture) -> dict[str, seqio.FeatureConverter.FeatureSpec] | None:
  """FeatureSpecs of config.passthrough_features, checked against the task before any data is read."""
  if not config.passthrough_features:
    return None
  if isinstance(config.passthrough_features, str):
    raise ValueError(f"DatasetConfig.passthrough_features must be a list of feature names, got the string "
                     f"{config.passthrough_features!r}.")
  if config.pack or config.feature_converter not in ("decoder", "prefix_lm"):
    raise ValueError(f"DatasetConfig.passthrough_features={list(config.passthrough_features)} needs pack=False and "
                     f"feature_converter 'decoder' or 'prefix_lm' (got pack={config.pack}, "
                     f"{config.feature_converter!r}).")
  missing = [name for name in config.passthrough_features if name not in task.output_features]
  if missing:
    raise ValueError(f"DatasetConfig.passthrough_features: task {task.name!r} has no feature {missing[0]!r} "
                     f"(it has {sorted(task.output_features)}).")
  return {name: seqio.FeatureConverter.FeatureSpec(dtype=task.output_features[name].dtype)
          for name in config.passthrough_features}


class TfDataIterator:
  """numpy batches from a tf.data.Dataset, with the position saved as a tf checkpoint and the
  batch shapes beside it (`<path>.shapes.json`), checked on restore."""

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._shapes = {name: [str(spec.dtype.name), spec.shape.as_list()]
                    for name, spec in sorted(dataset.element_spec.items())}

  def __iter__(self) -> "TfDataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return {k: v.numpy() for k, v in next(self._iterator).items()}
    except tf.errors.InvalidArgumentError as error:
      raise too_long_error(error) from None


  def save(self, path: str) -> None:
    self._checkpoint.write(path)
    with tf.io.gfile.GFile(path + ".shapes.json", "w") as f:
      f.write(json.dumps(self._shapes))

  def restore(self, path: str) -> None:
    """Restores the position saved at `path`; CheckpointMismatchError if the saved pipeline gave
    batches of other shapes (e.g. another BATCH_SIZE), before the state is read."""
    if tf.io.gfile.exists(path + ".shapes.json"):  # checkpoints written before this check have none
      with tf.io.gfile.GFile(path + ".shapes.json") as f:
        saved = json.loads(f.read())
      if saved != self._shapes:
        changed = sorted(k for k in set(saved) | set(self._shapes) if saved.get(k) != self._shapes.get(k))
        name = changed[0]
        raise CheckpointMismatchError(
            f"the input pipeline saved in {os.path.dirname(path)} gave {name!r} batches of "
            f"{_shape_text(saved.get(name))} per host, the configured one gives {_shape_text(self._shapes.get(name))}; "
            "a resumed run must keep its batch size and sequence length. To train with new ones, start a new "
            "MODEL_DIR that warm-starts from this run (--gin.train.init_from=\"'<this MODEL_DIR>'\").")
    self._checkpoint.read(path).assert_consumed()

  def fast_forward(self, batches: int) -> None:
    """Skips `batches` batches (reading them): the position a fresh run of this pipeline has after
    that many steps."""
    for _ in range(batches):
      next(self._iterator)


def too_long_error(error: tf.errors.InvalidArgumentError) -> Exception:
  """seqio's length check (an example longer than its feature length, never cut) as one clear sentence;
  any other tf.data error unchanged."""
  found = re.search(r"Feature \\?'(\w+)\\?' has length not less than or equal to the expected length of (\d+).*?"
                    r"x \(.*?\) = \] \[(\d+)\]", error.message, re.S)
  if not found:
    return error
  feature, limit, length = found.groups()
  macro = {"targets": "targets_length (TARGETS_LENGTH) or sequence_length", "inputs": "sequence_length"}.get(
      feature, "sequence_length")
  return ValueError(f"an example's {feature!r} has {length} tokens, more than the {limit} the batch allows; examples "
                    f"are never truncated: raise DatasetConfig.{macro} or remove the example.")


def _shape_text(entry: list | None) -> str:
  return "none" if entry is None else f"{entry[0]} {tuple(entry[1])}"


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short final eval batch with all-zero rows (zero loss weight)."""
  n = next(iter(batch.values())).shape[0]
  if n == batch_size:
    return batch
  return {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def eval_batches(config: DatasetConfig, shard: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
  """One pass over shard `shard` (see get_dataset) of `config.split`, unshuffled; the final batch
  is zero-padded, and on several hosts every host gets the same number of batches (extra ones
  all padding), so every host runs the same number of eval steps."""
  config = dataclasses.replace(config, shuffle=False, num_epochs=1)
  local_batch = config.batch_size // input_shard(shard).num_shards
  batches = [pad_batch(b, local_batch)
             for b in get_dataset(config, drop_remainder=False, shard=shard).as_numpy_iterator()]
  counts = [len(batches)]
  if jax.process_count() > 1:  # every host learns every count before any host can fail
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    counts = np.asarray(multihost_utils.process_allgather(np.asarray(len(batches)))).reshape(-1).tolist()
  if min(counts) == 0:
    raise ValueError(f"split {config.split!r} of {config.mixture_or_task_name!r} is empty on host "
                     f"{counts.index(0)} of {len(counts)} (batches per host: {counts}); use fewer hosts or a "
                     "larger split.")
  empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
  batches += [empty] * (max(counts) - len(batches))
  return batches
