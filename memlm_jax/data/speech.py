"""Speech data for the Transducer: LibriSpeech (tfds) and JSONL-manifest seqio tasks, fixed-shape batches.

Every task yields examples with
  "audio"   float32 [samples]  waveform in [-1, 1] at 16 kHz (variable length);
  "targets" int32 [labels]     token ids of the transcript (no EOS appended);
  "text"    string             the normalized transcript (the reference for WER);
  "id"      string             the utterance id;
and manifest tasks also "bias" string [phrases] (the line's biasing phrases, maybe none).

Transcripts are normalized by `normalize_transcript`: whitespace collapsed and, unless
`lowercase=False`, lower-cased (LibriSpeech is upper case; `scripts/train_spm.py` trains
on the same normalization), so decode(targets) == text.

A manifest is JSONL, one utterance per line:
  {"audio": "audio/0001.wav", "text": "hello there", "id": "0001", "bias": ["zanzibar quimby"]}
`audio` relative to the manifest's directory (or absolute), read with soundfile (wav, flac, ...);
`id` (default: the audio path as written) and `bias` are optional. Audio is never resampled
or downmixed: a file of another rate or with several channels is refused, as are empty audio
and empty transcripts, each with the file (and manifest line) named.

`speech_dataset` / `speech_batches` pad utterances to fixed shapes:
  audio [batch, max_audio_samples] float32, audio_paddings [batch, max_audio_samples] float32
  (1.0 = padded), targets [batch, max_target_length] int32, target_paddings [batch, max_target_length];
an utterance over either limit is an error (or, with filter_long=True, dropped and counted in
the log), never truncated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Mapping, Sequence

import gin
import numpy as np
import seqio
import soundfile
import tensorflow as tf
from absl import logging

from memlm_jax.data.vocabularies import byte_vocabulary

SAMPLE_RATE = 16_000
LIBRISPEECH_SPLITS = ("train_clean100", "train_clean360", "train_other500", "dev_clean", "dev_other", "test_clean",
                      "test_other")
# Task splits beyond the tfds ones: the 960 h training set and the usual eval sets.
LIBRISPEECH_ALIASES = {"train": "train_clean100+train_clean360+train_other500", "validation": "dev_clean",
                       "test": "test_clean"}
_INT16_SCALE = 32768.0


def normalize_transcript(text: str, lowercase: bool = True) -> str:
  """Collapses whitespace (and strips it) and, if `lowercase`, lower-cases."""
  text = " ".join(text.split())
  return text.lower() if lowercase else text


def _normalize_transcript_tf(text: tf.Tensor, lowercase: bool) -> tf.Tensor:
  text = tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))
  return tf.strings.lower(text, encoding="utf-8") if lowercase else text


# ----------------------------------------------------------------------------- audio files


def check_audio_file(path: str, sample_rate: int = SAMPLE_RATE, where: str = "") -> int:
  """Validates an audio file's header (rate, channels, non-empty); returns its number of samples.

  `where` (e.g. "manifest.jsonl line 3") is added to the error messages.
  """
  context = f" ({where})" if where else ""
  if not os.path.isfile(path):
    raise ValueError(f"audio file {path!r}{context} does not exist.")
  try:
    info = soundfile.info(path)
  except RuntimeError as error:  # soundfile's error for unreadable / unknown formats
    raise ValueError(f"audio file {path!r}{context} cannot be read by soundfile: {error}") from error
  if info.samplerate != sample_rate:
    raise ValueError(f"audio file {path!r}{context} has sample rate {info.samplerate} Hz, expected {sample_rate} Hz; "
                     f"resample it first (audio is never resampled when read).")
  if info.channels != 1:
    raise ValueError(f"audio file {path!r}{context} has {info.channels} channels, expected mono (1 channel); "
                     f"downmix it first.")
  if info.frames <= 0:
    raise ValueError(f"audio file {path!r}{context} is empty (0 samples).")
  return int(info.frames)


def read_audio(path: str, sample_rate: int = SAMPLE_RATE, where: str = "") -> np.ndarray:
  """A mono file's waveform, float32 [samples] in [-1, 1]; refuses other rates, channels, empty audio."""
  check_audio_file(path, sample_rate, where)
  audio, _ = soundfile.read(path, dtype="float32", always_2d=False)
  if audio.size and float(np.max(np.abs(audio))) > 1.0:  # only float-encoded files can exceed full scale
    context = f" ({where})" if where else ""
    raise ValueError(f"audio file {path!r}{context} has samples outside [-1, 1] (peak {np.max(np.abs(audio)):.3f}).")
  return audio


