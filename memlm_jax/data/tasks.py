"""seqio task registrations.

`text_lm_task` registers a language-modelling task over plain-text files (one
document per line) and returns its name, so a gin file can write
`DatasetConfig.mixture_or_task_name = @text_lm_task()`. Users bring their own
seqio tasks by naming a module that registers them (`DatasetConfig.module`).
"""

from __future__ import annotations

import glob
import os
from typing import Mapping

import gin
import seqio
import tensorflow as tf

from memlm_jax.data.vocabularies import byte_vocabulary


def lines_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Text lines -> {'targets': line}; empty lines are dropped."""
  dataset = dataset.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
  return dataset.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)


def split_into_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                      output_features: Mapping[str, seqio.Feature], feature_key: str = "targets") -> tf.data.Dataset:
  """Splits each tokenized example into consecutive chunks of at most the feature length.

  Long documents become several training examples instead of being truncated.
  """
  del output_features
  if not sequence_length or sequence_length.get(feature_key) is None:
    return dataset
  length = int(sequence_length[feature_key])

  def to_chunks(example):
    tokens = example[feature_key]
    n = tf.size(tokens, out_type=tf.int64)
    num_full = n // length
    rows = tf.concat([tf.fill([num_full], tf.cast(length, tf.int64)),
                      tf.reshape(n - num_full * length, [1])], axis=0)
    rows = tf.boolean_mask(rows, rows > 0)
    return tf.data.Dataset.from_tensor_slices({feature_key: tf.RaggedTensor.from_row_lengths(tokens, rows)})

  return dataset.flat_map(to_chunks)


@gin.configurable
def text_lm_task(name: str = gin.REQUIRED, split_files: Mapping[str, str] = gin.REQUIRED,
                 vocabulary: seqio.Vocabulary | None = None, data_dir: str = "") -> str:
  """Registers (or re-registers) a seqio LM task over text files; returns its name.

  Args:
    name: task name.
    split_files: {split: file pattern}, e.g. {'train': 'data/train*.txt', 'validation': ...}.
    vocabulary: defaults to the byte vocabulary.
    data_dir: prefix for relative patterns.
  """
  split_files = {split: os.path.join(data_dir, pattern) for split, pattern in split_files.items()}
  for split, pattern in split_files.items():
    if not glob.glob(pattern):
      raise FileNotFoundError(f"text_lm_task '{name}': split '{split}' file pattern {pattern!r} matches no files.")
  vocabulary = vocabulary or byte_vocabulary()
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.TextLineDataSource(dict(split_files)),
      preprocessors=[
          lines_to_targets,
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
          split_into_chunks,
      ],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
      metric_fns=[],
  )
  return name
