"""The sequential long-document reader: order, resets, exact resume, per-host disjointness, short and empty
documents, against each document's tokens read directly."""

import os

import numpy as np
import pytest
import seqio

from memlm_jax.data import pipeline
from memlm_jax.data.long_document_tasks import text_directory_task
from memlm_jax.runtime.checkpoints import CheckpointMismatchError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_documents(directory, lengths, seed=0, split="train"):
  """One .txt per document, `lengths[i]` random words each; returns {title: text}."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, split), exist_ok=True)
  texts = {}
  for i, length in enumerate(lengths):
    title = f"doc_{i:03d}"
    texts[title] = " ".join(rng.choice(WORDS, length))
    with open(os.path.join(directory, split, f"{title}.txt"), "w") as f:
      f.write(texts[title])
  return texts


def config(task, lanes, length, **overrides):
  return pipeline.DatasetConfig(mixture_or_task_name=task, sequence_length=length, batch_size=lanes,
                                feature_converter="long_document",
                                **{"pack": False, "shuffle": False, "num_epochs": 1, **overrides})


def register(tmp_path, lengths, name="long_docs_test", seed=0):
  texts = write_documents(str(tmp_path), lengths, seed)
  return text_directory_task(name=name, split_dirs={"train": str(tmp_path / "train")}), texts


def byte_tokens(text):
  return np.asarray(seqio.ByteVocabulary().encode(text) + [1], np.int32)  # EOS = 1


def read_all(reader):
  """Each document's targets and inputs as the lanes gave them, by document index, plus the batches."""
  targets, inputs, batches = {}, {}, []
  for batch in reader:
    batches.append(batch)
    for lane, index in enumerate(batch["document_index"]):
      if index < 0:
        continue
      weights = batch["decoder_loss_weights"][lane] > 0
      targets.setdefault(int(index), []).append(batch["decoder_target_tokens"][lane][weights])
      inputs.setdefault(int(index), []).append(batch["decoder_input_tokens"][lane][weights])
  join = lambda parts: {k: np.concatenate(v) for k, v in parts.items()}  # noqa: E731
  return join(targets), join(inputs), batches


@pytest.mark.parametrize("lanes,length", [(1, 16), (3, 7), (2, 64)])
def test_each_lane_reads_whole_documents_in_order(tmp_path, lanes, length):
  lengths = [30, 3, 12, 50, 1, 25, 8]
  task, texts = register(tmp_path, lengths)
  reader = pipeline.long_document_reader(config(task, lanes, length), record_documents=True)
  targets, inputs, batches = read_all(reader)
  titles = {info.index: info.title for info in reader.documents_read.values()}
  assert sorted(titles.values()) == sorted(texts)
  for index, title in titles.items():
    want = byte_tokens(texts[title])
    np.testing.assert_array_equal(targets[index], want)
    np.testing.assert_array_equal(inputs[index], np.concatenate([[0], want[:-1]]))  # shifted across chunks
    assert reader.documents_read[index].num_words == len(texts[title].split())
    assert reader.documents_read[index].num_tokens == want.size
  # start_of_sequence is 1 exactly where a lane's document index changes, and on idle lanes.
  previous = np.full(lanes, -2)
  for batch in batches:
    changed = (batch["document_index"] != previous) | (batch["document_index"] < 0)
    np.testing.assert_array_equal(batch["start_of_sequence"], changed.astype(np.int32))
    previous = batch["document_index"]


def test_a_document_shorter_than_a_chunk_is_read_in_one_step_and_padded(tmp_path):
  task, texts = register(tmp_path, [2])
  batches = list(pipeline.long_document_reader(config(task, 1, 64)))
  assert len(batches) == 1
  want = byte_tokens(texts["doc_000"])
  np.testing.assert_array_equal(batches[0]["decoder_target_tokens"][0, :want.size], want)
  assert not batches[0]["decoder_target_tokens"][0, want.size:].any()
  assert batches[0]["decoder_loss_weights"][0].sum() == want.size


def test_an_empty_document_is_one_clear_error(tmp_path):
  task, _ = register(tmp_path, [5, 0, 4])
  with pytest.raises(ValueError, match=r"document 1 .*'doc_001'.* is empty"):
    list(pipeline.long_document_reader(config(task, 1, 8)))


@pytest.mark.parametrize("shuffle,epochs", [(False, 1), (True, None)])
def test_a_restored_reader_continues_exactly(tmp_path, shuffle, epochs):
  task, _ = register(tmp_path, [40, 9, 23, 5, 31, 14, 2, 19])
  settings = config(task, 3, 8, shuffle=shuffle, num_epochs=epochs)
  first = pipeline.long_document_reader(settings)
  for _ in range(7):  # mid-document in several lanes
    next(first)
  path = str(tmp_path / "position")
  first.save(path)
  want = [next(first) for _ in range(12)]
  second = pipeline.long_document_reader(settings)
  next(second)  # a different position, overwritten by the restore
  second.restore(path)
  for expected in want:
    got = next(second)
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_restoring_with_other_lanes_is_a_mismatch_error(tmp_path):
  task, _ = register(tmp_path, [40, 9, 23])
  reader = pipeline.long_document_reader(config(task, 2, 8))
  next(reader)
  reader.save(str(tmp_path / "position"))
  other = pipeline.long_document_reader(config(task, 2, 16))
  with pytest.raises(CheckpointMismatchError, match="2 lanes of 8 tokens"):
    other.restore(str(tmp_path / "position"))


def test_hosts_read_disjoint_whole_documents(tmp_path):
  task, texts = register(tmp_path, [11, 7, 30, 2, 18, 9, 4])
  seen = []
  for index in range(2):
    reader = pipeline.long_document_reader(config(task, 4, 8), shard=(index, 2), record_documents=True)
    targets, _, _ = read_all(reader)
    host = {info.title for info in reader.documents_read.values()}
    for doc_index, info in reader.documents_read.items():
      np.testing.assert_array_equal(targets[doc_index], byte_tokens(texts[info.title]))  # whole, not cut
    seen.append(host)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(texts)


def test_bad_reader_settings_are_refused_before_reading(tmp_path):
  task, _ = register(tmp_path, [5])
  with pytest.raises(ValueError, match="pack must be False"):
    pipeline.long_document_reader(config(task, 1, 8, pack=True))
  with pytest.raises(ValueError, match="split 'test' is not in task"):
    pipeline.long_document_reader(config(task, 1, 8, split="test"))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.long_document_reader(config(task, 3, 8), shard=(0, 2))
  with pytest.raises(FileNotFoundError, match="holds no .txt files"):
    text_directory_task(name="nothing_here", split_dirs={"train": str(tmp_path / "missing")})
