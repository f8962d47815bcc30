"""The sequential long-document reader: each batch row (lane) reads one document in order, chunk after chunk.

A memory model reads a book the way a person does, from the first page to the last, carrying what
it has read in its memory. The reader gives it that order across training steps (as meliad's PG19
reader does): lane r holds one document and each step gives the lane the document's next
`sequence_length` tokens; when the document ends, the lane takes the next document of the stream
and its `start_of_sequence` is 1, telling the model to reset that lane's memory. The trainer
carries the memory from step to step (runtime/trainer.py), so a lane's loss on a chunk is the
loss of one forward pass over the whole document up to there (with gradients stopped at the step
boundary).

Batch features (numpy, this host's lanes):
  decoder_input_tokens  [lanes, sequence_length] int32: the document shifted right by one, 0 before its
                        first token (a chunk's first input is the previous chunk's last token)
  decoder_target_tokens [lanes, sequence_length] int32: the chunk's tokens, 0 after the document's end
  decoder_loss_weights  [lanes, sequence_length] float32: 1 on the document's tokens
  start_of_sequence     [lanes] int32: 1 where the lane begins a document (or is idle)
  document_index        [lanes] int32: the document's number in this host's stream, -1 for an idle lane

Rules for short and empty documents: a document shorter than one chunk (or one segment) is read in
one step, padded with zero-weight positions; an empty document (no tokens before its EOS) is an
error naming it, since its word-level perplexity is undefined and an empty book is a data bug.

The stream of documents is a seqio task's dataset (data/long_document_tasks.py), sharded over
hosts whole. The position (the document iterator's tf.data state, every lane's document and
offset) is saved with each checkpoint, so a resumed run reads exactly what the killed one would
have. With `num_epochs=1` (evaluation) idle lanes give all-padding rows once the stream runs out,
and iteration stops when every lane is idle.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import tensorflow as tf

from memlm_jax.runtime.checkpoints import CheckpointMismatchError

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "start_of_sequence",
            "document_index")


@dataclasses.dataclass(frozen=True)
class DocumentInfo:
  """What an evaluation reports per document."""
  index: int  # the document's number in this host's stream
  title: str
  num_words: int  # whitespace-separated words of the raw text; -1 if the task does not give them
  num_tokens: int  # targets, EOS included


class LongDocumentReader:
  """Batches of consecutive chunks of whole documents, one document per lane at a time.

  Args:
    documents: a tf.data.Dataset of {'targets': int32 [tokens] (EOS included), optional 'title',
      'num_words'}, one whole document each (a seqio task's dataset with no sequence length).
    lanes: batch rows on this host.
    sequence_length: tokens per lane per step.
    record_documents: keep a DocumentInfo per document read (`documents_read`); for evaluation
      (a training stream is endless).
  """

  def __init__(self, documents: tf.data.Dataset, lanes: int, sequence_length: int, *,
               record_documents: bool = False):
    if lanes < 1 or sequence_length < 1:
      raise ValueError(f"LongDocumentReader needs lanes >= 1 and sequence_length >= 1, got {lanes} and "
                       f"{sequence_length}.")
    if "targets" not in documents.element_spec:
      raise ValueError(f"LongDocumentReader: the documents have no 'targets' feature (they have "
                       f"{sorted(documents.element_spec)}).")
    self.lanes = lanes
    self.sequence_length = sequence_length
    self.record_documents = record_documents
    self.documents_read: dict[int, DocumentInfo] = {}
    self._iterator = iter(documents)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._tokens = [np.zeros((0,), np.int32) for _ in range(lanes)]
    self._offsets = np.zeros((lanes,), np.int64)
    self._document = np.full((lanes,), -1, np.int64)
    self._documents_taken = 0
    self._exhausted = False

  def __iter__(self) -> "LongDocumentReader":
    return self

  def _take_document(self, lane: int) -> None:
    """Gives `lane` the stream's next document (or leaves it idle once the stream has run out)."""
    self._tokens[lane], self._offsets[lane], self._document[lane] = np.zeros((0,), np.int32), 0, -1
    if self._exhausted:
      return
    try:
      document = next(self._iterator)
    except StopIteration:
      self._exhausted = True
      return
    tokens = document["targets"].numpy().astype(np.int32)
    index = self._documents_taken
    title = document["title"].numpy().decode("utf-8", "replace") if "title" in document else ""
    num_words = int(document["num_words"].numpy()) if "num_words" in document else -1
    if tokens.size <= 1 or num_words == 0:
      raise ValueError(f"document {index} of the stream ({title!r}) is empty ({tokens.size} tokens with its EOS, "
                       f"{num_words} words); remove it from the corpus.")
    self._documents_taken += 1
    self._tokens[lane], self._document[lane] = tokens, index
    if self.record_documents:
      self.documents_read[index] = DocumentInfo(index, title, num_words, int(tokens.size))

  def __next__(self) -> dict[str, np.ndarray]:
    length = self.sequence_length
    starts = np.zeros((self.lanes,), np.int32)
    for lane in range(self.lanes):
      if self._offsets[lane] >= self._tokens[lane].size:
        self._take_document(lane)
        starts[lane] = 1
    if np.all(self._document < 0):
      raise StopIteration
    inputs = np.zeros((self.lanes, length), np.int32)
    targets = np.zeros((self.lanes, length), np.int32)
    for lane in range(self.lanes):
      tokens, offset = self._tokens[lane], int(self._offsets[lane])
      chunk = tokens[offset:offset + length]
      targets[lane, :chunk.size] = chunk
      shifted = tokens[max(offset - 1, 0):offset + length - 1]
      inputs[lane, 1 if offset == 0 else 0:][:shifted.size] = shifted
      self._offsets[lane] = offset + length
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets != 0).astype(np.float32), "start_of_sequence": starts,
            "document_index": self._document.astype(np.int32)}

  def idle_batch(self) -> dict[str, np.ndarray]:
    """An all-padding batch (every lane idle): what a host that has run out feeds to steps the other
    hosts still run."""
    zeros = np.zeros((self.lanes, self.sequence_length), np.int32)
    return {"decoder_input_tokens": zeros, "decoder_target_tokens": zeros,
            "decoder_loss_weights": zeros.astype(np.float32), "start_of_sequence": np.ones((self.lanes,), np.int32),
            "document_index": np.full((self.lanes,), -1, np.int32)}

  # ------------------------------------------------------------------------------------------------------------
  # Checkpointing (the runtime's SavableIterator interface).

  def _shapes(self) -> dict[str, int]:
    return {"lanes": self.lanes, "sequence_length": self.sequence_length}

  def save(self, path: str) -> None:
    """The document iterator's tf.data state at `path` and the lanes' documents and offsets beside it."""
    self._checkpoint.write(path)
    lengths = np.asarray([t.size for t in self._tokens], np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, tokens=np.concatenate(self._tokens), lengths=lengths, offsets=self._offsets,
             document=self._document, taken=np.asarray(self._documents_taken), exhausted=np.asarray(self._exhausted))
    with tf.io.gfile.GFile(path + ".lanes.npz", "wb") as f:
      f.write(buffer.getvalue())
    with tf.io.gfile.GFile(path + ".shapes.json", "w") as f:
      f.write(json.dumps(self._shapes()))

  def restore(self, path: str) -> None:
    """Restores the position saved at `path`; CheckpointMismatchError (before anything is read) if it was
    saved with another number of lanes or sequence length."""
    with tf.io.gfile.GFile(path + ".shapes.json") as f:
      saved = json.loads(f.read())
    if saved != self._shapes():
      raise CheckpointMismatchError(
          f"the long-document reader saved in {os.path.dirname(path)} had {saved['lanes']} lanes of "
          f"{saved['sequence_length']} tokens per host, the configured one has {self.lanes} of "
          f"{self.sequence_length}; a resumed run must keep its batch size and sequence length. To train with new "
          "ones, start a new MODEL_DIR that warm-starts from this run (--gin.train.init_from=\"'<this MODEL_DIR>'\").")
    with tf.io.gfile.GFile(path + ".lanes.npz", "rb") as f:
      lanes = np.load(io.BytesIO(f.read()))
    self._checkpoint.read(path).assert_consumed()
    bounds = np.concatenate([[0], np.cumsum(lanes["lengths"])])
    self._tokens = [lanes["tokens"][bounds[i]:bounds[i + 1]].astype(np.int32) for i in range(self.lanes)]
    self._offsets = lanes["offsets"].astype(np.int64)
    self._document = lanes["document"].astype(np.int64)
    self._documents_taken = int(lanes["taken"])
    self._exhausted = bool(lanes["exhausted"])

  def fast_forward(self, batches: int) -> None:
    """Skips `batches` batches: the position a fresh reader has after that many steps."""
    for _ in range(batches):
      next(self)
