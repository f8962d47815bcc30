r"""ASR evaluation launcher: restore a transducer, decode a split, score WER.

  python -m memlm_jax.eval --gin_file=runs/asr_eval.gin --gin_file=<model+data>.gin \
      --gin.MODEL_DIR="'runs/asr'" [--gin.asr_eval.beam_size=8]

Decodes every utterance of `split` (greedy when beam_size is 1, else the fixed-shape beam
search) and writes MODEL_DIR/eval/asr_<split>_beam<K>_step<N>.json (WER with its substitutions,
deletions and insertions; B-WER / U-WER when the task carries per-utterance bias lists)
and the same name .jsonl (id, reference, hypothesis per utterance); K = 1 is greedy.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from absl import logging
from flax import nnx

from memlm_jax.data import speech
from memlm_jax.decoding.transducer_beam import beam_search, greedy_decode
from memlm_jax.evaluation import wer
from memlm_jax.launch.eval_lib import restore_for_inference, write_json
from memlm_jax.runtime import partitioning


def make_decoder(graphdef: nnx.GraphDef, *, beam_size: int, max_symbols_per_frame: int, max_output_length: int
                 ) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """jitted (params, audio [batch, samples], audio_paddings) -> (tokens [batch, max_output_length], lengths)."""
  if beam_size < 1:
    raise ValueError(f"asr_eval.beam_size must be >= 1, got {beam_size}.")

  @jax.jit
  def decode(params, audio, audio_paddings):
    net = nnx.merge(graphdef, params)
    encoder_out, encoder_paddings = net.encode(audio, audio_paddings)
    fns = net.decoding_fns()
    if beam_size == 1:
      return greedy_decode(fns, encoder_out, encoder_paddings, max_symbols_per_frame=max_symbols_per_frame,
                           max_output_length=max_output_length)
    best = beam_search(fns, encoder_out, encoder_paddings, beam_size=beam_size,
                       max_symbols_per_frame=max_symbols_per_frame, max_output_length=max_output_length)
    return best.tokens[:, 0], best.lengths[:, 0]

  return decode


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@gin.configurable(denylist=["model_dir"])
def asr_eval(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED, task_name: str = gin.REQUIRED,
             vocabulary: seqio.Vocabulary = gin.REQUIRED, split: str = "test", batch_size: int = 8,
             max_audio_samples: int = gin.REQUIRED, max_target_length: int = gin.REQUIRED,
             max_output_length: int | None = None, beam_size: int = 1, max_symbols_per_frame: int = 4,
             checkpoint_step: int | None = None,
             mesh: Callable[[], jax.sharding.Mesh] = partitioning.make_mesh) -> dict:
  """Decodes `split` of `task_name` and returns (and writes) the WER summary."""
  partitioning.initialize_distributed()
  trainer, params, step = restore_for_inference(model_dir, model, mesh(), checkpoint_step)
  decode = make_decoder(trainer.graphdef, beam_size=beam_size, max_symbols_per_frame=max_symbols_per_frame,
                        max_output_length=max_output_length or max_target_length)
  rows = []
  batches = speech.speech_batches(task_name, split, batch_size, max_audio_samples, max_target_length,
                                  shuffle=False, include_text=True)
  with trainer.context():
    for batch in batches:
      real = batch["audio_paddings"].min(axis=1) < 1.0  # filler rows are all padding
      inputs = trainer.global_batch({k: batch[k] for k in ("audio", "audio_paddings")})
      tokens, lengths = jax.device_get(decode(params, inputs["audio"], inputs["audio_paddings"]))
      for i in np.flatnonzero(real):
        ids = [int(t) for t in tokens[i, :lengths[i]]]
        rows.append({"id": _text(batch["id"][i]) if "id" in batch else str(len(rows)),
                     "reference": _text(batch["text"][i]), "hypothesis": vocabulary.decode(ids),
                     "bias": [_text(b) for b in batch["bias"][i] if b] if "bias" in batch else []})
      logging.info("decoded %d utterances", len(rows))
  if not rows:
    raise ValueError(f"split {split!r} of task {task_name!r} has no utterances.")
  refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
  overall = wer.word_error_rate(refs, hyps)
  payload = {"task": task_name, "split": split, "step": step, "utterances": len(rows), "beam_size": beam_size,
             "wer": overall.wer, "substitutions": overall.substitutions, "deletions": overall.deletions,
             "insertions": overall.insertions, "reference_words": overall.reference_words}
  if any(r["bias"] for r in rows):
    biased = wer.biased_wer(refs, hyps, [r["bias"] for r in rows])
    payload.update({"b_wer": biased.b_wer, "u_wer": biased.u_wer})
  if jax.process_index() == 0:
    base = os.path.join(model_dir, "eval", f"asr_{split}_beam{beam_size}_step{step}")
    write_json(base + ".json", payload)
    with open(base + ".jsonl.tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(base + ".jsonl.tmp", base + ".jsonl")
  return payload
