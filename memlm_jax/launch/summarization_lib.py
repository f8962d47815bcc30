r"""Summarization of whole books: stream the input through the model's memory, decode the summary, score ROUGE.

  python -m memlm_jax.eval --gin_file=runs/summarization_eval.gin --gin_file=<model+data>.gin \
      --gin.MODEL_DIR="'runs/x'" [--gin.EVAL_SPLIT="'test'"] [--gin.summarization_eval.temperature=0.7]

Each example's input (BOS, the book, EOS as the separator, as in training) is written into the
memory segment by segment (decoding/lm_decoding.MemoryStreamer: memory bounded however long the
book), then the summary is generated greedily (temperature 0) or by sampling, up to the dataset's
`targets_length` tokens or EOS. Writes MODEL_DIR/eval/summarization_<task>_<split>_<hash>_step<N>.json
(ROUGE-1/2/L/Lsum F1 x 100, best over each example's references, and their geometric mean
'overall') and the generations beside it as .jsonl ({index, prediction, references, rouge}).

Every process reads the whole split and decodes the same examples (the inputs are the same global
arrays on every host); process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import gin
import jax
import numpy as np
import seqio
from absl import logging

from memlm_jax.data import pipeline
from memlm_jax.decoding.lm_decoding import MemoryStreamer, prepend_bos
from memlm_jax.evaluation.rouge import example_rouge, rouge_scores
from memlm_jax.launch.eval_lib import check_writable, restore_for_inference, settings_name, write_json
from memlm_jax.models import infini_lm
from memlm_jax.models.transformer_lm import DecodingMode
from memlm_jax.runtime import files, multihost, partitioning
from memlm_jax.runtime import progress as progress_line
from memlm_jax.runtime.partitioning import Partitioner


def read_examples(dataset: pipeline.DatasetConfig, max_examples: int | None) -> tuple[list[dict[str, Any]],
                                                                                      seqio.Vocabulary]:
  """The split's examples in order, untruncated: {'inputs' tokens, 'targets' tokens, 'references' [str]};
  and the targets' vocabulary. Raises before any decoding if a reference summary is longer than
  `dataset.targets_length` tokens (the most the eval generates)."""
  task = pipeline.get_task(dataset)
  if dataset.split not in task.splits:
    raise ValueError(f"split {dataset.split!r} is not in task {task.name!r} (it has {list(task.splits)}).")
  missing = [name for name in ("inputs", "targets") if name not in task.output_features]
  if missing:
    raise ValueError(f"summarization_eval needs a task with 'inputs' and 'targets' (task {task.name!r} has "
                     f"{sorted(task.output_features)}).")
  stream = task.get_dataset(sequence_length=None, split=dataset.split, shuffle=False, num_epochs=1,
                            shard_info=seqio.ShardInfo(0, 1), use_cached=dataset.use_cached)
  examples = []
  for index, example in enumerate(stream.as_numpy_iterator()):
    if max_examples is not None and index >= max_examples:
      break
    references = example.get("references", [example["targets_pretokenized"]])
    references = [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in np.atleast_1d(references)]
    targets = example["targets"]
    if targets.size > dataset.targets_length:
      raise ValueError(f"example {index} of {task.name!r} {dataset.split!r} has a {targets.size}-token summary "
                       f"(EOS included), longer than DatasetConfig.targets_length={dataset.targets_length}, the most "
                       "the eval generates; raise targets_length (TARGETS_LENGTH).")
    if example["inputs"].size < 1:
      raise ValueError(f"example {index} of {task.name!r} {dataset.split!r} has an empty input.")
    examples.append({"inputs": example["inputs"], "targets": targets, "references": references})
  if not examples:
    raise ValueError(f"split {dataset.split!r} of {task.name!r} has no examples.")
  return examples, task.output_features["targets"].vocabulary


def _text(vocabulary: seqio.Vocabulary, tokens: np.ndarray, length: int) -> str:
  """The decoded summary: tokens before EOS."""
  ids = [int(t) for t in tokens[:length] if int(t) != vocabulary.eos_id]
  return vocabulary.decode(ids)


@gin.configurable(denylist=["model_dir"])
def summarization_eval(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED,
                       dataset: pipeline.DatasetConfig = gin.REQUIRED,
                       partitioner: Callable[[], Partitioner] = Partitioner,
                       checkpoint_step: int | None = None, temperature: float = 0.0, seed: int = 0,
                       chunk_segments: int = 8, max_examples: int | None = None) -> dict[str, Any]:
  """Restores `checkpoint_step` (latest if None), summarizes every example of `dataset` (batch_size rows at a
  time, summaries of up to targets_length tokens) and returns the ROUGE scores.

  temperature: 0 decodes greedily; > 0 samples from softmax(logits / temperature) (keys from `seed`).
  """
  if temperature < 0:
    raise ValueError(f"summarization_eval.temperature must be >= 0, got {temperature}.")
  partitioning.initialize_distributed()
  check_writable(model_dir, "eval")
  examples, vocabulary = read_examples(dataset, max_examples)
  restored = restore_for_inference(model_dir, model, partitioner(), checkpoint_step)
  net = restored.model()
  if getattr(net, "decoding_mode", None) != DecodingMode.MEMORY_STREAM:
    raise ValueError(f"summarization_eval streams the book through a memory; {type(net).__name__} has no memory "
                     "(decoding_mode is not MEMORY_STREAM).")
  streamer = MemoryStreamer(infini_lm.streaming_apply_fn(restored.graphdef), net.segment_length,
                            chunk_segments=chunk_segments)
  start = time.time()
  generations = []
  with restored.partitioner.context():
    for first in range(0, len(examples), dataset.batch_size):
      group = examples[first:first + dataset.batch_size]
      rows = group + [group[-1]] * (dataset.batch_size - len(group))  # a fixed batch shape: one compilation
      lengths = np.asarray([r["inputs"].size for r in rows])
      prompts = np.zeros((len(rows), int(lengths.max())), np.int32)
      for i, row in enumerate(rows):
        prompts[i, :row["inputs"].size] = row["inputs"]
      prompts, lengths = prepend_bos(prompts, lengths)
      state = streamer.prefill(restored.params, net.init_memory(len(rows)), prompts, lengths)
      rng = jax.random.fold_in(jax.random.key(seed), first)
      generated, out_lengths, _ = streamer.generate(restored.params, state, num_tokens=dataset.targets_length,
                                                    eos_id=vocabulary.eos_id, temperature=temperature, rng=rng)
      generated, out_lengths = multihost.fetch((generated, out_lengths))
      for i, example in enumerate(group):
        prediction = _text(vocabulary, generated[i], int(out_lengths[i]))
        generations.append({"index": first + i, "prediction": prediction, "references": example["references"],
                            "rouge": example_rouge(prediction, example["references"])})
      progress_line.update(f"summarization eval: {len(generations)}/{len(examples)} examples")
  scores = rouge_scores([g["prediction"] for g in generations], [g["references"] for g in generations])
  step = restored.step
  settings = {**dataclasses.asdict(dataset), "temperature": temperature, "seed": seed, "max_examples": max_examples}
  name = settings_name(f"summarization_{dataset.mixture_or_task_name}_{dataset.split}", settings, step)
  if jax.process_index() == 0:
    directory = os.path.join(model_dir, "eval")
    files.write_atomic(os.path.join(directory, f"{name}.jsonl"),
                       "".join(json.dumps(g, sort_keys=True) + "\n" for g in generations))
    write_json(os.path.join(directory, f"{name}.json"),
               {"step": step, "task": dataset.mixture_or_task_name, "split": dataset.split, "settings": settings,
                "seconds": time.time() - start, "generations": f"{name}.jsonl", **scores})
  progress_line.done(f"summarization eval {name}: {scores['examples']} examples, ROUGE-1/2/L "
                     f"{scores['rouge1']:.2f}/{scores['rouge2']:.2f}/{scores['rougeL']:.2f}")
  logging.info("Summarization eval %s: %s", name, scores)
  return scores
