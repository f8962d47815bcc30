"""CLAS-style bias lists for training (Pundak et al. 2018): each utterance's list drawn anew from its
own transcript, with other utterances' phrases as distractors.

`TrainingBiasLists` maps a speech task's stream of examples (data/speech.py: "text" string scalar,
"targets", "audio", and maybe "bias" string [phrases] with "bias_tokens" int32 ragged
[phrases, None]: the manifest's list) to the same stream with "bias" and "bias_tokens" replaced by

  positives    each phrase of the example's own "bias" that occurs in its text as a run of whole
               words (an entity), kept with probability entity_probability; then max_ngrams
               draws of a word n-gram of the text (n uniform in 1..min(max_ngram_words, words),
               its first word uniform), each kept with probability ngram_probability;
               repeats count once;
  distractors  num_distractors phrases drawn uniformly, without repeats, from a buffer of the
               last buffer_size positives of earlier examples, skipping any that occurs in this
               text as a run of whole words;

in a random order. The list holds at most max_phrases (speech_dataset.max_phrases) phrases:
entities are never dropped, n-grams fill the room entities leave (the ones drawn first are
kept), distractors the room positives leave (so with positives + num_distractors > max_phrases
the list has fewer distractors, never fewer positives). Phrases and text are compared word by
word (whitespace-split, so "a  b" matches "a b").

The buffer (string [buffer_size]), the count of phrases written to it, and the example counter
are the state of a `tf.data.Dataset.scan`, so the lists are deterministic given `seed` and the
stream, and a tf.data iterator checkpoint (pipeline.TfDataIterator) resumes them exactly;
randomness is stateless, seeded by (seed, example counter). Applied before batching, in training
only: `train/DatasetConfig.bias_sampler = @TrainingBiasLists()` (data/pipeline.py passes it to
speech_features.speech_dataset); evaluation keeps the manifests' own lists.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import gin
import seqio
import tensorflow as tf


def encode_phrases(phrases: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.RaggedTensor:
  """phrases string [phrases] -> token ids int32 ragged [phrases, None] (no EOS), as data/speech.py
  encodes a manifest's list."""
  return tf.map_fn(lambda phrase: tf.cast(vocabulary.encode_tf(phrase), tf.int32), phrases,
                   fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))


def normalize_phrases(phrases: tf.Tensor) -> tf.Tensor:
  """string [n] -> string [n]: each phrase's words (whitespace-split) joined by single spaces."""
  return tf.strings.reduce_join(tf.strings.split(phrases), axis=-1, separator=" ")


def word_runs(words: tf.Tensor, max_words: tf.Tensor) -> tf.Tensor:
  """words string [W] -> string [R]: every run of 1..max_words consecutive words, joined by spaces
  (R = number of (start, length) pairs with start + length <= W)."""
  count = tf.shape(words, out_type=tf.int64)[0]
  longest = tf.minimum(tf.cast(max_words, tf.int64), count)
  starts, lengths = tf.meshgrid(tf.range(count), tf.range(1, longest + 1), indexing="ij")
  fits = starts + lengths <= count
  starts, lengths = tf.boolean_mask(starts, fits), tf.boolean_mask(lengths, fits)
  return tf.strings.reduce_join(tf.gather(words, tf.ragged.range(starts, starts + lengths)), axis=-1,
                                separator=" ")


def occurs_in(phrases: tf.Tensor, runs: tf.Tensor) -> tf.Tensor:
  """phrases string [n] (normalized), runs string [R] -> bool [n]: phrase i is one of the runs."""
  return tf.reduce_any(tf.equal(phrases[:, None], runs[None, :]), axis=1)


def _most_words(phrases: tf.Tensor) -> tf.Tensor:
  """The most words of any phrase of string [n] (0 if none), int64 scalar."""
  return tf.reduce_max(tf.concat([tf.strings.split(phrases).row_lengths(), [0]], 0))


def _check_probability(name: str, value: float) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    raise ValueError(f"TrainingBiasLists.{name} must be a probability in [0, 1], got {value!r}.")


