"""Training and evaluating over whole documents with the memory carried between steps: the losses of a
document read in steps equal one forward pass over the whole document; a resumed run continues exactly;
the per-document eval reports the one-shot NLL, with word-level perplexity from the raw text."""

import json
import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_runs import parse
from memlm_jax.data import pipeline
from memlm_jax.evaluation.perplexity import document_perplexity, long_document_metrics
from memlm_jax.launch import eval_lib, long_document_lib, train_lib
from memlm_jax.models.infini_lm import InfiniTransformerLM
from memlm_jax.runtime.summaries import read_jsonl
from test_long_documents import byte_tokens, write_documents

SEGMENT = 8
LENGTHS = [9, 26, 3, 17, 12]  # words per document: several chunks, a lane switching documents, a short one


def bindings(data_dir, model_dir, steps, *, lanes=2, sequence_length=2 * SEGMENT, peak_lr=0.0, extra=()):
  return [f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {steps}", f"SEQUENCE_LENGTH = {sequence_length}",
          f"BATCH_SIZE = {lanes}", f"EVAL_BATCH_SIZE = {lanes}", "MIXTURE_OR_TASK_NAME = @text_directory_task()",
          "text_directory_task.name = 'long_docs_training'",
          f"text_directory_task.split_dirs = {{'train': {data_dir + '/train'!r}, 'test': {data_dir + '/train'!r}}}",
          "train/DatasetConfig.feature_converter = 'long_document'", "train/DatasetConfig.shuffle = False",
          f"InfiniTransformerLM.segment_length = {SEGMENT}", "InfiniTransformerLM.num_layers = 1",
          "train.log_every_steps = 1", "Checkpointer.save_interval_steps = 3", "Checkpointer.async_save = False",
          f"warmup_cosine_schedule.peak_value = {peak_lr}", "warmup_cosine_schedule.warmup_steps = 1",
          "warmup_cosine_schedule.decay_steps = 40", "make_mesh.num_devices = 2", "make_mesh.data = 2", *extra]


FILES = ["runs/train.gin", "tiny/infini_lm.gin"]


