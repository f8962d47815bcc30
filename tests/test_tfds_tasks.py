"""The tfds-backed tasks (PG19, BookSum) read through tfds's real builders and seqio's TfdsDataSource, with
known records served by tfds.testing.mock_data in place of prepared files, and never a download."""

import contextlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from memlm_jax.data import pipeline
from memlm_jax.data.long_document_tasks import PG19_SPLITS, pg19_task
from memlm_jax.data.summarization_tasks import BOOKSUM_SPLITS, booksum_task
from test_long_documents import byte_tokens, config, read_all

VOCABULARY = seqio.ByteVocabulary()


def pg19_book(title, text, book_id=0):
  """A record with every feature of tfds's pg19 builder."""
  return {"book_text": text, "book_title": title, "book_id": np.int32(book_id), "publication_date": "1900",
          "book_link": f"http://www.gutenberg.org/ebooks/{book_id}"}


PG19_BOOKS = {
    "test": [pg19_book("A Long Tale", "It was a dark and stormy night; the rain fell in torrents.\n\nExcept at "
                       "occasional intervals, when it was checked by a violent gust of wind.", 11),
             pg19_book("Short", "The end.", 12),  # 9 tokens with EOS: less than one 16-token chunk
             pg19_book("Caf\u00e9 Stories",  # multi-byte characters, a tab and runs of spaces
                       "Caf\u00e9 au lait,\tand  two   croissants \u2014 s'il vous pla\u00eet.", 13),
             pg19_book("Middling", "Call me Ishmael. Some years ago, never mind how long precisely.", 14)],
    "validation": [pg19_book("Validation Book", "A validation text of exactly seven words.", 21)],
    "train": [pg19_book("Train Book One", "The first training book.", 31),
              pg19_book("Train Book Two", "The second training book, a little longer.", 32)],
}

BOOKSUM_BOOKS = {
    "test": [{"document": "Chapter 1. A girl falls down a rabbit hole and meets a white rabbit.\nChapter 2. Tea.",
              "summary": "Alice falls; tea follows."},
             {"document": "Ships, whales and a captain with one leg.", "summary": "Ahab hunts a whale."},
             {"document": "A very short book.", "summary": "Short."}],
    "train": [{"document": "Training document.", "summary": "Training summary."}],
    "validation": [{"document": "Validation document.", "summary": "Validation summary."}],
}


class DownloadAttempted(AssertionError):
  pass


@pytest.fixture(autouse=True)
def downloads(monkeypatch):
  """Every attempt to download or prepare a dataset, refused (DownloadAttempted) and listed.

  Inside mock_data, download_and_prepare is its no-op; outside, this guard shows what an unmocked read asks of
  tfds. seqio's memoized builders are per test, so a mocked builder never leaks into another test.
  """
  attempts = []

  def refuse(what):
    def fail(self, *args, **kwargs):
      name = self.info.full_name if isinstance(self, tfds.core.DatasetBuilder) else repr(args[0] if args else None)
      attempts.append((what, name, str(getattr(self, "data_dir", ""))))
      raise DownloadAttempted(f"the test tried {what} of {name}")
    return fail

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse("download_and_prepare"))
  monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse("DownloadManager.download"))
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      refuse("DownloadManager.download_and_extract"))
  monkeypatch.setattr(seqio.utils.LazyTfdsLoader, "_MEMOIZED_BUILDERS", {})
  return attempts


def write_metadata(data_dir, tfds_name, records_by_split):
  """The dataset_info.json that preparing `tfds_name` in `data_dir` writes (split names and sizes; no data
  files), so that mock_data (MockPolicy.USE_FILES) gives the builder the splits seqio shards by."""
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  template = lambda split: tfds.core.ShardedFileTemplate(  # noqa: E731
      data_dir=builder.data_path, dataset_name=builder.name, split=split, filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[len(records)], num_bytes=0, filename_template=template(split))
      for split, records in records_by_split.items()]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@contextlib.contextmanager
def mocked_tfds(data_dir, tfds_name, records_by_split):
  """tfds serving `records_by_split` ({split: [record]}) for `tfds_name` in `data_dir`; yields the reads made,
  [{'dataset', 'split', 'shard'}], each a call of the builder's `_as_dataset` (in place of the files)."""
  write_metadata(data_dir, tfds_name, records_by_split)
  reads = []

  def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
    context = read_config.input_context if read_config else None
    reads.append({"dataset": builder.info.full_name, "split": str(split),
                  "shard": context and (context.input_pipeline_id, context.num_input_pipelines)})
    records = records_by_split[str(split)]
    assert all(set(record) == set(builder.info.features) for record in records), "not the builder's features"
    return tf.data.Dataset.from_tensor_slices({name: [record[name] for record in records] for name in records[0]})

  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir, as_dataset_fn=as_dataset):
    yield reads


