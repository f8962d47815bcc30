"""seqio tasks for summarizing long inputs (whole books) in the prefix-LM format.

An example is `inputs` (the book; EOS appended, which separates it from the summary), `targets`
(the summary the model is trained to write after it; EOS appended) and `references` (every
reference summary, for ROUGE's best-over-references; the targets' text alone when there is one).
Training reads them with `DatasetConfig.feature_converter = 'prefix_lm'` (one example per row, the
loss on the summary only); evaluation (launch/summarization_lib.py) streams the whole input through
the model's memory and decodes the summary after it, however long the input.

Two sources:
- `booksum_task`: BookSum through tfds (`booksum/book` or `booksum/chapter`: `document`,
  `summary`). BookSum needs a manual download: follow tfds's instructions
  (`tfds build booksum --manual_dir=DIR` with the salesforce/booksum project and the
  chapterized books in DIR), then point `tfds_data_dir` at the prepared data.
- `summarization_jsonl_task`: JSONL files of {"text": ..., "summary": "..." or ["...", ...]} for
  users' own data (and the generated corpus of scripts/make_long_documents.py). Every line is
  checked when the task is registered; a bad one is an error naming its file and line. The
  examples are held in memory (a checkpointable tf.data source); for corpora of gigabytes, prepare
  a tfds dataset instead.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import gin
import seqio
import tensorflow as tf

from memlm_jax.data.sources import IndexedFunctionDataSource, PreparedTfdsDataSource
from memlm_jax.data.vocabularies import byte_vocabulary

BOOKSUM_SPLITS = ("train", "validation", "test")


def summarization_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
          "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
          "references": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, required=False,
                                      dtype=tf.string, rank=1)}


def booksum_to_summarization(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """BookSum records ({'document', 'summary'}) -> {'inputs', 'targets', 'references'}."""
  return dataset.map(lambda example: {"inputs": example["document"], "targets": example["summary"],
                                      "references": tf.reshape(example["summary"], [1])},
                     num_parallel_calls=tf.data.AUTOTUNE)


def keep_first_input_tokens(limit: int):
  """A preprocessor (after tokenize, before append_eos) keeping the first limit - 1 tokens of each input, so the
  input with its EOS has at most `limit`."""
  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(lambda example: {**example, "inputs": example["inputs"][:limit - 1]},
                       num_parallel_calls=tf.data.AUTOTUNE)
  return preprocess


def _register(name: str, source: seqio.DataSource, preprocessors: list, vocabulary: seqio.Vocabulary,
              input_tokens_limit: int | None) -> str:
  if input_tokens_limit is not None and (
      isinstance(input_tokens_limit, bool) or not isinstance(input_tokens_limit, int) or input_tokens_limit < 2):
    raise ValueError(f"{name}: input_tokens_limit must be None or an integer >= 2, got {input_tokens_limit!r}.")
  cut = [] if input_tokens_limit is None else [keep_first_input_tokens(input_tokens_limit)]
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[*preprocessors, seqio.preprocessors.tokenize, *cut, seqio.preprocessors.append_eos],
      output_features=summarization_features(vocabulary), metric_fns=[])
  return name


@gin.configurable
def booksum_task(name: str = "booksum", vocabulary: seqio.Vocabulary = gin.REQUIRED,
                 tfds_name: str = "booksum/book:1.0.0", tfds_data_dir: str | None = None,
                 input_tokens_limit: int | None = None) -> str:
  """Registers BookSum (tfds, prepared from the manual download) as a summarization task; returns its name.

  input_tokens_limit: None (default) never cuts an input: one longer than a training row allows is an
  error. An integer keeps each book's first input_tokens_limit tokens (EOS included): the paper's
  32K-token fine-tuning inputs. Set it for training only; evaluation reads whole books.
  """
  source = PreparedTfdsDataSource(
      tfds_name, tfds_data_dir, {split: split for split in BOOKSUM_SPLITS},
      "BookSum needs a manual download: follow tfds's instructions for booksum, run `tfds build booksum "
      "--manual_dir=MANUAL --data_dir=DIR` and set booksum_task.tfds_data_dir (TFDS_DATA_DIR) to DIR.")
  return _register(name, source, [booksum_to_summarization], vocabulary, input_tokens_limit)


def read_summarization_jsonl(path: str) -> list[dict[str, object]]:
  """[{'inputs': text, 'targets': first summary, 'references': [summaries]}] of a JSONL file; ValueError naming
  the file and line of the first bad record (not JSON, no non-empty 'text', no summary)."""
  examples = []
  with tf.io.gfile.GFile(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not a JSON object ({error.msg}).") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'text' and 'summary', got {type(record).__name__}.")
      text, summary = record.get("text"), record.get("summary")
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r:.60}.")
      summaries = [summary] if isinstance(summary, str) else summary
      if (not isinstance(summaries, list) or not summaries
          or any(not isinstance(s, str) or not s.strip() for s in summaries)):
        raise ValueError(f"{where}: 'summary' must be a non-empty string or a non-empty list of them, "
                         f"got {summary!r:.60}.")
      examples.append({"inputs": text, "targets": summaries[0], "references": summaries})
  if not examples:
    raise ValueError(f"{path} holds no examples.")
  return examples


@gin.configurable
def summarization_jsonl_task(name: str = gin.REQUIRED, split_files: Mapping[str, str] = gin.REQUIRED,
                             vocabulary: seqio.Vocabulary | None = None, data_dir: str = "",
                             input_tokens_limit: int | None = None) -> str:
  """Registers a summarization task over JSONL files ({split: path}); returns its name.

  Each line: {"text": the long input, "summary": a string or a list of reference summaries (the
  first is the training target)}. The files are read and checked here, before any training.
  input_tokens_limit: as booksum_task's (None: inputs are never cut).
  """
  by_split = {}
  for split, path in split_files.items():
    path = os.path.join(data_dir, path)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"summarization_jsonl_task {name!r}: split {split!r} file {path!r} does not exist.")
    by_split[split] = read_summarization_jsonl(path)

  def dataset_fn(split: str, shard_index: int, num_shards: int) -> tf.data.Dataset:
    # In-memory tensors, not a Python generator: tf.data can save an iterator over them in a checkpoint.
    chosen = by_split[split][shard_index::num_shards]
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.constant([e["inputs"] for e in chosen], tf.string),
        "targets": tf.constant([e["targets"] for e in chosen], tf.string),
        "references": tf.ragged.constant([e["references"] for e in chosen], tf.string)})

  source = IndexedFunctionDataSource(dataset_fn, splits=list(by_split))
  return _register(name, source, [], vocabulary or byte_vocabulary(), input_tokens_limit)
