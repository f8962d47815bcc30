r"""Perplexity over whole documents (books): every document streamed to its end through the model's memory.

  python -m memlm_jax.eval --gin_file=runs/long_document_eval.gin --gin_file=<model+data>.gin \
      --gin.MODEL_DIR="'runs/x'" [--gin.EVAL_SPLIT="'test'"]

The long-document reader (data/long_documents.py) gives each lane one document in order, chunk by
chunk; the model's memory is carried from chunk to chunk (reset where a lane starts a document), so
memory stays bounded however long the book. Each lane's loss sums are credited to its document.
Writes MODEL_DIR/eval/long_document_<task>_<split>_<hash>_step<N>.json: per document (title,
tokens, words, NLL, token-level and word-level perplexity) and overall (corpus-level: total NLL
over total tokens, and over total words as PG19's official word-level perplexity).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import gin
import jax
from absl import logging

from memlm_jax.data import pipeline
from memlm_jax.evaluation.perplexity import long_document_metrics
from memlm_jax.launch.eval_lib import check_writable, restore_for_inference, settings_name, write_json
from memlm_jax.runtime import multihost, partitioning
from memlm_jax.runtime import progress as progress_line
from memlm_jax.runtime.partitioning import Partitioner
from memlm_jax.runtime.summaries import MetricsLogger
from memlm_jax.runtime.trainer import Evaluator


def document_sums(evaluator: Evaluator, params: Any, reader: Any) -> dict[int, dict[str, float]]:
  """{document index: {'nll', 'tokens'}} of this host's documents, streamed by `reader` to their ends.

  Every host runs the same number of steps (a host whose documents are done feeds idle batches), since
  each step is one collective computation over all hosts' lanes.
  """
  parts = evaluator.partitioner
  carry = evaluator.init_carry(params, reader.lanes * parts.data_shard[1])
  sums: dict[int, dict[str, float]] = {}
  steps = 0
  for batch in multihost.in_step(reader, lambda _: reader.idle_batch()):
    rows, carry = evaluator.carried_row_sums(params, parts.global_batch(batch), carry)
    nll, tokens = parts.host_rows(rows["loss_sum"]), parts.host_rows(rows["weight_sum"])
    for lane, index in enumerate(batch["document_index"]):
      if index >= 0:
        entry = sums.setdefault(int(index), {"nll": 0.0, "tokens": 0.0})
        entry["nll"] += float(nll[lane])
        entry["tokens"] += float(tokens[lane])
    steps += 1
    if steps % 10 == 0:
      progress_line.update(f"long-document eval: step {steps}, {len(sums)} documents started")
  return sums


@gin.configurable(denylist=["model_dir"])
def long_document_eval(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED,
                       dataset: pipeline.DatasetConfig = gin.REQUIRED,
                       partitioner: Callable[[], Partitioner] = Partitioner,
                       checkpoint_step: int | None = None) -> dict[str, Any]:
  """Restores `checkpoint_step` (latest if None) and reads every document of `dataset` (feature_converter
  'long_document'; read once, in order, unshuffled) to its end; returns {'documents': [...], 'overall': {...}}."""
  if dataset.feature_converter != "long_document":
    raise ValueError(f"long_document_eval reads whole documents: set the dataset's feature_converter to "
                     f"'long_document', got {dataset.feature_converter!r}.")
  dataset = dataclasses.replace(dataset, shuffle=False, num_epochs=1)
  partitioning.initialize_distributed()
  check_writable(model_dir, "eval")
  restored = restore_for_inference(model_dir, model, partitioner(), checkpoint_step)
  if not hasattr(restored.model(), "carried_loss"):
    raise ValueError(f"{type(restored.model()).__name__} has no carried_loss: it cannot read long documents.")
  parts = restored.partitioner
  reader = pipeline.long_document_reader(dataset, parts.data_shard, record_documents=True)
  evaluator = Evaluator(restored.graphdef, parts, jax.tree.map(lambda x: x.sharding, restored.params))
  start = time.time()
  sums = document_sums(evaluator, restored.params, reader)
  mine = [{"shard_index": index, "title": info.title, "words": info.num_words, "nll": sums[index]["nll"],
           "tokens": sums[index]["tokens"]} for index, info in sorted(reader.documents_read.items())]
  documents = [d for shard in multihost.gather_shards(mine, parts.data_shard) for d in shard]
  results = long_document_metrics(documents)
  step = restored.step
  settings = dataclasses.asdict(dataset)
  name = settings_name(f"long_document_{dataset.mixture_or_task_name}_{dataset.split}", settings, step)
  overall = results["overall"]
  if jax.process_index() == 0:
    write_json(os.path.join(model_dir, "eval", f"{name}.json"),
               {"step": step, "task": dataset.mixture_or_task_name, "split": dataset.split, "settings": settings,
                "seconds": time.time() - start, **results})
  logger = MetricsLogger(model_dir, "eval")
  logger.write(step, {f"long_document/{k}": v for k, v in overall.items() if isinstance(v, (int, float))})
  logger.close()
  word = overall["word_perplexity"]
  progress_line.done(f"long-document eval {name}: {overall['num_documents']} documents, token perplexity "
                     f"{overall['token_perplexity']:.3f}" + (f", word perplexity {word:.3f}" if word else ""))
  logging.info("Long-document eval %s: %s", name, overall)
  return results
