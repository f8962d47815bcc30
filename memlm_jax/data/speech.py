"""Speech data for the Transducer: LibriSpeech (tfds) and JSONL-manifest seqio tasks.

Every task yields examples with
  "audio"   float32 [samples]  waveform in [-1, 1] at 16 kHz (variable length);
  "targets" int32 [labels]     token ids of the transcript (no EOS appended);
  "text"    string             the normalized transcript (the reference for WER);
  "id"      string             the utterance id;
and manifest tasks also
  "bias"        string [phrases]             the line's biasing phrases (maybe none), repeats dropped;
  "bias_tokens" int32 ragged [phrases, None] each phrase's token ids (no EOS).

Transcripts are normalized by `normalize_transcript`: whitespace collapsed and, unless
`lowercase=False`, lower-cased (LibriSpeech is upper case; `scripts/train_spm.py` trains
on the same normalization), so decode(targets) == text.

A manifest is JSONL, one utterance per line:
  {"audio": "audio/0001.wav", "text": "hello there", "id": "0001", "bias": ["zanzibar quimby"]}
`audio` relative to the manifest's directory (or absolute), read with soundfile (wav, flac, ...);
`id` (default: the audio path as written) and `bias` are optional. Audio is never resampled
or downmixed: a file of another rate or with several channels is refused, as are empty audio
and empty transcripts, each with the file (and manifest line) named.

Fixed-shape batches of these examples (training and evaluation alike): data/speech_features.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import gin
import numpy as np
import seqio
import soundfile
import tensorflow as tf

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


def _wav_header_frames(path: str) -> int | None:
  """The frame count a WAV file's header declares (its data chunk size / block size), or None
  for other formats and headers that do not say (streamed writes, RF64)."""
  with open(path, "rb") as f:
    riff = f.read(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
      return None
    block_align = 0
    while True:
      header = f.read(8)
      if len(header) < 8:
        return None
      chunk, size = header[:4], int.from_bytes(header[4:], "little")
      if chunk == b"fmt ":
        fmt = f.read(size)
        block_align = int.from_bytes(fmt[12:14], "little")
        f.seek(size % 2, os.SEEK_CUR)
      elif chunk == b"data":
        return size // block_align if block_align and 0 < size < 0xFFFFFFFF else None
      else:
        f.seek(size + size % 2, os.SEEK_CUR)


def check_audio_file(path: str, sample_rate: int = SAMPLE_RATE, where: str = "",
                     max_samples: int | None = None) -> int:
  """Validates an audio file (rate, channels, non-empty, not truncated, float samples within
  [-1, 1], at most `max_samples` long) from its header, reading the samples only of float-encoded
  files; returns its number of samples. `where` (e.g. "manifest.jsonl line 3") is added to the
  error messages.
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
  declared = _wav_header_frames(path)
  if declared is not None and declared > info.frames:
    raise ValueError(f"audio file {path!r}{context} is truncated: its header declares {declared} samples "
                     f"({declared / sample_rate:.2f} s) but the file holds {info.frames}.")
  if max_samples is not None and info.frames > max_samples:
    raise ValueError(f"audio file {path!r}{context} has {info.frames} samples ({info.frames / sample_rate:.1f} s), "
                     f"over the {max_samples} ({max_samples / sample_rate:.1f} s) allowed; split it or raise the "
                     "limit.")
  if info.subtype in ("FLOAT", "DOUBLE"):  # only float-encoded samples can exceed full scale
    audio, _ = soundfile.read(path, dtype="float32", always_2d=False)
    _check_peak(audio, path, context)
  return int(info.frames)


def _check_peak(audio: np.ndarray, path: str, context: str) -> None:
  if audio.size and float(np.max(np.abs(audio))) > 1.0:
    raise ValueError(f"audio file {path!r}{context} has samples outside [-1, 1] (peak {np.max(np.abs(audio)):.3f}).")


def read_audio(path: str, sample_rate: int = SAMPLE_RATE, where: str = "",
               max_samples: int | None = None) -> np.ndarray:
  """A mono file's waveform, float32 [samples] in [-1, 1]; refuses other rates, channels, empty or
  truncated audio, and files over `max_samples`, from the header, before decoding."""
  check_audio_file(path, sample_rate, where, max_samples)
  audio, _ = soundfile.read(path, dtype="float32", always_2d=False)
  _check_peak(audio, path, f" ({where})" if where else "")
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
  with open(path, "rb") as f:
    for number, raw_bytes in enumerate(f, start=1):
      where = f"manifest {path!r} line {number}"
      try:
        raw = raw_bytes.decode("utf-8")
      except UnicodeDecodeError as error:
        raise ValueError(f"{where} is not UTF-8 text (byte {raw_bytes[error.start]:#04x} at column "
                         f"{error.start + 1}); re-encode the manifest as UTF-8.") from None
      if not raw.strip():
        continue
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


def _encode_phrases(phrases: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.RaggedTensor:
  """phrases string [phrases] -> their token ids, int32 ragged [phrases, None] (no EOS). Like the
  targets, they are not checked here: the biasing that uses them checks that they spell the
  phrase (evaluation/bias_lists.py: check_spelling)."""
  return tf.map_fn(lambda phrase: tf.cast(vocabulary.encode_tf(phrase), tf.int32), phrases,
                   fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))