# ----------------------------------------------------------------------------- manifests


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  """One manifest line: the audio path (resolved), normalized text, id, bias phrases, 1-based line number."""
  audio_path: str
  text: str
  id: str
  bias: tuple[str, ...]
  line: int


@dataclasses.dataclass(frozen=True)
class Utterance:
  """audio float32 [samples] in [-1, 1]; text normalized as by the tasks; bias phrases (maybe empty)."""
  audio: np.ndarray
  text: str
  id: str
  bias: tuple[str, ...]


def _string_field(record: dict, key: str, where: str) -> str:
  value = record[key]
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {key!r} must be a string, got {value!r}.")
  return value


def parse_manifest(path: str, lowercase: bool = True) -> list[ManifestEntry]:
  """The manifest's lines (without reading audio). Errors name the manifest and line."""
  if not os.path.isfile(path):
    raise ValueError(f"manifest {path!r} does not exist.")
  base = os.path.dirname(os.path.abspath(path))
  entries, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      where = f"manifest {path!r} line {number}"
      try:
        record = json.loads(raw)
      except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}.") from error
      if not isinstance(record, dict) or "audio" not in record or "text" not in record:
        raise ValueError(f"{where}: expected an object with 'audio' and 'text' fields, got {raw.strip()[:200]!r}.")
      audio = _string_field(record, "audio", where)
      text = normalize_transcript(_string_field(record, "text", where), lowercase)
      if not text:
        raise ValueError(f"{where}: empty transcript for audio file {audio!r}.")
      ident = _string_field(record, "id", where) if "id" in record else audio
      if ident in seen:
        raise ValueError(f"{where}: id {ident!r} already used on line {seen[ident]}.")
      seen[ident] = number
      bias = record.get("bias", [])
      if not isinstance(bias, list) or not all(isinstance(p, str) and p.strip() for p in bias):
        raise ValueError(f"{where}: 'bias' must be a list of non-empty strings, got {bias!r}.")
      entries.append(ManifestEntry(os.path.join(base, audio), text, ident,
                                   tuple(normalize_transcript(p, lowercase) for p in bias), number))
  if not entries:
    raise ValueError(f"manifest {path!r} has no utterances.")
  return entries


def read_manifest(path: str, sample_rate: int = SAMPLE_RATE, lowercase: bool = True) -> list[Utterance]:
  """Every utterance of a manifest with its audio, in file order (for evaluation code)."""
  return [Utterance(read_audio(e.audio_path, sample_rate, f"manifest {path!r} line {e.line}"), e.text, e.id, e.bias)
          for e in parse_manifest(path, lowercase)]


# ----------------------------------------------------------------------------- seqio pieces


