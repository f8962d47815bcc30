"""Summarization of long inputs: the JSONL task, the eval's streamed greedy decoding against a naive decoder
that reruns the whole sequence for every token, the files it writes, and bad input."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from lm_runs import parse
from memlm_jax.data import pipeline
from memlm_jax.data.summarization_tasks import read_summarization_jsonl, summarization_jsonl_task
from memlm_jax.evaluation.rouge import rouge_scores
from memlm_jax.launch import eval_lib, summarization_lib, train_lib
from memlm_jax.models.infini_lm import InfiniTransformerLM
from test_long_document_training import _partitioner

SEGMENT = 8
WORDS = "red blue green cat dog bird sat ran slept home park".split()


def write_jsonl(path, count, seed=0, summary_words=2):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(count):
      text = " ".join(rng.choice(WORDS, int(rng.integers(4, 12))))
      summary = " ".join(rng.choice(WORDS, summary_words))
      f.write(json.dumps({"text": text, "summary": [summary, summary.upper()]}) + "\n")


def bindings(data_dir, model_dir, *, targets_length=16, steps=4):
  return [f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {steps}", "SEQUENCE_LENGTH = 96",
          f"TARGETS_LENGTH = {targets_length}", "BATCH_SIZE = 2", "EVAL_BATCH_SIZE = 2",
          "MIXTURE_OR_TASK_NAME = @summarization_jsonl_task()", "summarization_jsonl_task.name = 'tiny_summaries'",
          f"summarization_jsonl_task.data_dir = {data_dir!r}",
          "summarization_jsonl_task.split_files = {'train': 'train.jsonl', 'test': 'test.jsonl'}",
          "train/DatasetConfig.feature_converter = 'prefix_lm'", "train/DatasetConfig.targets_length = %TARGETS_LENGTH",
          f"InfiniTransformerLM.segment_length = {SEGMENT}", "InfiniTransformerLM.num_layers = 1",
          "Checkpointer.async_save = False", "make_mesh.num_devices = 1", "make_mesh.data = 1",
          "warmup_cosine_schedule.warmup_steps = 1", "warmup_cosine_schedule.peak_value = 3e-3"]


def naive_greedy(model, prompt, max_tokens, eos_id=1):
  """Greedy continuation by rerunning the whole sequence from an empty memory for every token."""
  tokens = [0, *prompt.tolist()]
  generated = []
  for _ in range(max_tokens):
    width = -(-len(tokens) // SEGMENT) * SEGMENT
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(tokens)] = tokens
    mask = (np.arange(width) < len(tokens))[None].astype(np.int32)
    logits, _ = model(jnp.asarray(padded), mask=jnp.asarray(mask))
    token = int(np.argmax(np.asarray(logits)[0, len(tokens) - 1]))
    generated.append(token)
    if token == eos_id:
      break
    tokens.append(token)
  return generated


def test_the_eval_decodes_as_a_naive_greedy_decoder_and_writes_rouge(tmp_path):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  write_jsonl(os.path.join(data_dir, "train.jsonl"), 12)
  write_jsonl(os.path.join(data_dir, "test.jsonl"), 3, seed=1)  # 3 examples: the last batch is padded
  model_dir = str(tmp_path / "run")
  parse(["runs/train.gin", "tiny/infini_lm.gin"], bindings(data_dir, model_dir))
  train_lib.train(model_dir)
  parse(["runs/summarization_eval.gin", "tiny/infini_lm.gin"], bindings(data_dir, model_dir))
  scores = summarization_lib.summarization_eval(model_dir)
  written = glob.glob(os.path.join(model_dir, "eval", "summarization_tiny_summaries_test_*_step4.jsonl"))
  assert len(written) == 1
  with open(written[0]) as f:
    generations = [json.loads(line) for line in f]
  assert [g["index"] for g in generations] == [0, 1, 2]
  assert any(g["prediction"] for g in generations)  # the comparison below is not between empty strings
  model = eval_lib.restore_for_inference(model_dir, InfiniTransformerLM, _partitioner(), None).model()
  vocabulary = seqio.ByteVocabulary()
  examples = read_summarization_jsonl(os.path.join(data_dir, "test.jsonl"))
  for example, generation in zip(examples, generations):
    prompt = np.asarray(vocabulary.encode(example["inputs"]) + [1])
    want = [t for t in naive_greedy(model, prompt, 16) if t != 1]
    assert generation["prediction"] == vocabulary.decode(want)
    assert generation["references"] == example["references"]
  assert scores == pytest.approx(rouge_scores([g["prediction"] for g in generations],
                                              [g["references"] for g in generations]))
  with open(written[0].replace(".jsonl", ".json")) as f:
    assert json.load(f)["overall"] == pytest.approx(scores["overall"])


def test_a_summary_longer_than_targets_length_is_refused_before_decoding(tmp_path):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  write_jsonl(os.path.join(data_dir, "train.jsonl"), 4, summary_words=5)
  write_jsonl(os.path.join(data_dir, "test.jsonl"), 2, summary_words=5)
  parse(["runs/train.gin", "tiny/infini_lm.gin"], bindings(data_dir, str(tmp_path / "run"), targets_length=8))
  with pytest.raises(ValueError, match=r"'targets' has \d+ tokens, more than the 8 the batch allows"):
    train_lib.train(str(tmp_path / "run"))  # training: one clear error, never a truncated summary
  import gin  # pylint: disable=g-import-not-at-top
  parse(["runs/summarization_eval.gin", "tiny/infini_lm.gin"], bindings(data_dir, str(tmp_path / "run"),
                                                                          targets_length=8))
  dataset = gin.query_parameter("summarization_eval.dataset").scoped_configurable_fn()
  with pytest.raises(ValueError, match=r"example 0 .* summary .* longer than DatasetConfig.targets_length=8"):
    summarization_lib.read_examples(dataset, None)


@pytest.mark.parametrize("line,message", [
    ("not json", r"bad.jsonl:2 is not a JSON object"),
    ('{"text": "", "summary": "x"}', r"bad.jsonl:2: 'text' must be a non-empty string"),
    ('{"text": "a book", "summary": []}', r"bad.jsonl:2: 'summary' must be a non-empty string or a non-empty list"),
    ('{"text": "a book"}', r"bad.jsonl:2: 'summary' must be"),
    ('[1, 2]', r"bad.jsonl:2: expected a JSON object"),
])
def test_a_bad_jsonl_line_is_named_when_the_task_is_registered(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"text": "fine", "summary": "ok"}) + "\n" + line + "\n")
  with pytest.raises(ValueError, match=message):
    summarization_jsonl_task(name="bad_summaries", split_files={"train": str(path)})


def test_the_jsonl_task_gives_inputs_targets_and_every_reference(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"text": "a long book", "summary": ["first", "second"]}) + "\n\n" +
                  json.dumps({"text": "another", "summary": "only"}) + "\n")
  name = summarization_jsonl_task(name="two_summaries", split_files={"train": str(path)})
  config = pipeline.DatasetConfig(mixture_or_task_name=name, sequence_length=32, batch_size=1, shuffle=False)
  examples = list(pipeline.get_task(config).get_dataset(None, split="train", shuffle=False,
                                                        num_epochs=1).as_numpy_iterator())
  vocabulary = seqio.ByteVocabulary()
  assert [vocabulary.decode(e["inputs"].tolist()) for e in examples] == ["a long book", "another"]
  assert [vocabulary.decode(e["targets"].tolist()) for e in examples] == ["first", "only"]
  assert [list(map(bytes.decode, e["references"])) for e in examples] == [["first", "second"], ["only"]]


def test_input_tokens_limit_keeps_the_first_tokens_and_is_checked(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"text": "abcdefghij", "summary": "s"}) + "\n")
  name = summarization_jsonl_task(name="cut_inputs", split_files={"train": str(path)}, input_tokens_limit=5)
  example = next(seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False,
                                                             num_epochs=1).as_numpy_iterator())
  assert example["inputs"].tolist() == seqio.ByteVocabulary().encode("abcd") + [1]  # 4 tokens and the EOS
  with pytest.raises(ValueError, match="input_tokens_limit must be None or an integer >= 2, got 1"):
    summarization_jsonl_task(name="cut_inputs", split_files={"train": str(path)}, input_tokens_limit=1)