def tokenize_text(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Adds "targets": the "text" encoded with the targets vocabulary (no EOS); and, where the
  example has "bias" phrases, drops empty or whitespace-only ones, keeps each phrase once
  (first occurrences, in order) and adds
  "bias_tokens" int32 ragged [phrases, None], each phrase encoded alike."""
  vocabulary = output_features["targets"].vocabulary

  def tokenize(example):
    example = {**example, "targets": tf.cast(vocabulary.encode_tf(example["text"]), tf.int32)}
    if "bias" in example:
      phrases = tf.unique(example["bias"]).y
      phrases = tf.boolean_mask(phrases, tf.strings.length(tf.strings.strip(phrases)) > 0)  # drop blank ones
      example.update(bias=phrases, bias_tokens=_encode_phrases(phrases, vocabulary))
    return example

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
  preprocessors = [lambda ds: librispeech_to_speech(ds, lowercase), tokenize_text]
  return _register(name, source, preprocessors, vocabulary or byte_vocabulary(), shuffle_buffer_size)


class ManifestDataSource(seqio.DataSource):
  """Utterances listed in JSONL manifests, one per split; audio read with soundfile.

  Yields {"audio" float32 [samples], "text", "id", "bias" string [phrases]}. With shuffle, the
  entries' indices are shuffled (by `seed`, anew each epoch) before any audio is read, so no
  buffer of audio is needed (or saved in iterator checkpoints); sharding then takes every
  num_shards-th index, so each host reads only its own files.
  """

  def __init__(self, entries: Mapping[str, Sequence[ManifestEntry]], sample_rate: int = SAMPLE_RATE,
               manifests: Mapping[str, str] | None = None, max_samples: int | None = None):
    # num_input_examples None: seqio never caches the audio of a "small" split in memory.
    super().__init__(splits=tuple(entries), num_input_examples=None, performs_internal_shuffling=True)
    self._entries = {split: list(split_entries) for split, split_entries in entries.items()}
    self._manifests = dict(manifests or {})
    self._sample_rate = sample_rate
    self._max_samples = max_samples

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
    manifest = self._manifests.get(split, split)
    wheres = tf.constant([f"manifest {manifest!r} line {e.line}" for e in entries])
    biases = tf.ragged.constant([list(e.bias) for e in entries], dtype=tf.string, ragged_rank=1)
    indices = tf.data.Dataset.range(len(entries))
    if shuffle:
      indices = indices.shuffle(len(entries), seed=seed, reshuffle_each_iteration=True)
    if shard_info is not None and shard_info.num_shards > 1:
      indices = indices.shard(shard_info.num_shards, shard_info.index)
    sample_rate, max_samples = self._sample_rate, self._max_samples

    def read(path: bytes, where: bytes) -> np.ndarray:
      return read_audio(path.decode(), sample_rate, where.decode(), max_samples)

    def load(index):
      audio = tf.numpy_function(read, [paths[index], wheres[index]], tf.float32, stateful=False)
      return {"audio": tf.ensure_shape(audio, [None]), "text": texts[index], "id": ids[index],
              "bias": biases[index]}

    # Reading is a pure function of the path, so the iterator checkpoint may ignore it.
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).with_options(options)


@gin.configurable
def manifest_task(name: str = gin.REQUIRED, manifest: str | Mapping[str, str] = gin.REQUIRED,
                  vocabulary: seqio.Vocabulary | None = None, sample_rate: int = SAMPLE_RATE,
                  lowercase: bool = True, check_audio: bool = True, max_audio_samples: int | None = None) -> str:
  """Registers (or re-registers) a seqio speech task over JSONL manifests; returns its name.

  Args:
    name: task name.
    manifest: {split: manifest path}, e.g. {'train': 'd/train.jsonl', 'validation': 'd/dev.jsonl'},
      or one path, registered as split 'train'.
    vocabulary: for "targets"; defaults to the byte vocabulary.
    sample_rate: the rate every audio file must have (Hz).
    lowercase: lower-case transcripts and bias phrases (see `normalize_transcript`).
    check_audio: validate every file now (header: rate, channels, non-empty, not truncated,
      length; the samples of float-encoded files: within [-1, 1]), so a bad file fails at
      registration naming its manifest line, not midway through training.
    max_audio_samples: refuse longer files from their header, before decoding them (None: no limit
      here; the batches still refuse or drop utterances over speech_dataset.max_audio_samples).
  """
  manifests = {"train": manifest} if isinstance(manifest, str) else dict(manifest)
  if not manifests:
    raise ValueError(f"manifest_task '{name}': no manifests given.")
  entries = {split: parse_manifest(path, lowercase) for split, path in manifests.items()}
  if check_audio:
    for split, split_entries in entries.items():
      for e in split_entries:
        check_audio_file(e.audio_path, sample_rate, f"manifest {manifests[split]!r} line {e.line}",
                         max_audio_samples)
  source = ManifestDataSource(entries, sample_rate, manifests, max_audio_samples)
  # The source shuffles (all of each epoch); seqio adds no buffer of audio.
  return _register(name, source, [tokenize_text], vocabulary or byte_vocabulary(), shuffle_buffer_size=None)
