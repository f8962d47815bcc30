r"""Passkey evaluation launcher: restore a checkpoint, run passkey retrieval at each length.

  python -m memlm_jax.eval --gin_file=runs/passkey_eval.gin --gin_file=<model>.gin \
      --gin.MODEL_DIR="'runs/passkey'" --gin.PASSKEY_LENGTHS="[2048, 1048576]"

Models that declare DecodingMode.MEMORY_STREAM stream the prompt (bounded memory at any
length); KV_CACHE models prefill a KV cache and are reported as "exceeds_context" above
`max_context`. Writes MODEL_DIR/eval/passkey_<settings hash>_step<N>.json after every length
(schema: evaluation/passkey.py; settings and "complete" inside).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import gin
import jax
import numpy as np
import seqio
from absl import logging
from flax import nnx

from memlm_jax.data.passkey import EVAL_SEED, PasskeyBuilder
from memlm_jax.decoding import kv_cache
from memlm_jax.decoding.lm_decoding import MemoryStreamer, prepend_bos
from memlm_jax.evaluation.passkey import check_settings, evaluate_passkey
from memlm_jax.launch.eval_lib import check_writable, restore_for_inference, settings_name, write_json
from memlm_jax.models import infini_lm, transformer_lm
from memlm_jax.runtime import multihost, partitioning
from memlm_jax.runtime import progress as progress_line
from memlm_jax.runtime.partitioning import Partitioner


def _log_progress(text: str) -> None:
  logging.info(text)
  progress_line.update(text.strip())


def _log_result(text: str) -> None:
  logging.info(text)
  progress_line.done(text)


def streaming_continue_fn(graphdef: nnx.GraphDef, params: Any, chunk_segments: int,
                          progress: Callable[[str], None]) -> Callable[[np.ndarray, int], np.ndarray]:
  """Greedy continuation of equal-length prompts through a memory model's MemoryStreamer."""
  net = nnx.merge(graphdef, params)
  streamer = MemoryStreamer(infini_lm.streaming_apply_fn(graphdef), net.segment_length,
                            chunk_segments=chunk_segments)

  def report(done: int, total: int) -> None:
    if done == total or done % (1 << 15) < streamer.chunk_length:
      progress(f"  passkey length {total - 1:,}: streamed {done:,}/{total:,} tokens (with BOS)")

  def continue_fn(prompts: np.ndarray, num_tokens: int) -> np.ndarray:
    prompts, lengths = prepend_bos(prompts, np.full((prompts.shape[0],), prompts.shape[1]))
    state = streamer.prefill(params, net.init_memory(prompts.shape[0]), prompts, lengths, progress=report)
    generated, _, _ = streamer.generate(params, state, num_tokens=num_tokens, eos_id=-1)
    return multihost.fetch(generated)

  return continue_fn


def dense_continue_fn(graphdef: nnx.GraphDef, params: Any, chunk: int) -> Callable[[np.ndarray, int], np.ndarray]:
  """Greedy continuation of equal-length prompts by a dense LM with a KV cache."""
  net = nnx.merge(graphdef, params)
  lm = kv_cache.CachedLM(transformer_lm.extend_apply_fn(graphdef))

  def continue_fn(prompts: np.ndarray, num_tokens: int) -> np.ndarray:
    prompts, _ = prepend_bos(prompts, np.zeros((prompts.shape[0],)))
    cache = net.init_cache(prompts.shape[0], kv_cache.cache_positions_needed(prompts.shape[1], num_tokens, chunk))
    return kv_cache.greedy_continue(lm, params, cache, prompts, num_tokens, chunk=chunk)

  return continue_fn


@gin.configurable(denylist=["model_dir"])
def passkey_eval(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED,
                 vocabulary: seqio.Vocabulary = gin.REQUIRED, lengths: Sequence[int] = gin.REQUIRED,
                 examples_per_bucket: int = 2, key_min: int = 10_000, key_max: int = 99_999, seed: int = EVAL_SEED,
                 max_context: int | None = None, label: str | None = None, chunk_segments: int = 64,
                 dense_chunk: int = 512, checkpoint_step: int | None = None,
                 partitioner: Callable[[], Partitioner] = Partitioner) -> dict:
  """Evaluates passkey retrieval; returns (and writes) the results dict.

  Every setting is checked before the checkpoint is read. The result file
  (eval/passkey_<settings hash>_step<N>.json, the settings inside) is rewritten atomically after
  each length, with "complete": false until the last one.
  """
  builder = PasskeyBuilder(vocabulary, key_min, key_max)
  check_settings(builder, lengths, examples_per_bucket, max_context)
  partitioning.initialize_distributed()
  check_writable(model_dir, "eval")
  restored = restore_for_inference(model_dir, model, partitioner(), checkpoint_step)
  settings = {"lengths": list(lengths), "examples_per_bucket": examples_per_bucket, "key_min": key_min,
              "key_max": key_max, "seed": seed, "max_context": max_context,
              "vocabulary_size": vocabulary.vocab_size}
  path = os.path.join(model_dir, "eval", settings_name("passkey", settings, restored.step) + ".json")
  note = "greedy; scored on the key's digit tokens (exact match: all right; token accuracy: the fraction right)"
  net = restored.model()
  kind = net.label

  def write(results: dict, complete: bool) -> dict:
    payload = {"model": label or kind, "step": restored.step, "metric_note": note, "settings": settings,
               "complete": complete, **results}
    if jax.process_index() == 0:
      write_json(path, payload)
    return payload

  with restored.partitioner.context():
    if net.decoding_mode is transformer_lm.DecodingMode.MEMORY_STREAM:
      continue_fn = streaming_continue_fn(restored.graphdef, restored.params, chunk_segments, _log_progress)
    else:
      continue_fn = dense_continue_fn(restored.graphdef, restored.params, dense_chunk)
    context = "" if max_context is None else f"{kind} evaluated up to {max_context} tokens (passkey_eval.max_context)"
    results = evaluate_passkey(continue_fn, builder, lengths, examples_per_bucket=examples_per_bucket, seed=seed,
                               max_context=max_context, context_note=context, progress=_log_result,
                               on_length=lambda partial: write(partial, complete=False))
  logging.info("Passkey results: %s", path)
  return write(results, complete=True)