def speech_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """"audio" (float32 waveform) and "targets" (token ids, no EOS)."""
  return {"audio": seqio.ContinuousFeature(dtype=tf.float32, rank=1),
          "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)}


def tokenize_transcript(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Adds "targets": the "text" encoded with the targets vocabulary (no EOS)."""
  vocabulary = output_features["targets"].vocabulary

  def tokenize(example):
    return {**example, "targets": tf.cast(vocabulary.encode_tf(example["text"]), tf.int32)}

  return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def librispeech_to_speech(dataset: tf.data.Dataset, lowercase: bool = True) -> tf.data.Dataset:
  """tfds LibriSpeech {"speech": int16 [samples], "text", "id", ...} -> {"audio", "text", "id"}."""

  def convert(example):
    return {"audio": tf.cast(example["speech"], tf.float32) / _INT16_SCALE,
            "text": _normalize_transcript_tf(example["text"], lowercase),
            "id": example["id"]}

  return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _register(name: str, source: seqio.DataSource, preprocessors: list, vocabulary: seqio.Vocabulary,
              shuffle_buffer_size: int | None) -> str:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=speech_output_features(vocabulary), metric_fns=[],
                         shuffle_buffer_size=shuffle_buffer_size)
  return name


@gin.configurable
def librispeech_task(name: str = "librispeech", vocabulary: seqio.Vocabulary | None = None,
                     tfds_name: str = "librispeech:2.1.1", tfds_data_dir: str | None = None, lowercase: bool = True,
                     shuffle_buffer_size: int = 1000) -> str:
  """Registers (or re-registers) LibriSpeech from tfds; returns the task name.

  Splits: the tfds ones (LIBRISPEECH_SPLITS) plus 'train' (all 960 h), 'validation' (dev_clean)
  and 'test' (test_clean). Needs the tfds dataset prepared in `tfds_data_dir` (its default
  config, 2.1.1: decoded int16 "speech"); nothing is read or downloaded until a split is
  iterated. vocabulary defaults to the byte vocabulary. Training shuffles the files, then
  utterances in a buffer of `shuffle_buffer_size` decoded utterances, which the iterator
  checkpoint saves (about 1 GB at 1000 utterances of 15 s).
  """
  splits = {split: split for split in LIBRISPEECH_SPLITS} | LIBRISPEECH_ALIASES
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits)
  preprocessors = [lambda ds: librispeech_to_speech(ds, lowercase), tokenize_transcript]
  return _register(name, source, preprocessors, vocabulary or byte_vocabulary(), shuffle_buffer_size)


class ManifestDataSource(seqio.DataSource):
  """Utterances listed in JSONL manifests, one per split; audio read with soundfile.

  Yields {"audio" float32 [samples], "text", "id", "bias" string [phrases]}. With shuffle, the
  entries' indices are shuffled (by `seed`, anew each epoch) before any audio is read, so no
  buffer of audio is needed (or saved in iterator checkpoints); sharding then takes every
  num_shards-th index, so each host reads only its own files.
  """

  def __init__(self, entries: Mapping[str, Sequence[ManifestEntry]], sample_rate: int = SAMPLE_RATE):
    # num_input_examples None: seqio never caches the audio of a "small" split in memory.
    super().__init__(splits=tuple(entries), num_input_examples=None, performs_internal_shuffling=True)
    self._entries = {split: list(split_entries) for split, split_entries in entries.items()}
    self._sample_rate = sample_rate

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None, use_cached: bool = False,
                  num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # seqio repeats after the source
    if split not in self._entries:
      raise ValueError(f"split {split!r} is not in the manifest task (it has {list(self._entries)}).")
    entries = self._entries[split]
    paths = tf.constant([e.audio_path for e in entries])
    texts = tf.constant([e.text for e in entries])
    ids = tf.constant([e.id for e in entries])
    biases = tf.ragged.constant([list(e.bias) for e in entries], dtype=tf.string, ragged_rank=1)
    indices = tf.data.Dataset.range(len(entries))
    if shuffle:
      indices = indices.shuffle(len(entries), seed=seed, reshuffle_each_iteration=True)
    if shard_info is not None and shard_info.num_shards > 1:
      indices = indices.shard(shard_info.num_shards, shard_info.index)
    sample_rate = self._sample_rate

    def load(index):
      audio = tf.numpy_function(lambda path: read_audio(path.decode(), sample_rate), [paths[index]], tf.float32,
                                stateful=False)
      return {"audio": tf.ensure_shape(audio, [None]), "text": texts[index], "id": ids[index],
              "bias": biases[index]}

    # Reading is a pure function of the path, so the iterator checkpoint may ignore it.
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).with_options(options)


@gin.configurable
def manifest_task(name: str = gin.REQUIRED, manifest: str | Mapping[str, str] = gin.REQUIRED,
                  vocabulary: seqio.Vocabulary | None = None, sample_rate: int = SAMPLE_RATE,
                  lowercase: bool = True, check_audio: bool = True) -> str:
  """Registers (or re-registers) a seqio speech task over JSONL manifests; returns its name.

  Args:
    name: task name.
    manifest: {split: manifest path}, e.g. {'train': 'd/train.jsonl', 'validation': 'd/dev.jsonl'},
      or one path, registered as split 'train'.
    vocabulary: for "targets"; defaults to the byte vocabulary.
    sample_rate: the rate every audio file must have (Hz).
    lowercase: lower-case transcripts and bias phrases (see `normalize_transcript`).
    check_audio: validate every file's header (rate, channels, non-empty) now, so a bad file
      fails at registration naming its manifest line, not midway through training.
  """
  manifests = {"train": manifest} if isinstance(manifest, str) else dict(manifest)
  if not manifests:
    raise ValueError(f"manifest_task '{name}': no manifests given.")
  entries = {split: parse_manifest(path, lowercase) for split, path in manifests.items()}
  if check_audio:
    for split, split_entries in entries.items():
      for e in split_entries:
        check_audio_file(e.audio_path, sample_rate, f"manifest {manifests[split]!r} line {e.line}")
  source = ManifestDataSource(entries, sample_rate)
  # The source shuffles (all of each epoch); seqio adds no buffer of audio.
  return _register(name, source, [tokenize_transcript], vocabulary or byte_vocabulary(), shuffle_buffer_size=None)


# ----------------------------------------------------------------------------- batching


def _utterance_id(example: Mapping[str, tf.Tensor]) -> tf.Tensor:
  return example["id"] if "id" in example else tf.constant("(no id)")


def _lengths(example: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
  return tf.shape(example["audio"])[0], tf.shape(example["targets"])[0]


def _refuse_long(dataset: tf.data.Dataset, max_audio_samples: int, max_target_length: int) -> tf.data.Dataset:
  def check(example):
    n_audio, n_targets = _lengths(example)
    fits = tf.logical_and(n_audio <= max_audio_samples, n_targets <= max_target_length)
    message = tf.strings.join([
        "utterance ", _utterance_id(example), " is longer than the batch allows: ", tf.strings.as_string(n_audio),
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
        log_drop, [_utterance_id(example), n_audio, n_targets, dropped + 1], tf.int64), []))
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


_TEXT_FEATURES = ("text", "id", "bias")


def batch_speech(examples: tf.data.Dataset, batch_size: int, max_audio_samples: int, max_target_length: int, *,
                 drop_remainder: bool = False, filter_long: bool = False,
                 include_text: bool = False) -> tf.data.Dataset:
  """Pads examples {"audio" [samples], "targets" [labels], ...} into fixed-shape batches.

  Returns batches {audio [batch_size, max_audio_samples] float32, audio_paddings (same shape,
  float32, 1.0 = padded), targets [batch_size, max_target_length] int32, target_paddings
  [batch_size, max_target_length] float32} (+ with include_text the string features "text"
  [batch_size], "id" [batch_size] and "bias" [batch_size, phrases] ("" pads), those the task has). A
  short last batch (drop_remainder=False) is filled with all-padding rows. Utterances over a
  limit raise an error when reached, or are dropped and logged if filter_long.
  """
  for flag, value in (("batch_size", batch_size), ("max_audio_samples", max_audio_samples),
                      ("max_target_length", max_target_length)):
    if value <= 0:
      raise ValueError(f"{flag} must be positive, got {value}.")
  spec = examples.element_spec
  for key, dtype in (("audio", tf.float32), ("targets", tf.int32)):
    if key not in spec or spec[key].dtype != dtype or spec[key].shape.rank != 1:
      raise ValueError(f"batch_speech needs feature {key!r} as a rank-1 {dtype.name} tensor, got "
                       f"{spec.get(key)!r}.")
  if include_text and "text" not in spec:
    raise ValueError("batch_speech(include_text=True) needs a 'text' feature.")
  limit = _drop_long if filter_long else _refuse_long
  examples = limit(examples, max_audio_samples, max_target_length)

  def with_paddings(example):
    features = {"audio": example["audio"], "audio_paddings": tf.zeros_like(example["audio"]),
                "targets": example["targets"], "target_paddings": tf.zeros(tf.shape(example["targets"]), tf.float32)}
    if include_text:
      features.update({k: example[k] for k in _TEXT_FEATURES if k in spec})
    return features

  shapes = {"audio": [max_audio_samples], "audio_paddings": [max_audio_samples], "targets": [max_target_length],
            "target_paddings": [max_target_length]}
  values = {"audio": tf.constant(0.0), "audio_paddings": tf.constant(1.0), "targets": tf.constant(0),
            "target_paddings": tf.constant(1.0)}
  if include_text:
    shapes.update({k: [None] * spec[k].shape.rank for k in _TEXT_FEATURES if k in spec})
    values.update({k: tf.constant("") for k in _TEXT_FEATURES if k in spec})
  batches = examples.map(with_paddings, num_parallel_calls=tf.data.AUTOTUNE).padded_batch(
      batch_size, padded_shapes=shapes, padding_values=values, drop_remainder=drop_remainder)
  if drop_remainder:
    return batches

  def fill_batch(batch):  # all-padding rows up to batch_size, so every batch has the same shape
    missing = batch_size - tf.shape(batch["audio"])[0]
    return {k: tf.ensure_shape(tf.concat([v, tf.fill(tf.concat([[missing], tf.shape(v)[1:]], 0), values[k])], 0),
                               [batch_size, *shapes[k]]) for k, v in batch.items()}

  return batches.map(fill_batch)


@gin.configurable
def speech_dataset(task_name: str = gin.REQUIRED, split: str = "train", batch_size: int = gin.REQUIRED,
                   max_audio_samples: int = gin.REQUIRED, max_target_length: int = gin.REQUIRED, *,
                   shuffle: bool = True, seed: int = 0, num_epochs: int | None = 1, drop_remainder: bool = False,
                   filter_long: bool = False, include_text: bool = False,
                   shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
  """Fixed-shape batches (see `batch_speech`) of a registered speech task's split.

  Deterministic given the seed (seqio shuffles with it, tf.data runs deterministically), and
  checkpointable with lm_dataset.TfDataIterator. batch_size is per host (this shard's rows).
  """
  try:
    task = seqio.get_mixture_or_task(task_name)
  except ValueError as error:
    raise ValueError(f"speech_dataset: {task_name!r} is not a registered seqio task.") from error
  if split not in task.splits:
    raise ValueError(f"split {split!r} is not in task {task_name!r} (it has {list(task.splits)}).")
  examples = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                              shard_info=shard_info, trim_output_features=False)
  batches = batch_speech(examples, batch_size, max_audio_samples, max_target_length, drop_remainder=drop_remainder,
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
  """`speech_dataset(...)` as numpy batches; a refused utterance or bad file raises ValueError."""
  iterator = iter(speech_dataset(task_name, split, batch_size, max_audio_samples, max_target_length, **kwargs))
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
      raise ValueError(_plain_message(error)) from None
    yield {k: v.numpy() for k, v in batch.items()}
