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

from memlm_jax.data.sources import IndexedFunctionDataSource
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
  needle_length: int
  filler_start: int  # inputs[filler_start:filler_end] is filler except the needle
  filler_end: int

  def filler_mask(self) -> np.ndarray:
    """[length] bool, True on filler tokens (not the instruction, needle or question)."""
    mask = np.zeros(len(self.inputs), bool)
    mask[self.filler_start:self.filler_end] = True
    mask[self.needle_start:self.needle_start + self.needle_length] = False
    return mask


MAX_KEY = 2**63 - 2  # numpy draws keys in [key_min, key_max + 1) as int64


class PasskeyBuilder:
  """Builds passkey prompts in the token ids of `vocabulary`.

  Keys are drawn uniformly from [key_min, key_max] (5 digits by default).
  """

  def __init__(self, vocabulary: seqio.Vocabulary, key_min: int = 10_000, key_max: int = 99_999):
    for name, value in (("key_min", key_min), ("key_max", key_max)):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"passkey {name} must be an integer, got {value!r}.")
    if not 0 <= key_min <= key_max <= MAX_KEY:
      raise ValueError(f"passkey range must satisfy 0 <= key_min <= key_max <= {MAX_KEY} (keys are drawn as int64), "
                       f"got [{key_min}, {key_max}].")
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

  def check_lengths(self, lengths: Sequence[int], name: str = "lengths") -> None:
    """ValueError naming the first prompt length that is not an integer >= min_length()."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
      raise ValueError(f"passkey {name} must be a non-empty list of prompt lengths, got {lengths!r}.")
    for length in lengths:
      if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ValueError(f"passkey {name}: every length must be an integer number of tokens, got {length!r} "
                         f"in {list(lengths)}.")
      if length < self.min_length():
        raise ValueError(f"passkey {name}: length {length} is shorter than the prompt without filler "
                         f"({self.min_length()} tokens), in {list(lengths)}.")

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
    start = len(self.instruction)
    return PasskeyExample(inputs.astype(np.int32), self.answer(key), key, depth, needle_start=start + at,
                          needle_length=len(needle), filler_start=start, filler_end=start + filler_length + len(needle))

  def sample(self, length: int, seed: int, index: int, depth: float | None = None) -> PasskeyExample:
    """Example `index` of the stream defined by `seed`: key (and depth, unless given) drawn from it."""
    rng = np.random.default_rng([seed, index])
    key = int(rng.integers(self.key_min, self.key_max + 1))
    drawn_depth = float(rng.uniform(0.0, 1.0))
    return self.build(length, drawn_depth if depth is None else depth, key)


def passkey_texts(count: int, seed: int = 0, key_min: int = 0, key_max: int = 99_999,
                  max_filler_sentences: int = 12) -> list[str]:
  """`count` passkey prompts with their answers as plain text (a vocabulary's training corpus):
  the instruction, a random number of filler sentences around the needle, the question, " N"."""
  if count <= 0:
    raise ValueError(f"passkey_texts: count must be positive, got {count}.")
  rng = np.random.default_rng(seed)
  texts = []
  for _ in range(count):
    key = int(rng.integers(key_min, key_max + 1))
    filler = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(int(rng.integers(max_filler_sentences + 1)))]
    at = int(rng.integers(len(filler) + 1))
    texts.append(" ".join([INSTRUCTION, *filler[:at], NEEDLE.format(key=key), *filler[at:], QUESTION, str(key)]))
  return texts


def haystack_write_weights(example: PasskeyExample, weight: float, segment_length: int) -> np.ndarray:
  """Memory write weights [len(inputs) + len(targets)] float32 in the decoder's input layout.

  The prefix-LM converter feeds [BOS, inputs..., targets[:-1]], so weight t belongs to that
  token t. Every segment (positions [s * segment_length, (s + 1) * segment_length)) made only
  of filler tokens gets `weight`, as if the haystack were `weight` times longer there; the
  instruction, the needle, the question and the answer are written once.
  """
  if segment_length <= 0:
    raise ValueError(f"segment_length must be positive, got {segment_length}.")
  filler = np.concatenate([[False], example.filler_mask(), np.zeros(len(example.targets) - 1, bool)])
  weights = np.ones(len(filler), np.float32)
  whole = len(filler) // segment_length * segment_length  # a cut last segment is never all-filler in training
  all_filler = filler[:whole].reshape(-1, segment_length).all(axis=1)
  weights[:whole].reshape(-1, segment_length)[all_filler] = weight
  return weights


@dataclasses.dataclass(frozen=True)
class LongHaystack:
  """Training-time augmentation: with `probability`, an example's filler-only segments are
  written into memory with a weight drawn log-uniformly from [weight_min, weight_max]."""

  probability: float
  weight_min: float
  weight_max: float
  segment_length: int

  def __post_init__(self):
    if not 0.0 <= self.probability <= 1.0:
      raise ValueError(f"passkey_task.long_haystack_probability must be in [0, 1], got {self.probability}.")
    if not 0.0 < self.weight_min <= self.weight_max:
      raise ValueError(f"passkey_task.long_haystack_weights must satisfy 0 < min <= max, got "
                       f"({self.weight_min}, {self.weight_max}).")
    if not isinstance(self.segment_length, int) or self.segment_length <= 0:
      raise ValueError(f"passkey_task.segment_length must be a positive int (the model's segment length) when "
                       f"long_haystack_probability > 0, got {self.segment_length!r}.")

  def weights(self, example: PasskeyExample, seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index, 11])
    weight = 1.0
    if rng.uniform() < self.probability:
      weight = float(np.exp(rng.uniform(np.log(self.weight_min), np.log(self.weight_max))))
    return haystack_write_weights(example, weight, self.segment_length)


WRITE_WEIGHTS_FEATURE = "memory_write_weights"  # read by InfiniTransformerLM.loss
SPLIT_SEEDS = {"train": 0, "validation": 1}  # the eval launcher draws from EVAL_SEED: disjoint keys streams
EVAL_SEED = 2


def _example_features(builder: PasskeyBuilder, lengths: Sequence[int], seed: int, index: int,
                      long_haystack: LongHaystack | None = None) -> tuple[np.ndarray, ...]:
  """(inputs, targets[, write weights]) of example `index`: a pure function of (seed, index)."""
  rng = np.random.default_rng([seed, index, 7])
  example = builder.sample(int(lengths[rng.integers(len(lengths))]), seed, index)
  features = (example.inputs, example.targets.astype(np.int32))
  if long_haystack is not None:
    features += (long_haystack.weights(example, seed, index),)
  return features


@gin.configurable
def passkey_task(name: str = "passkey", lengths: Sequence[int] = gin.REQUIRED,
                 vocabulary: seqio.Vocabulary | None = None, key_min: int = 10_000, key_max: int = 99_999,
                 seed: int = 0, long_haystack_probability: float = 0.0,
                 long_haystack_weights: Sequence[float] = (1.0, 1e4), segment_length: int | None = None) -> str:
  """Registers (or re-registers) a seqio task of endless passkey examples; returns its name.

  Each example's prompt length is drawn from `lengths` (tokens), its depth uniformly from
  [0, 1]; features "inputs" (the prompt) and "targets" (" N"). Splits 'train' and
  'validation' use disjoint seeds (seed + SPLIT_SEEDS[split] * 1000). Train with
  DatasetConfig.feature_converter = 'prefix_lm' so the loss falls on the answer only.

  With `long_haystack_probability` > 0 the task also emits "memory_write_weights"
  [len(inputs) + len(targets)] float32 (haystack_write_weights: filler-only segments of
  `segment_length` get a weight log-uniform in `long_haystack_weights`); pass it to the
  model with DatasetConfig.passthrough_features = ['memory_write_weights'].
  """
  vocabulary = vocabulary or byte_vocabulary()
  builder = PasskeyBuilder(vocabulary, key_min, key_max)
  long_haystack = None
  if long_haystack_probability:
    if len(long_haystack_weights) != 2:
      raise ValueError(f"passkey_task.long_haystack_weights must be (min, max), got {long_haystack_weights!r}.")
    long_haystack = LongHaystack(float(long_haystack_probability), float(long_haystack_weights[0]),
                                 float(long_haystack_weights[1]), segment_length)
  for length in lengths:
    if length < builder.min_length():
      raise ValueError(f"passkey_task.lengths: {length} is shorter than the shortest prompt "
                       f"({builder.min_length()} tokens).")

  def dataset_fn(split: str, shard_index: int, num_shards: int) -> tf.data.Dataset:
    split_seed = passkey_seed + SPLIT_SEEDS[split] * 1000

    def features(index):
      dtypes = (tf.int32, tf.int32) + ((tf.float32,) if long_haystack else ())
      values = tf.numpy_function(lambda i: _example_features(builder, lengths, split_seed, int(i), long_haystack),
                                 [index], dtypes, stateful=False)
      names = ("inputs", "targets", WRITE_WEIGHTS_FEATURE)
      return {name: tf.ensure_shape(value, [None]) for name, value in zip(names, values)}

    # Each example is a pure function of its index, so the pipeline's only state is the
    # range position: that is what a checkpoint of the iterator saves (the Python function
    # is external state it may ignore).
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return tf.data.Dataset.range(shard_index, 2 ** 62, num_shards).map(features).with_options(options)

  passkey_seed = seed
  output_features = {"inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
                     "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)}
  if long_haystack:
    output_features[WRITE_WEIGHTS_FEATURE] = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                                                           dtype=tf.float32, required=False)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=IndexedFunctionDataSource(dataset_fn, splits=tuple(SPLIT_SEEDS)),
      preprocessors=[],
      output_features=output_features,
      metric_fns=[],
  )
  return name
