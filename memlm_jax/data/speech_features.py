"""Fixed-shape speech batches: the one data path of transducer training and evaluation.

A speech task's examples (data/speech.py: "audio" float32 [samples], "targets" int32 [labels],
and where the task has them "bias" string [phrases] with "bias_tokens" int32 ragged [phrases,
None], "text", "id") become batches of
  audio            [batch, max_audio_samples] float32                waveform, 0 where padded
  audio_paddings   [batch, max_audio_samples] float32                1.0 = padded
  targets          [batch, max_target_length] int32                  0 where padded
  target_paddings  [batch, max_target_length] float32                1.0 = padded
  bias_tokens      [batch, max_phrases, max_phrase_length] int32     each utterance's phrases, 0 where padded
  bias_paddings    [batch, max_phrases, max_phrase_length] float32   1.0 = padded (a padded row: no phrase)
and, with include_text (evaluation), the strings the task has: "text" [batch], "id" [batch] and
"bias" [batch, max_phrases] ("" pads; bias[u, b] is the phrase spelled by bias_tokens[u, b]).
A task without bias lists gets empty ones. Training (pipeline.get_dataset with
feature_converter 'speech') and evaluation (launch/asr_lib.py) both read `speech_dataset`.

An utterance over max_audio_samples or max_target_length is an error (or, with
filter_long=True, dropped and counted in the log); more than max_phrases phrases or a phrase
over max_phrase_length tokens is always an error. Nothing is ever truncated.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf
from absl import logging

TEXT_FEATURES = ("text", "id", "bias")
# (examples, the task's targets vocabulary, max_phrases) -> examples with new "bias" / "bias_tokens",
# e.g. bias_sampling.TrainingBiasLists.
BiasSampler = Callable[[tf.data.Dataset, seqio.Vocabulary, int], tf.data.Dataset]
# Value of every feature in padding (and in the all-padding rows that fill a short last batch).
_PADDING_VALUES = {"audio": 0.0, "audio_paddings": 1.0, "targets": 0, "target_paddings": 1.0, "bias_tokens": 0,
                   "bias_paddings": 1.0, "text": "", "id": "", "bias": ""}


def utterance_id(example: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """The example's "id" (string scalar), or "(no id)", for error messages."""
  return example["id"] if "id" in example else tf.constant("(no id)")


def _lengths(example: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
  return tf.shape(example["audio"])[0], tf.shape(example["targets"])[0]


def _refuse_long(dataset: tf.data.Dataset, max_audio_samples: int, max_target_length: int) -> tf.data.Dataset:
  def check(example):
    n_audio, n_targets = _lengths(example)
    fits = tf.logical_and(n_audio <= max_audio_samples, n_targets <= max_target_length)
    message = tf.strings.join([
        "utterance ", utterance_id(example), " is longer than the batch allows: ", tf.strings.as_string(n_audio),
        f" audio samples (max_audio_samples={max_audio_samples}), ", tf.strings.as_string(n_targets),
        f" target tokens (max_target_length={max_target_length}); raise the limits or set filter_long=True "
        "to drop such utterances (they are never truncated)."])
    with tf.control_dependencies([tf.debugging.Assert(fits, [message])]):
      return {k: tf.identity(v) for k, v in example.items()}

  return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)


def _drop_long(dataset: tf.data.Dataset, max_audio_samples: int, max_target_length: int) -> tf.data.Dataset:
  """Drops utterances over the limits, logging each with the running count (the count is
  part of the iterator state, so it survives checkpoints)."""

  def log_drop(ident, n_audio, n_targets, dropped):
    logging.warning("speech batches: dropped utterance %s (%d audio samples, %d target tokens; limits "
                    "max_audio_samples=%d, max_target_length=%d); %d dropped so far.", ident.decode(), n_audio,
                    n_targets, max_audio_samples, max_target_length, dropped)
    return dropped

  def count(dropped, example):
    n_audio, n_targets = _lengths(example)
    fits = tf.logical_and(n_audio <= max_audio_samples, n_targets <= max_target_length)
    dropped = tf.cond(fits, lambda: dropped, lambda: tf.ensure_shape(tf.numpy_function(
        log_drop, [utterance_id(example), n_audio, n_targets, dropped + 1], tf.int64), []))
    return dropped, (example, fits)

  def keep(example, fits):
    del example
    return fits

  def unpair(example, fits):
    del fits
    return example

  options = tf.data.Options()  # the logging callback is no state a checkpoint must keep
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return dataset.scan(tf.constant(0, tf.int64), count).filter(keep).map(unpair).with_options(options)