def _check_count(name: str, value: int, least: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ValueError(f"TrainingBiasLists.{name} must be an integer >= {least}, got {value!r}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainingBiasLists:
  """Replaces each training example's bias list by a CLAS-style one (module docstring).

  ngram_probability: keep probability of each of the max_ngrams drawn n-grams of the text.
  max_ngrams: n-grams drawn per utterance (0: none).
  max_ngram_words: the longest n-gram, in words.
  entity_probability: keep probability of each phrase of the example's own list found in its text.
  num_distractors: phrases of earlier examples added (fewer while the buffer holds fewer, or when
    the list would exceed max_phrases).
  buffer_size: how many of the latest positive phrases of earlier examples distractors are drawn from.
  seed: with the example counter, seeds every draw.
  """

  ngram_probability: float = 0.5
  max_ngrams: int = 2
  max_ngram_words: int = 3
  entity_probability: float = 0.8
  num_distractors: int = 10
  buffer_size: int = 256
  seed: int = 0

  def __post_init__(self):
    _check_probability("ngram_probability", self.ngram_probability)
    _check_probability("entity_probability", self.entity_probability)
    _check_count("max_ngrams", self.max_ngrams, 0)
    _check_count("max_ngram_words", self.max_ngram_words, 1)
    _check_count("num_distractors", self.num_distractors, 0)
    _check_count("buffer_size", self.buffer_size, 1)
    _check_count("seed", self.seed, -2**63)

  def __call__(self, examples: tf.data.Dataset, vocabulary: seqio.Vocabulary, max_phrases: int) -> tf.data.Dataset:
    """examples with "bias" string [phrases] and "bias_tokens" int32 ragged [phrases, None] (encoded
    with `vocabulary`) replaced by the sampled lists of at most max_phrases phrases."""
    _check_count("__call__ max_phrases (speech_dataset.max_phrases)", max_phrases, 1)
    spec = examples.element_spec
    if not isinstance(spec, Mapping) or "text" not in spec:
      raise ValueError(f"TrainingBiasLists needs examples with a 'text' feature (the transcript), got "
                       f"{sorted(spec) if isinstance(spec, Mapping) else spec!r}.")
    if spec["text"].dtype != tf.string or spec["text"].shape.rank != 0:
      raise ValueError(f"TrainingBiasLists needs 'text' as a string scalar, got {spec['text']!r}.")
    if "bias" in spec and (spec["bias"].dtype != tf.string or spec["bias"].shape.rank != 1):
      raise ValueError(f"TrainingBiasLists needs 'bias' as a string vector [phrases], got {spec['bias']!r}.")

    initial = (tf.constant(0, tf.int64), tf.fill([self.buffer_size], ""), tf.constant(0, tf.int64))

    def step(state, example):
      counter, buffer, written = state
      bias, positives = self._sample(example, counter, buffer, max_phrases)
      # The buffer keeps the latest buffer_size positives: this example's go in after its own draw.
      newest = positives[-self.buffer_size:]
      slots = (written + tf.range(tf.shape(newest, out_type=tf.int64)[0])) % self.buffer_size
      buffer = tf.tensor_scatter_nd_update(buffer, slots[:, None], newest)
      written += tf.shape(newest, out_type=tf.int64)[0]
      example = {**example, "bias": bias, "bias_tokens": encode_phrases(bias, vocabulary)}
      return (counter + 1, buffer, written), example

    return examples.scan(initial, step)

  def _sample(self, example: Mapping[str, tf.Tensor], counter: tf.Tensor, buffer: tf.Tensor,
              max_phrases: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(this example's list string [<= max_phrases], its positives string [p]) for example number
    `counter`, with distractors from `buffer` string [buffer_size] ("" where empty)."""
    seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(self.seed, tf.int64), counter]), 6)
    uniform = lambda i, n: tf.random.stateless_uniform(tf.reshape(n, [1]), seeds[i])  # noqa: E731
    words = tf.strings.split(example["text"])
    num_words = tf.shape(words, out_type=tf.int64)[0]
    own = normalize_phrases(example["bias"]) if "bias" in example else tf.constant([], tf.string)
    own = tf.boolean_mask(own, tf.strings.length(own) > 0)
    candidates = tf.boolean_mask(buffer, tf.strings.length(buffer) > 0)
    runs = word_runs(words, tf.maximum(tf.maximum(_most_words(own), _most_words(candidates)), self.max_ngram_words))

    # Entities: the own list's phrases found in the text, each kept with entity_probability.
    found = occurs_in(own, runs)
    entities = tf.boolean_mask(own, tf.logical_and(found, uniform(0, tf.size(own)) < self.entity_probability))
    entities = tf.unique(entities).y
    # N-grams: max_ngrams draws of a length and a start, each kept with ngram_probability.
    longest = tf.minimum(num_words, self.max_ngram_words)
    lengths = 1 + tf.cast(uniform(1, self.max_ngrams) * tf.cast(longest, tf.float32), tf.int64)
    lengths = tf.minimum(lengths, tf.maximum(longest, 1))
    starts = tf.cast(uniform(2, self.max_ngrams) * tf.cast(num_words - lengths + 1, tf.float32), tf.int64)
    starts = tf.clip_by_value(starts, 0, tf.maximum(num_words - lengths, 0))
    keep = tf.logical_and(uniform(3, self.max_ngrams) < self.ngram_probability, num_words > 0)
    starts, lengths = tf.boolean_mask(starts, keep), tf.boolean_mask(lengths, keep)
    ngrams = tf.strings.reduce_join(tf.gather(words, tf.ragged.range(starts, starts + lengths)), axis=-1,
                                    separator=" ")
    positives = tf.unique(tf.concat([entities, ngrams], 0)).y  # entities first, each phrase once
    num_entities = tf.shape(entities)[0]
    positives = positives[:tf.maximum(max_phrases, num_entities)]  # n-grams fill the room entities leave

    # Distractors: distinct buffer phrases not in the text, in a random order, up to the room left.
    candidates = tf.unique(candidates).y
    candidates = tf.boolean_mask(candidates, tf.logical_not(occurs_in(candidates, runs)))
    candidates = tf.gather(candidates, tf.argsort(uniform(4, tf.size(candidates))))
    room = tf.maximum(max_phrases - tf.shape(positives)[0], 0)
    distractors = candidates[:tf.minimum(self.num_distractors, room)]

    bias = tf.concat([positives, distractors], 0)
    return tf.gather(bias, tf.argsort(uniform(5, tf.size(bias)))), positives