def one_shot_token_nll(model, tokens):
  """Each token's next-token NLL [tokens] in one forward pass over the whole document from an empty memory."""
  padded = -(-tokens.size // SEGMENT) * SEGMENT
  inputs = np.zeros((1, padded), np.int32)
  inputs[0, 1:tokens.size] = tokens[:-1]
  targets = np.zeros((1, padded), np.int32)
  targets[0, :tokens.size] = tokens
  logits, _ = model(jnp.asarray(inputs), mask=jnp.asarray(targets != 0))
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
  return -np.take_along_axis(logp, targets[..., None], -1)[0, :tokens.size, 0]


def train_documents(tmp_path, steps, name="run", **kwargs):
  data_dir = str(tmp_path / "data")
  texts = write_documents(data_dir, LENGTHS, seed=3)
  model_dir = str(tmp_path / name)
  parse(FILES, bindings(data_dir, model_dir, steps, **kwargs))
  train_lib.train(model_dir)
  return texts, model_dir, read_jsonl(f"{model_dir}/train/metrics.jsonl")


def expected_step_nll(reader, token_nll, steps):
  """Per step, the summed one-shot NLL of the tokens the reader's lanes hold (a naive replay of the stream)."""
  offsets, out = {}, []
  for _ in range(steps):
    batch = next(reader)
    total = 0.0
    for lane, index in enumerate(batch["document_index"]):
      if index < 0:
        continue
      n = int(batch["decoder_loss_weights"][lane].sum())
      title = reader.documents_read[int(index)].title
      start = 0 if batch["start_of_sequence"][lane] else offsets[lane]
      total += float(token_nll[title][start:start + n].sum())
      offsets[lane] = start + n
    out.append(total)
  return np.asarray(out)


def test_training_over_documents_in_steps_gives_the_losses_of_one_forward_pass(tmp_path):
  """With a zero learning rate the parameters stay at their init, so each training step's loss must be the
  one-shot NLL of the chunk of every lane's document it holds: the memory is carried across steps and reset
  exactly where a lane starts a new document (a second pass over the corpus included)."""
  steps = 30
  texts, model_dir, rows = train_documents(tmp_path, steps)
  model = eval_lib.restore_for_inference(model_dir, InfiniTransformerLM, _partitioner(), None).model()
  token_nll = {title: one_shot_token_nll(model, byte_tokens(text)) for title, text in texts.items()}
  import gin  # pylint: disable=g-import-not-at-top
  config = gin.query_parameter("train.train_dataset").scoped_configurable_fn()
  reader = pipeline.long_document_reader(config, record_documents=True)
  want = expected_step_nll(reader, token_nll, steps)
  got = np.asarray([rows[s]["loss"] * rows[s]["tokens"] for s in range(1, steps + 1)])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert sum(t.size for t in map(byte_tokens, texts.values())) < sum(rows[s]["tokens"] for s in rows)  # 2nd pass


def _partitioner():
  import gin  # pylint: disable=g-import-not-at-top
  from memlm_jax.runtime.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    return Partitioner()


def test_a_resumed_run_continues_with_the_same_losses(tmp_path):
  """Stopping after step 4 (mid-document in both lanes) and resuming to step 8 gives the losses of a run
  that never stopped: the memory (TrainState.carry) and the reader's position are in the checkpoint."""
  *_, straight = train_documents(tmp_path, 8, name="straight", peak_lr=1e-2)
  train_documents(tmp_path, 4, name="resumed", peak_lr=1e-2)
  *_, resumed = train_documents(tmp_path, 8, name="resumed", peak_lr=1e-2)
  for step in range(5, 9):
    np.testing.assert_allclose(resumed[step]["loss"], straight[step]["loss"], rtol=1e-5)
    assert resumed[step]["tokens"] == straight[step]["tokens"]


def test_the_long_document_eval_reports_each_documents_one_shot_nll(tmp_path):
  texts, model_dir, _ = train_documents(tmp_path, 5, peak_lr=1e-2)
  data_dir = str(tmp_path / "data")
  parse(["runs/long_document_eval.gin", "tiny/infini_lm.gin"], bindings(data_dir, model_dir, 5))
  results = long_document_lib.long_document_eval(model_dir)
  model = eval_lib.restore_for_inference(model_dir, InfiniTransformerLM, _partitioner(), None).model()
  by_title = {d["title"]: d for d in results["documents"]}
  assert sorted(by_title) == sorted(texts)
  for title, text in texts.items():
    tokens = byte_tokens(text)
    nll = one_shot_token_nll(model, tokens).sum()
    got = by_title[title]
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-4)
    assert got["tokens"] == tokens.size and got["words"] == len(text.split())
    np.testing.assert_allclose(got["word_perplexity"], math.exp(nll / len(text.split())), rtol=1e-4)
  overall = results["overall"]
  words = sum(len(t.split()) for t in texts.values())
  np.testing.assert_allclose(overall["word_perplexity"], math.exp(sum(d["nll"] for d in by_title.values()) / words),
                             rtol=1e-6)
  written = glob.glob(os.path.join(model_dir, "eval", "long_document_long_docs_training_test_*_step5.json"))
  assert len(written) == 1
  with open(written[0]) as f:
    assert json.load(f)["overall"] == pytest.approx(overall)


def test_word_and_token_perplexity_on_a_hand_example():
  # "the cat sat" in 6 tokens (EOS included) with a total NLL of 6 nats: 1 nat per token, 2 per word.
  one = document_perplexity(6.0, 6, 3)
  assert one["token_perplexity"] == pytest.approx(math.e) and one["word_perplexity"] == pytest.approx(math.e ** 2)
  both = long_document_metrics([{"title": "a", "nll": 6.0, "tokens": 6, "words": 3},
                                {"title": "b", "nll": 2.0, "tokens": 4, "words": 1}])
  # Corpus-level: 8 nats over 10 tokens and over 4 words, not the mean of the two books' perplexities.
  assert both["overall"]["token_perplexity"] == pytest.approx(math.exp(0.8))
  assert both["overall"]["word_perplexity"] == pytest.approx(math.exp(2.0))
  assert both["documents"][1]["word_perplexity"] == pytest.approx(math.exp(2.0))
  unknown = long_document_metrics([{"title": "a", "nll": 6.0, "tokens": 6, "words": -1}])
  assert unknown["overall"]["word_perplexity"] is None
  with pytest.raises(ValueError, match="no documents"):
    long_document_metrics([])
