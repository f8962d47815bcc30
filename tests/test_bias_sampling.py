"""CLAS-style training bias lists (data/bias_sampling.py), checked against plain Python: a phrase
"occurs" in a transcript when " phrase " is a substring of " text " (words single-spaced), and
distractors are checked against the positives the earlier outputs show.
"""

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from memlm_jax import registry  # noqa: F401  (gin names the configurables)
from memlm_jax.data import bias_sampling, pipeline, speech, speech_features
from memlm_jax.data.bias_sampling import TrainingBiasLists
from memlm_jax.data.vocabularies import byte_vocabulary

VOCAB = byte_vocabulary()
WORDS = ("call", "play", "the", "music", "by", "zan", "quimby", "oksana", "home", "mobile", "on", "some", "send")
ABSENT = ("xylo fon", "brix", "vartan ian")  # never in a transcript


def _norm(phrase):
  return " ".join(phrase.split())


def _occurs(phrase, text):
  return f" {_norm(phrase)} " in f" {_norm(text)} "


def _corpus(count, seed=0, with_bias=True, entities=(1, 3), words=(6, 12)):
  """`count` examples: random texts over WORDS; bias = word runs of the text (entities, one with a
  doubled space) plus absent phrases."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(count):
    text = [WORDS[j] for j in rng.integers(len(WORDS), size=rng.integers(words[0], words[1] + 1))]
    bias = []
    for _ in range(rng.integers(entities[0], entities[1] + 1)):
      length = int(rng.integers(1, 5))
      start = int(rng.integers(0, len(text) - length + 1))
      bias.append(" ".join(text[start:start + length]))
    if bias:
      bias[0] = bias[0].replace(" ", "  ")  # compared word by word
    bias += [ABSENT[j] for j in rng.choice(len(ABSENT), size=rng.integers(0, 3), replace=False)]
    bias = list(dict.fromkeys(bias))  # as the task's lists are (speech.tokenize_text)
    example = {"text": " ".join(text), "id": f"u{i}"}
    if with_bias:
      example["bias"] = [bias[j] for j in rng.permutation(len(bias))]
    examples.append(example)
  return examples


def _dataset(examples):
  features = {"text": [e["text"] for e in examples], "id": [e["id"] for e in examples]}
  if "bias" in examples[0]:
    features["bias"] = tf.ragged.constant([e["bias"] for e in examples], dtype=tf.string, ragged_rank=1)
  return tf.data.Dataset.from_tensor_slices(features)


def _lists(sampler, examples, max_phrases=32):
  """[(bias phrases, bias token lists)] of the sampled stream."""
  out = []
  for example in sampler(_dataset(examples), VOCAB, max_phrases).as_numpy_iterator():
    bias = [p.decode() for p in example["bias"]]
    out.append((bias, [list(t) for t in example["bias_tokens"]]))
  return out


def _split(bias, text):
  return [p for p in bias if _occurs(p, text)], [p for p in bias if not _occurs(p, text)]


def test_positives_are_the_entities_and_ngrams_of_the_text_and_distractors_earlier_positives():
  examples = _corpus(60)
  sampler = TrainingBiasLists(ngram_probability=1.0, max_ngrams=2, max_ngram_words=3, entity_probability=1.0,
                              num_distractors=4, buffer_size=10_000, seed=1)
  earlier, ngram_lengths = set(), set()
  for example, (bias, tokens) in zip(examples, _lists(sampler, examples)):
    text = example["text"]
    assert len(set(bias)) == len(bias) and all(p == _norm(p) for p in bias)
    assert tokens == [VOCAB.encode(p) for p in bias]
    positives, distractors = _split(bias, text)
    entities = {_norm(p) for p in example["bias"] if _occurs(p, text)}
    assert entities <= set(positives)  # entity_probability 1: every entity of the own list
    ngrams = set(positives) - entities
    assert 1 <= len(positives) and len(ngrams) <= 2 and all(len(p.split()) <= 3 for p in ngrams)
    ngram_lengths |= {len(p.split()) for p in ngrams}
    available = {p for p in earlier if not _occurs(p, text)}
    assert set(distractors) <= available and len(distractors) == min(4, len(available))
    earlier |= set(positives)
  assert ngram_lengths == {1, 2, 3}
  assert not any(p in earlier for p in ABSENT)  # the own list's other phrases are dropped


def test_distractors_come_only_from_the_latest_buffer_size_positives():
  examples = _corpus(50, seed=2)
  buffer_size = 3
  sampler = TrainingBiasLists(ngram_probability=1.0, max_ngrams=2, entity_probability=1.0, num_distractors=10,
                              buffer_size=buffer_size, seed=2)
  history = []  # positives of each earlier output
  for example, (bias, _) in zip(examples, _lists(sampler, examples)):
    positives, distractors = _split(bias, example["text"])
    # Earlier examples at least partly within the last buffer_size positives written.
    allowed, newer = set(), 0
    for earlier in reversed(history):
      if newer >= buffer_size:
        break
      allowed |= set(earlier)
      newer += len(earlier)
    assert set(distractors) <= allowed and len(distractors) <= buffer_size
    history.append(positives)
  assert sum(len(_split(b, e["text"])[1]) for e, (b, _) in zip(examples, _lists(sampler, examples))) > 0


def test_lists_fit_max_phrases_dropping_distractors_then_ngrams_never_entities():
  examples = _corpus(40, seed=3, entities=(0, 2))
  max_phrases = 3
  sampler = TrainingBiasLists(ngram_probability=1.0, max_ngrams=4, entity_probability=1.0, num_distractors=10,
                              buffer_size=10_000, seed=3)
  earlier = set()
  for example, (bias, _) in zip(examples, _lists(sampler, examples, max_phrases)):
    text = example["text"]
    positives, distractors = _split(bias, text)
    entities = {_norm(p) for p in example["bias"] if _occurs(p, text)}
    assert entities <= set(positives) and len(bias) <= max_phrases
    assert len(positives) <= max(max_phrases, len(entities))
    available = {p for p in earlier if not _occurs(p, text)}
    assert len(distractors) == min(10, max_phrases - len(positives), len(available))
    earlier |= set(positives)
  # More entities than max_phrases: all kept (the batch then refuses the utterance, naming it).
  crowded = [{"text": "call the music by zan on some home", "id": "x",
              "bias": ["call", "the music", "by zan", "on some", "home"]}]
  ((bias, _),) = _lists(sampler, crowded, max_phrases=2)
  assert sorted(bias) == sorted(crowded[0]["bias"])


def test_keep_probabilities():
  examples = _corpus(80, seed=4)
  none = TrainingBiasLists(ngram_probability=0.0, entity_probability=0.0, num_distractors=5, seed=4)
  assert all(bias == [] and tokens == [] for bias, tokens in _lists(none, examples))  # nothing to draw from
  entities_only = TrainingBiasLists(ngram_probability=0.0, entity_probability=1.0, num_distractors=0, seed=4)
  for example, (bias, _) in zip(examples, _lists(entities_only, examples)):
    assert set(bias) == {_norm(p) for p in example["bias"] if _occurs(p, example["text"])}
  half = TrainingBiasLists(ngram_probability=0.0, entity_probability=0.5, num_distractors=0, seed=4)
  kept = total = 0
  for example, (bias, _) in zip(examples, _lists(half, examples)):
    entities = [_norm(p) for p in example["bias"] if _occurs(p, example["text"])]
    total += len(entities)
    kept += sum(p in bias for p in entities)
  assert 0.35 < kept / total < 0.65
  ngrams = TrainingBiasLists(ngram_probability=0.5, max_ngrams=4, entity_probability=0.0, num_distractors=0, seed=4)
  counts = [len(bias) for bias, _ in _lists(ngrams, _corpus(80, seed=5, words=(10, 14)))]
  assert 1.5 < np.mean(counts) < 2.5 and max(counts) <= 4


def test_a_task_without_bias_lists_gets_ngram_lists():
  examples = _corpus(20, seed=6, with_bias=False)
  sampler = TrainingBiasLists(ngram_probability=1.0, max_ngrams=2, num_distractors=3, seed=6)
  lists = _lists(sampler, examples)
  for example, (bias, tokens) in zip(examples, lists):
    positives, _ = _split(bias, example["text"])
    assert 1 <= len(positives) <= 2 and tokens == [VOCAB.encode(p) for p in bias]
  assert sum(len(_split(b, e["text"])[1]) for e, (b, _) in zip(examples, lists)) > 0


def test_deterministic_given_the_seed():
  examples = _corpus(30, seed=7)
  lists = lambda seed: [b for b, _ in _lists(TrainingBiasLists(seed=seed), examples)]  # noqa: E731
  first = lists(0)
  assert first == lists(0)
  assert first != lists(1)
  # The order is shuffled: positives are not always first.
  assert any(_split(b, e["text"])[0] != b[:len(_split(b, e["text"])[0])] for e, b in zip(examples, first))


def test_an_iterator_checkpoint_resumes_the_lists(tmp_path):
  examples = _corpus(25, seed=8)
  dataset = TrainingBiasLists(buffer_size=16, seed=8)(_dataset(examples).repeat(), VOCAB, 32)
  as_list = lambda e: [p.decode() for p in e["bias"].numpy()]  # noqa: E731
  iterator = iter(dataset)
  for _ in range(30):  # past the first epoch: the buffer is full and the counter past the data
    next(iterator)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  path = checkpoint.write(str(tmp_path / "data"))
  expected = [as_list(next(iterator)) for _ in range(12)]
  resumed = iter(dataset)
  tf.train.Checkpoint(iterator=resumed).read(path).assert_consumed()
  assert [as_list(next(resumed)) for _ in range(12)] == expected
  # The saved state matters: the same examples without it (empty buffer, counter 0) get other lists.
  stateless = iter(TrainingBiasLists(buffer_size=16, seed=8)(_dataset(examples).repeat().skip(30), VOCAB, 32))
  assert [as_list(next(stateless)) for _ in range(12)] != expected


@pytest.mark.parametrize("field, value, message", [
    ("ngram_probability", -0.1, "ngram_probability must be a probability in \\[0, 1\\], got -0.1"),
    ("entity_probability", 1.5, "entity_probability must be a probability in \\[0, 1\\], got 1.5"),
    ("entity_probability", True, "entity_probability must be a probability in \\[0, 1\\], got True"),
    ("max_ngrams", -1, "max_ngrams must be an integer >= 0, got -1"),
    ("max_ngram_words", 0, "max_ngram_words must be an integer >= 1, got 0"),
    ("num_distractors", -2, "num_distractors must be an integer >= 0, got -2"),
    ("num_distractors", 2.5, "num_distractors must be an integer >= 0, got 2.5"),
    ("buffer_size", 0, "buffer_size must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused_naming_the_value(field, value, message):
  with pytest.raises(ValueError, match=f"TrainingBiasLists.{message}"):
    TrainingBiasLists(**{field: value})


def test_bad_streams_are_refused():
  with pytest.raises(ValueError, match="needs examples with a 'text' feature"):
    TrainingBiasLists()(tf.data.Dataset.from_tensor_slices({"id": ["a"]}), VOCAB, 4)
  with pytest.raises(ValueError, match="max_phrases.* must be an integer >= 1, got 0"):
    TrainingBiasLists()(_dataset(_corpus(2)), VOCAB, 0)
  with pytest.raises(ValueError, match="'bias' as a string vector"):
    TrainingBiasLists()(tf.data.Dataset.from_tensor_slices({"text": ["a"], "bias": [[1]]}), VOCAB, 4)


def test_word_runs_and_occurrence_against_brute_force():
  words = ["a", "b", "a", "c"]
  runs = [r.decode() for r in bias_sampling.word_runs(tf.constant(words), 2).numpy()]
  assert sorted(runs) == sorted(["a", "b", "a", "c", "a b", "b a", "a c"])
  phrases = tf.constant(["a b", "b c", "a c", "c", "a b a"])
  np.testing.assert_array_equal(bias_sampling.occurs_in(phrases, tf.constant(runs)).numpy(),
                                [True, False, True, True, False])  # "a b a" has 3 words: not among runs of 2


# ----------------------------------------------------------------------------- through speech_dataset


def _register_task(name, examples):
  rng = np.random.default_rng(0)
  audio = [rng.uniform(-0.5, 0.5, int(rng.integers(400, 800))).astype(np.float32) for _ in examples]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({
        "audio": tf.ragged.constant(audio, dtype=tf.float32), "text": [e["text"] for e in examples],
        "id": [e["id"] for e in examples],
        "bias": tf.ragged.constant([e["bias"] for e in examples], dtype=tf.string, ragged_rank=1)})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                         preprocessors=[speech.tokenize_text], output_features=speech.speech_output_features(VOCAB),
                         metric_fns=[])
  return name


def _batch_lists(batch):
  """Per non-padding row: the bias strings and the phrases its bias_tokens spell."""
  rows = []
  for ident, phrases, tokens, paddings in zip(batch["id"], batch["bias"], batch["bias_tokens"],
                                              batch["bias_paddings"]):
    if not ident:
      continue
    strings = [p.decode() for p in phrases if p]
    spelled = [VOCAB.decode(t[p == 0].tolist()) for t, p in zip(tokens, paddings) if (p == 0).any()]
    rows.append((ident.decode(), strings, spelled))
  return rows


def test_speech_dataset_applies_the_sampler_and_its_tokens_spell_the_lists(tmp_path):
  examples = _corpus(12, seed=9)
  name = _register_task("bias_sampling_test", examples)
  sampler = TrainingBiasLists(ngram_probability=1.0, entity_probability=1.0, num_distractors=3, seed=9)
  kwargs = dict(max_phrases=8, max_phrase_length=64, shuffle=False, include_text=True)
  batches = list(speech_features.speech_batches(name, "train", 4, 1000, 64, bias_sampler=sampler, **kwargs))
  rows = [row for batch in batches for row in _batch_lists(batch)]
  expected = [b for b, _ in _lists(sampler, [{"text": e["text"], "id": e["id"], "bias": e["bias"]} for e in examples],
                                   max_phrases=8)]
  assert [strings for _, strings, _ in rows] == expected
  assert all(strings == spelled for _, strings, spelled in rows)
  # Without a sampler the task's own (deduplicated, in order) lists are kept.
  plain = [row for batch in speech_features.speech_batches(name, "train", 4, 1000, 64, **kwargs)
           for row in _batch_lists(batch)]
  assert [strings for _, strings, _ in plain] == [list(dict.fromkeys(e["bias"])) for e in examples]
  # Training's checkpointable iterator resumes the sampled lists.
  make = lambda: pipeline.TfDataIterator(speech_features.speech_dataset(  # noqa: E731
      name, "train", 2, 1000, 64, max_phrases=8, max_phrase_length=64, seed=3, num_epochs=None,
      bias_sampler=sampler))
  iterator = make()
  for _ in range(4):
    next(iterator)
  iterator.save(str(tmp_path / "ckpt"))
  want = [next(iterator)["bias_tokens"] for _ in range(5)]
  resumed = make()
  resumed.restore(str(tmp_path / "ckpt"))
  for tokens in want:
    np.testing.assert_array_equal(next(resumed)["bias_tokens"], tokens)


def test_gin_sets_the_sampler_on_the_training_dataset_config_only():
  examples = _corpus(6, seed=10)
  name = _register_task("bias_sampling_gin", examples)
  gin.parse_config("""
      train/DatasetConfig.bias_sampler = @TrainingBiasLists()
      TrainingBiasLists.num_distractors = 2
      TrainingBiasLists.seed = 5
  """)
  settings = dict(mixture_or_task_name=name, sequence_length=1000, batch_size=2, feature_converter="speech",
                  pack=False, shuffle=False, num_epochs=1, targets_length=64)
  with gin.config_scope("train"):
    train_config = pipeline.DatasetConfig(**settings)
  eval_config = pipeline.DatasetConfig(**settings)
  assert train_config.bias_sampler == TrainingBiasLists(num_distractors=2, seed=5)
  assert eval_config.bias_sampler is None
  train_tokens = [b["bias_tokens"] for b in pipeline.get_dataset(train_config, shard=(0, 1)).as_numpy_iterator()]
  sampled = [b for b, _ in _lists(train_config.bias_sampler, examples)]
  for batch, lists in zip(train_tokens, (sampled[i:i + 2] for i in range(0, 6, 2))):
    for row, phrases in zip(batch, lists):
      assert [VOCAB.decode(t[t > 0].tolist()) for t in row if t.any()] == phrases
  with pytest.raises(ValueError, match="DatasetConfig.bias_sampler is for feature_converter='speech', got 'decoder'"):
    pipeline.get_dataset(pipeline.DatasetConfig(**{**settings, "feature_converter": "decoder", "pack": True},
                                                bias_sampler=TrainingBiasLists()), shard=(0, 1))
