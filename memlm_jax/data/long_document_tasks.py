"""seqio tasks whose examples are whole long documents (books), read in order by data/long_documents.py.

Every example holds one document, never cut: `targets` (its tokens, EOS appended), `title` (a
string naming it in per-document results) and `num_words` (whitespace-separated words of the raw
text, the denominator of PG19's word-level perplexity). Three sources:

- `pg19_task`: PG19 through tfds (`pg19`: `book_text`, `book_title`, `publication_date`, `url`;
  prepared with `tfds build pg19` or a `data_dir` that holds it).
- `text_directory_task`: a directory of `.txt` files per split, one document per file (users' own
  corpora, and the generated corpora of scripts/make_long_documents.py).

Documents are sharded over hosts whole (by file where there are enough files, else seqio's example
split), so no document is read by two hosts.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping

import gin
import seqio
import tensorflow as tf

from memlm_jax.data.sources import PreparedTfdsDataSource
from memlm_jax.data.vocabularies import byte_vocabulary

PG19_SPLITS = ("train", "validation", "test")


def _metadata_feature(dtype: tf.DType) -> seqio.Feature:
  return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, required=False, dtype=dtype, rank=0)


def document_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """The output features of a long-document task."""
  return {"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
          "title": _metadata_feature(tf.string), "num_words": _metadata_feature(tf.int32)}


def _document(text: tf.Tensor, title: tf.Tensor) -> dict[str, tf.Tensor]:
  return {"targets": text, "title": title,
          "num_words": tf.size(tf.strings.split(text), out_type=tf.int32)}


def pg19_to_document(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """PG19 records ({'book_text', 'book_title', ...}) -> {'targets', 'title', 'num_words'}."""
  return dataset.map(lambda book: _document(book["book_text"], book["book_title"]),
                     num_parallel_calls=tf.data.AUTOTUNE)


def _register(name: str, source: seqio.DataSource, preprocessors: list, vocabulary: seqio.Vocabulary) -> str:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[*preprocessors, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=document_features(vocabulary), metric_fns=[])
  return name


@gin.configurable
def pg19_task(name: str = "pg19", vocabulary: seqio.Vocabulary = gin.REQUIRED, tfds_name: str = "pg19:0.1.1",
              tfds_data_dir: str | None = None) -> str:
  """Registers PG19 (tfds) as a long-document task; returns its name."""
  source = PreparedTfdsDataSource(tfds_name, tfds_data_dir, {split: split for split in PG19_SPLITS},
                                  f"prepare it with `tfds build pg19 --data_dir=DIR` and set pg19_task.tfds_data_dir "
                                  "(TFDS_DATA_DIR) to DIR; nothing is downloaded at run time.")
  return _register(name, source, [pg19_to_document], vocabulary)


def _read_document(path: tf.Tensor) -> tf.data.Dataset:
  title = tf.strings.regex_replace(tf.strings.split(path, "/")[-1], r"\.txt$", "")
  return tf.data.Dataset.from_tensors(_document(tf.io.read_file(path), title))


@gin.configurable
def text_directory_task(name: str = gin.REQUIRED, split_dirs: Mapping[str, str] = gin.REQUIRED,
                        vocabulary: seqio.Vocabulary | None = None, data_dir: str = "") -> str:
  """Registers a long-document task over directories of `.txt` files (one document per file, titled by its
  file name without `.txt`); returns its name.

  Args:
    name: task name.
    split_dirs: {split: directory}, e.g. {'train': 'books/train', 'test': 'books/test'}.
    vocabulary: defaults to the byte vocabulary.
    data_dir: prefix for relative directories.
  """
  patterns = {}
  for split, directory in split_dirs.items():
    directory = os.path.join(data_dir, directory)
    if not glob.glob(os.path.join(directory, "*.txt")):
      raise FileNotFoundError(f"text_directory_task {name!r}: split {split!r} directory {directory!r} holds no "
                              ".txt files (one document per file).")
    patterns[split] = os.path.join(directory, "*.txt")
  source = seqio.FileDataSource(_read_document, patterns)
  return _register(name, source, [], vocabulary or byte_vocabulary())