def _pad_with_paddings(values: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
  """values [n] (n <= length, checked before) -> (values zero-padded to [length], paddings [length]
  float32, 1.0 past n)."""
  n = tf.shape(values)[0]
  paddings = 1.0 - tf.sequence_mask(n, length, dtype=tf.float32)
  return tf.pad(values, [[0, length - n]]), paddings


def _phrase_arrays(example: Mapping[str, tf.Tensor], max_phrases: int, max_phrase_length: int
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """(bias_tokens [max_phrases, max_phrase_length] int32, bias_paddings float32 of that shape);
  an utterance with more phrases, or a phrase with more tokens, fails naming both."""
  if "bias_tokens" not in example:
    return (tf.zeros([max_phrases, max_phrase_length], tf.int32),
            tf.ones([max_phrases, max_phrase_length], tf.float32))
  phrases = example["bias_tokens"]
  lengths = tf.cast(phrases.row_lengths(), tf.int32)
  count = tf.shape(lengths)[0]
  longest = tf.argmax(tf.concat([lengths, [0]], 0), output_type=tf.int32)
  too_many = tf.strings.join([
      "utterance ", utterance_id(example), " has ", tf.strings.as_string(count), f" bias phrases, more than "
      f"max_phrases={max_phrases}; raise speech_dataset.max_phrases (phrases are never dropped)."])
  too_long = tf.strings.join([
      "utterance ", utterance_id(example), ": bias phrase '", tf.gather(tf.concat([example["bias"], [""]], 0), longest),
      "' has ", tf.strings.as_string(tf.reduce_max(tf.concat([lengths, [0]], 0))), f" tokens, more than "
      f"max_phrase_length={max_phrase_length}; raise speech_dataset.max_phrase_length (phrases are never truncated)."])
  checks = [tf.debugging.Assert(count <= max_phrases, [too_many]),
            tf.debugging.Assert(tf.reduce_all(lengths <= max_phrase_length), [too_long])]
  with tf.control_dependencies(checks):
    tokens = phrases.to_tensor(default_value=0, shape=[max_phrases, max_phrase_length])
    lengths = tf.pad(lengths, [[0, max_phrases - count]])
  paddings = 1.0 - tf.sequence_mask(lengths, max_phrase_length, dtype=tf.float32)
  return tokens, paddings


def _example_features(example: Mapping[str, tf.Tensor], max_audio_samples: int, max_target_length: int,
                      max_phrases: int, max_phrase_length: int, text_features: tuple[str, ...]) -> dict:
  """One utterance's fixed-shape features (the rows of the batches in the module docstring)."""
  audio, audio_paddings = _pad_with_paddings(example["audio"], max_audio_samples)
  targets, target_paddings = _pad_with_paddings(example["targets"], max_target_length)
  bias_tokens, bias_paddings = _phrase_arrays(example, max_phrases, max_phrase_length)
  features = {"audio": audio, "audio_paddings": audio_paddings, "targets": targets,
              "target_paddings": target_paddings, "bias_tokens": bias_tokens, "bias_paddings": bias_paddings}
  for key in text_features:
    value = example[key]
    features[key] = tf.pad(value, [[0, max_phrases - tf.shape(value)[0]]]) if key == "bias" else value
  return features


def batch_speech(examples: tf.data.Dataset, batch_size: int, max_audio_samples: int, max_target_length: int, *,
                 max_phrases: int = 32, max_phrase_length: int = 32, drop_remainder: bool = False,
                 filter_long: bool = False, include_text: bool = False) -> tf.data.Dataset:
  """Fixed-shape batches (module docstring) of a speech task's examples.

  A short last batch (drop_remainder=False) is filled with all-padding rows. Utterances over a
  length limit raise an error when reached, or are dropped and logged if filter_long.
  """
  for flag, value in (("batch_size", batch_size), ("max_audio_samples", max_audio_samples),
                      ("max_target_length", max_target_length), ("max_phrases", max_phrases),
                      ("max_phrase_length", max_phrase_length)):
    if value <= 0:
      raise ValueError(f"{flag} must be positive, got {value}.")
  spec = examples.element_spec
  for key, dtype in (("audio", tf.float32), ("targets", tf.int32)):
    if key not in spec or spec[key].dtype != dtype or spec[key].shape.rank != 1:
      raise ValueError(f"batch_speech needs feature {key!r} as a rank-1 {dtype.name} tensor, got "
                       f"{spec.get(key)!r}.")
  if "bias_tokens" in spec and "bias" not in spec:
    raise ValueError("batch_speech: the examples have 'bias_tokens' without the 'bias' phrases they spell.")
  if include_text and "text" not in spec:
    raise ValueError("batch_speech(include_text=True) needs a 'text' feature.")
  limit = _drop_long if filter_long else _refuse_long
  text_features = tuple(k for k in TEXT_FEATURES if k in spec) if include_text else ()

  def features(example):
    return _example_features(example, max_audio_samples, max_target_length, max_phrases, max_phrase_length,
                             text_features)

  batches = limit(examples, max_audio_samples, max_target_length).map(
      features, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=drop_remainder)
  if drop_remainder:
    return batches

  def fill_batch(batch):  # all-padding rows up to batch_size, so every batch has the same shape
    missing = batch_size - tf.shape(batch["audio"])[0]
    filler = {k: tf.fill(tf.concat([[missing], tf.shape(v)[1:]], 0), tf.constant(_PADDING_VALUES[k], v.dtype))
              for k, v in batch.items()}
    return {k: tf.ensure_shape(tf.concat([v, filler[k]], 0), [batch_size, *v.shape[1:]]) for k, v in batch.items()}

  return batches.map(fill_batch)


@gin.configurable
def speech_dataset(task_name: str = gin.REQUIRED, split: str = "train", batch_size: int = gin.REQUIRED,
                   max_audio_samples: int = gin.REQUIRED, max_target_length: int = gin.REQUIRED, *,
                   max_phrases: int = 32, max_phrase_length: int = 32, shuffle: bool = True, seed: int = 0,
                   num_epochs: int | None = 1, drop_remainder: bool = False, filter_long: bool = False,
                   include_text: bool = False, shard_info: seqio.ShardInfo | None = None,
                   bias_sampler: BiasSampler | None = None) -> tf.data.Dataset:
  """Fixed-shape batches (see `batch_speech`) of a registered speech task's split.

  Deterministic given the seed (seqio shuffles with it, tf.data runs deterministically), and
  checkpointable with pipeline.TfDataIterator. batch_size is per host (this shard's rows).
  max_phrases / max_phrase_length fix the shape of the bias phrases (gin:
  `speech_dataset.max_phrases`), the same for training and evaluation. bias_sampler, if given,
  replaces each example's bias list before batching (training: `train/DatasetConfig.bias_sampler
  = @TrainingBiasLists()`, data/bias_sampling.py); without one the task's own lists are kept.
  """
  try:
    task = seqio.get_mixture_or_task(task_name)
  except ValueError as error:
    raise ValueError(f"speech_dataset: {task_name!r} is not a registered seqio task.") from error
  if split not in task.splits:
    raise ValueError(f"split {split!r} is not in task {task_name!r} (it has {list(task.splits)}).")
  examples = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                              shard_info=shard_info, trim_output_features=False)
  if bias_sampler is not None:
    examples = bias_sampler(examples, task.output_features["targets"].vocabulary, max_phrases)
  batches = batch_speech(examples, batch_size, max_audio_samples, max_target_length, max_phrases=max_phrases,
                         max_phrase_length=max_phrase_length, drop_remainder=drop_remainder,
                         filter_long=filter_long, include_text=include_text)
  options = tf.data.Options()
  options.deterministic = True
  return batches.with_options(options)


def _plain_message(error: tf.errors.OpError) -> str:
  """The message of our assertion or of a Python ValueError inside tf.data, without TF's wrapping."""
  found = re.search(r"assertion failed: \[(.*?)\]\s*\n", error.message + "\n", re.S)
  if found:
    return found.group(1).replace("\\'", "'")
  found = re.search(r"ValueError: (.*?)(\n|$)", error.message)
  return found.group(1) if found else error.message


def speech_batches(task_name: str, split: str, batch_size: int, max_audio_samples: int, max_target_length: int,
                   **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """`speech_dataset(...)` as numpy batches; a refused utterance, phrase or bad file raises ValueError."""
  iterator = iter(speech_dataset(task_name, split, batch_size, max_audio_samples, max_target_length, **kwargs))
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
      raise ValueError(_plain_message(error)) from None
    yield {k: v.numpy() for k, v in batch.items()}