@pytest.mark.parametrize("lanes", [1, 2])
def test_pg19_books_are_read_whole_by_the_long_document_reader(tmp_path, downloads, lanes):
  data_dir = str(tmp_path)
  with mocked_tfds(data_dir, "pg19:0.1.1", PG19_BOOKS) as reads:
    task = pg19_task(name=f"pg19_reader_test_{lanes}", vocabulary=VOCABULARY, tfds_data_dir=data_dir)
    reader = pipeline.long_document_reader(config(task, lanes, 16, split="test"), record_documents=True)
    targets, _, _ = read_all(reader)
  books = {book["book_title"]: book["book_text"] for book in PG19_BOOKS["test"]}
  assert sorted(info.title for info in reader.documents_read.values()) == sorted(books)
  for index, info in reader.documents_read.items():
    want = byte_tokens(books[info.title])
    np.testing.assert_array_equal(targets[index], want, err_msg=info.title)
    assert info.num_words == len(books[info.title].split())
    assert info.num_tokens == want.size
  assert reads == [{"dataset": "pg19/0.1.1", "split": "test", "shard": (0, 1)}]
  assert downloads == []


def test_pg19_registers_train_validation_and_test_and_reads_each(tmp_path, downloads):
  data_dir = str(tmp_path)
  with mocked_tfds(data_dir, "pg19:0.1.1", PG19_BOOKS) as reads:
    task = pg19_task(name="pg19_splits_test", vocabulary=VOCABULARY, tfds_data_dir=data_dir)
    assert tuple(seqio.get_mixture_or_task(task).splits) == PG19_SPLITS == ("train", "validation", "test")
    for split in PG19_SPLITS:
      reader = pipeline.long_document_reader(config(task, 1, 64, split=split), record_documents=True)
      read_all(reader)
      assert sorted(info.title for info in reader.documents_read.values()) == sorted(
          book["book_title"] for book in PG19_BOOKS[split])
  assert [read["split"] for read in reads] == list(PG19_SPLITS)
  assert downloads == []


def test_booksum_gives_the_document_and_summary_and_prefix_lm_weights_the_summary(tmp_path, downloads):
  data_dir = str(tmp_path)
  books = BOOKSUM_BOOKS["test"]
  with mocked_tfds(data_dir, "booksum/book:1.0.0", BOOKSUM_BOOKS) as reads:
    task = booksum_task(name="booksum_test", vocabulary=VOCABULARY, tfds_data_dir=data_dir)
    assert tuple(seqio.get_mixture_or_task(task).splits) == BOOKSUM_SPLITS
    examples = list(seqio.get_mixture_or_task(task).get_dataset(
        None, split="test", shuffle=False, num_epochs=1).as_numpy_iterator())
    targets_length, length = 32, 128
    batches = list(pipeline.get_dataset(pipeline.DatasetConfig(
        mixture_or_task_name=task, sequence_length=length, batch_size=len(books), split="test",
        feature_converter="prefix_lm", targets_length=targets_length, pack=False, shuffle=False,
        num_epochs=1)).as_numpy_iterator())
  assert len(examples) == len(books)
  for example, book in zip(examples, books):
    np.testing.assert_array_equal(example["inputs"], byte_tokens(book["document"]))
    np.testing.assert_array_equal(example["targets"], byte_tokens(book["summary"]))
    assert example["references"].tolist() == [book["summary"].encode()]
  assert len(batches) == 1
  batch = batches[0]
  for row, book in enumerate(books):
    document, summary = byte_tokens(book["document"]), byte_tokens(book["summary"])
    want = np.zeros(length, np.int32)
    want[:document.size + summary.size] = np.concatenate([document, summary])
    np.testing.assert_array_equal(batch["decoder_target_tokens"][row], want)
    weights = np.zeros(length, np.float32)
    weights[document.size:document.size + summary.size] = 1
    np.testing.assert_array_equal(batch["decoder_loss_weights"][row], weights)
    np.testing.assert_array_equal(batch["decoder_target_tokens"][row][weights > 0], summary)
  assert [read["split"] for read in reads] == ["test", "test"]
  assert downloads == []


UNPREPARED = r"the tfds dataset '{}[:/].*' is not prepared in .*{}"


def test_an_unprepared_pg19_is_one_error_naming_how_to_prepare_it_and_never_a_download(tmp_path, downloads):
  task = pg19_task(name="pg19_unprepared_test", vocabulary=VOCABULARY, tfds_data_dir=str(tmp_path))
  message = UNPREPARED.format("pg19", "tfds build pg19")
  with pytest.raises(FileNotFoundError, match=message):  # the reader reads by shard
    pipeline.long_document_reader(config(task, 1, 16, split="test"))
  with pytest.raises(FileNotFoundError, match=message):  # no shard: seqio would otherwise call tfds.load(download=True)
    seqio.get_mixture_or_task(task).get_dataset(None, split="test", shuffle=False, num_epochs=1)
  assert downloads == []


def test_an_unprepared_booksum_is_one_error_naming_how_to_prepare_it_and_never_a_download(tmp_path, downloads):
  task = booksum_task(name="booksum_unprepared_test", vocabulary=VOCABULARY, tfds_data_dir=str(tmp_path))
  message = UNPREPARED.format("booksum", "manual download")
  with pytest.raises(FileNotFoundError, match=message):
    pipeline.get_dataset(pipeline.DatasetConfig(
        mixture_or_task_name=task, sequence_length=64, batch_size=1, split="test", feature_converter="prefix_lm",
        targets_length=16, pack=False, shuffle=False, num_epochs=1))
  with pytest.raises(FileNotFoundError, match=message):
    seqio.get_mixture_or_task(task).get_dataset(None, split="test", shuffle=False, num_epochs=1)
  assert downloads == []
