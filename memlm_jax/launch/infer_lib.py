r"""Inference launcher: restore a checkpoint and continue prompts into a JSONL file.

  python -m memlm_jax.infer --gin_file=runs/infer.gin --gin_file=tiny/lm_demo.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.INPUT_FILE="'prompts.txt'"

INPUT_FILE holds one prompt per line (or JSONL with a "prompt" field). Output:
MODEL_DIR/infer/<input name>_step<N>.jsonl, one {"prompt", "output", "tokens"} per line,
in input order.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import gin
import jax
import numpy as np
import seqio
from absl import logging
from flax import nnx

from memlm_jax.decoding.lm_decoding import MemoryStreamer, decode, prepend_bos
from memlm_jax.launch.eval_lib import check_writable, restore_for_inference
from memlm_jax.models import infini_lm, transformer_lm
from memlm_jax.runtime import files, multihost, partitioning
from memlm_jax.runtime.partitioning import Partitioner


def read_prompts(path: str) -> list[str]:
  """Lines of a text file, or the "prompt" field of each JSONL line; errors name the file and line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"infer.input_file {path!r} does not exist.")
  prompts = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\n")
      except UnicodeDecodeError as error:
        raise ValueError(f"{path}:{number} is not UTF-8 text (byte {raw[error.start]:#04x} at column "
                         f"{error.start + 1}).") from None
      if path.endswith(".jsonl"):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f"{path}:{number} is not valid JSON ({error.msg} at column {error.colno}): "
                           f"{line[:120]!r}.") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
          raise ValueError(f"{path}:{number} needs a string 'prompt' field, got {line[:120]!r}.")
        line = record["prompt"]
      if line:
        prompts.append(line)
  if not prompts:
    raise ValueError(f"infer.input_file {path!r} holds no prompts.")
  return prompts


def encode_prompts(prompts: list[str], vocabulary: seqio.Vocabulary,
                   width: int | None) -> tuple[np.ndarray, np.ndarray]:
  """-> (tokens [n, width] right-padded, lengths [n]); width None: the longest prompt's length.
  A prompt longer than width (or encoding to no tokens) is an error."""
  encoded = [vocabulary.encode(prompt) for prompt in prompts]
  width = max(len(ids) for ids in encoded) if width is None else width
  tokens = np.zeros((len(prompts), width), np.int32)
  lengths = np.zeros((len(prompts),), np.int32)
  for i, ids in enumerate(encoded):
    if not 0 < len(ids) <= width:
      raise ValueError(f"prompt {i} has {len(ids)} tokens; infer.max_prompt_length allows 1..{width}.")
    tokens[i, :len(ids)] = ids
    lengths[i] = len(ids)
  return tokens, lengths


def _batch_generator(graphdef: nnx.GraphDef, params: Any, *, max_decode_length: int, eos_id: int,
                     temperature: float) -> Callable[[np.ndarray, np.ndarray, jax.Array], tuple[Any, Any]]:
  """(prompts [batch, width], lengths [batch], rng) -> (generated, lengths). Models that declare
  DecodingMode.MEMORY_STREAM stream the prompt segment by segment; the others decode the whole buffer."""
  net = nnx.merge(graphdef, params)
  if net.decoding_mode is transformer_lm.DecodingMode.MEMORY_STREAM:
    streamer = MemoryStreamer(infini_lm.streaming_apply_fn(graphdef), net.segment_length)

    def stream(prompts, lengths, rng):
      prompts, lengths = prepend_bos(prompts, lengths)
      state = streamer.prefill(params, net.init_memory(prompts.shape[0]), prompts, lengths)
      out, out_len, _ = streamer.generate(params, state, num_tokens=max_decode_length, eos_id=eos_id,
                                          temperature=temperature, rng=rng)
      return out, out_len

    return stream

  @jax.jit
  def dense(params, prompts, lengths, rng):
    net = nnx.merge(graphdef, params)
    return decode(lambda x, s, p: net(x, s, p), prompts, lengths, max_decode_length=max_decode_length,
                  eos_id=eos_id, temperature=temperature, rng=rng)

  return lambda prompts, lengths, rng: dense(params, prompts, lengths, rng)


@gin.configurable(denylist=["model_dir"])
def infer(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED, vocabulary: seqio.Vocabulary = gin.REQUIRED,
          input_file: str = gin.REQUIRED, max_prompt_length: int | None = None, max_decode_length: int = 64,
          batch_size: int = 8, temperature: float = 0.0, seed: int = 0, checkpoint_step: int | None = None,
          partitioner: Callable[[], Partitioner] = Partitioner) -> str:
  """Decodes every prompt of `input_file`; returns the output path.

  max_prompt_length: the prompt buffer's width in tokens; None (default) = the longest prompt
  of the file (memory models stream a prompt of any length segment by segment; dense models
  attend over the whole buffer).
  """
  for name, value in (("max_decode_length", max_decode_length), ("batch_size", batch_size),
                      ("max_prompt_length", 1 if max_prompt_length is None else max_prompt_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"infer.{name} must be a positive integer, got {value!r}.")
  partitioning.initialize_distributed()
  check_writable(model_dir, "infer")
  prompts = read_prompts(input_file)
  restored = restore_for_inference(model_dir, model, partitioner(), checkpoint_step)

  generate = _batch_generator(restored.graphdef, restored.params, max_decode_length=max_decode_length,
                              eos_id=vocabulary.eos_id, temperature=temperature)
  tokens, lengths = encode_prompts(prompts, vocabulary, max_prompt_length)
  rows = []
  for start in range(0, len(prompts), batch_size):
    chunk = slice(start, start + batch_size)
    n = len(prompts[chunk])
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch_size - n, axis=0)])  # noqa: E731
    with restored.partitioner.context():
      out, out_len = multihost.fetch(generate(pad(tokens[chunk]), pad(lengths[chunk]),
                                             jax.random.fold_in(jax.random.key(seed), start)))
    for prompt, ids, k in zip(prompts[chunk], out[:n], out_len[:n]):
      ids = [int(t) for t in ids[:k] if t != vocabulary.eos_id]
      rows.append({"prompt": prompt, "output": vocabulary.decode(ids), "tokens": ids})
  name = os.path.splitext(os.path.basename(input_file))[0]
  path = os.path.join(model_dir, "infer", f"{name}_step{restored.step}.jsonl")
  if jax.process_index() == 0:
    files.write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
  logging.info("Wrote %d continuations to %s.", len(rows), path)
  return path
