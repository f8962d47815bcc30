"""seqio feature converter for transducer training: pads each utterance to fixed shapes.

Task features: "audio" float32 [samples] (a waveform in [-1, 1] or, rank 2, precomputed
features) and "targets" int32 [labels]. Model features: audio [audio_length] with
audio_paddings (1.0 = padded) and targets [targets_length] with target_paddings. An
utterance longer than its length fails seqio's length check; nothing is cut.
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

_Spec = seqio.FeatureConverter.FeatureSpec


def _pad_with_paddings(values: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
  """values [n, ...] -> (values zero-padded to [length, ...], paddings [length] float32, 1.0 past n)."""
  n = tf.shape(values)[0]
  rest = tf.zeros([tf.rank(values) - 1, 2], tf.int32)
  padded = tf.pad(values, tf.concat([[[0, length - n]], rest], axis=0))
  paddings = 1.0 - tf.sequence_mask(n, length, dtype=tf.float32)
  return padded, paddings


class SpeechFeatureConverter(seqio.FeatureConverter):
  """Unpacked, padded speech batches: audio, audio_paddings, targets, target_paddings."""

  TASK_FEATURES = {"audio": _Spec(dtype=tf.float32), "targets": _Spec(dtype=tf.int32)}
  MODEL_FEATURES = {"audio": _Spec(dtype=tf.float32), "audio_paddings": _Spec(dtype=tf.float32),
                    "targets": _Spec(dtype=tf.int32), "target_paddings": _Spec(dtype=tf.float32)}
  PACKING_FEATURE_DTYPE = None

  def __init__(self, **kwargs):
    if kwargs.pop("pack", False):
      raise ValueError("SpeechFeatureConverter does not pack utterances; set pack=False.")
    super().__init__(pack=False, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    audio_length, targets_length = task_feature_lengths["audio"], task_feature_lengths["targets"]

    def convert(example):
      audio, audio_paddings = _pad_with_paddings(example["audio"], audio_length)
      targets, target_paddings = _pad_with_paddings(example["targets"], targets_length)
      return {"audio": audio, "audio_paddings": audio_paddings, "targets": targets,
              "target_paddings": target_paddings}

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    audio, targets = task_feature_lengths["audio"], task_feature_lengths["targets"]
    return {"audio": audio, "audio_paddings": audio, "targets": targets, "target_paddings": targets}
