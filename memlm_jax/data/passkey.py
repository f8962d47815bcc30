"""Passkey retrieval (Infini-attention paper, Appendix B; Mohtashami & Jaggi 2023).

A prompt of exactly `length` tokens: the instruction, filler sentences repeated, the
needle "The pass key is N. Remember it. N is the pass key." at a fraction `depth` of the
filler, then the question; the target is " N". Examples are assembled from the token ids
of the pieces (encoded once), so a 1M-token prompt costs a few array copies, not the
tokenization of a megabyte of text. The needle is placed on the filler-sentence boundary
nearest to depth * filler length (the filler's last, cut sentence is never split by it).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from memlm_jax.data.vocabularies import byte_vocabulary

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEPTH_BUCKETS = ("start", "middle", "end")


def depth_bucket(depth: float) -> str:
  """The paper's buckets: start [0, 1/3), middle [1/3, 2/3), end [2/3, 1]."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}.")
  return DEPTH_BUCKETS[min(int(depth * 3), 2)]


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  """inputs [length] int32 prompt tokens; targets [answer_len] int32 tokens of " N"."""
  inputs: np.ndarray
  targets: np.ndarray
  key: int
  depth: float
  needle_start: int  # index in `inputs` of the needle's first token


class PasskeyBuilder:
  """Builds passkey prompts in the token ids of `vocabulary`.

  Keys are drawn uniformly from [key_min, key_max] (5 digits by default).
  """

  def __init__(self, vocabulary: seqio.Vocabulary, key_min: int = 10_000, key_max: int = 99_999):
    if not 0 <= key_min <= key_max:
      raise ValueError(f"passkey range must satisfy 0 <= key_min <= key_max, got [{key_min}, {key_max}].")
    self.vocabulary = vocabulary
    self.key_min, self.key_max = key_min, key_max
    encode = lambda text: np.asarray(vocabulary.encode(text), np.int32)  # noqa: E731
    self._encode = encode
    self.instruction = encode(INSTRUCTION)
    sentences = [encode(" " + sentence) for sentence in FILLER_SENTENCES]
    self.filler_cycle = np.concatenate(sentences)
    self._sentence_ends = np.cumsum([0] + [len(s) for s in sentences])  # boundaries within one cycle
    self.question = encode(" " + QUESTION)

  def needle(self, key: int) -> np.ndarray:
    return self._encode(" " + NEEDLE.format(key=key))

  def answer(self, key: int) -> np.ndarray:
    return self._encode(" " + str(key))

  def min_length(self) -> int:
    """The shortest prompt (no filler) with the longest key."""
    return len(self.instruction) + len(self.needle(self.key_max)) + len(self.question)

  def _boundary_near(self, target: float, filler_length: int) -> int:
    cycle = len(self.filler_cycle)
    base = int(target // cycle) * cycle
    candidates = base + self._sentence_ends
    candidates = candidates[candidates <= filler_length]  # never inside the cut last sentence
    return int(candidates[np.argmin(np.abs(candidates - target))])

  def build(self, length: int, depth: float, key: int) -> PasskeyExample:
    """A prompt of exactly `length` tokens with the needle for `key` at `depth` of the filler."""
    depth_bucket(depth)  # validates
    if not self.key_min <= key <= self.key_max:
      raise ValueError(f"key {key} is outside the configured range [{self.key_min}, {self.key_max}].")
    needle = self.needle(key)
    filler_length = length - len(self.instruction) - len(needle) - len(self.question)
    if filler_length < 0:
      raise ValueError(f"passkey length {length} is shorter than the prompt without filler "
                       f"({length - filler_length} tokens).")
    filler = np.resize(self.filler_cycle, filler_length)  # repeats the cycle, cut to the exact length
    at = self._boundary_near(depth * filler_length, filler_length)
    inputs = np.concatenate([self.instruction, filler[:at], needle, filler[at:], self.question])
    return PasskeyExample(inputs.astype(np.int32), self.answer(key), key, depth, len(self.instruction) + at)

  def sample(self, length: int, seed: int, index: int, depth: float | None = None) -> PasskeyExample:
    """Example `index` of the stream defined by `seed`: key (and depth, unless given) drawn from it."""
    rng = np.random.default_rng([seed, index])
    key = int(rng.integers(self.key_min, self.key_max + 1))
    drawn_depth = float(rng.uniform(0.0, 1.0))
    return self.build(length, drawn_depth if depth is None else depth, key)


SPLIT_SEEDS = {"train": 0, "validation": 1}  # the eval launcher draws from EVAL_SEED: disjoint keys streams
EVAL_SEED = 2


def _example_features(builder: PasskeyBuilder, lengths: Sequence[int], seed: int,
                      index: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of example `index`: a pure function of (seed, index)."""
  rng = np.random.default_rng([seed, index, 7])
  example = builder.sample(int(lengths[rng.integers(len(lengths))]), seed, index)
  return example.inputs, example.targets.astype(np.int32)


@gin.configurable
def passkey_task(name: str = "passkey", lengths: Sequence[int] = gin.REQUIRED,
                 vocabulary: seqio.Vocabulary | None = None, key_min: int = 10_000, key_max: int = 99_999,
                 seed: int = 0) -> str:
  """Registers (or re-registers) a seqio task of endless passkey examples; returns its name.

  Each example's prompt length is drawn from `lengths` (tokens), its depth uniformly from
  [0, 1]; features "inputs" (the prompt) and "targets" (" N"). Splits 'train' and
  'validation' use disjoint seeds (seed + SPLIT_SEEDS[split] * 1000). Train with
  DatasetConfig.feature_converter = 'prefix_lm' so the loss falls on the answer only.
  """
  vocabulary = vocabulary or byte_vocabulary()
  builder = PasskeyBuilder(vocabulary, key_min, key_max)
  for length in lengths:
    if length < builder.min_length():
      raise ValueError(f"passkey_task.lengths: {length} is shorter than the shortest prompt "
                       f"({builder.min_length()} tokens).")

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # the stream is already random and defined by the task's seed
    split_seed = passkey_seed + SPLIT_SEEDS[split] * 1000

    def features(index):
      inputs, targets = tf.numpy_function(lambda i: _example_features(builder, lengths, split_seed, int(i)),
                                          [index], (tf.int32, tf.int32), stateful=False)
      return {"inputs": tf.ensure_shape(inputs, [None]), "targets": tf.ensure_shape(targets, [None])}

    # Each example is a pure function of its index, so the pipeline's only state is the
    # range position: that is what a checkpoint of the iterator saves (the Python function
    # is external state it may ignore).
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return tf.data.Dataset.range(2 ** 62).map(features).with_options(options)

  passkey_seed = seed
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=tuple(SPLIT_SEEDS)),
      preprocessors=[],
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
                       "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
      metric_fns=[],
  )
  return name
