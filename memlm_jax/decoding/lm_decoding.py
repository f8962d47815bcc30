"""Fixed-shape autoregressive decoding for decoder-only LMs.

`decode` runs one `lax.fori_loop` over output positions; each step calls
`logits_fn(input_tokens, segment_ids, positions)` on the whole [batch, length]
buffer (no KV cache: O(length^2) work, compiled once). Recurrent-memory models
stream instead: `MemoryStreamer` below keeps the memory state and recomputes only the
newest segment.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memlm_jax.decoding.rows import select_rows

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def decode(logits_fn: LogitsFn, prompts: jax.Array, prompt_lengths: jax.Array, *, max_decode_length: int,
           eos_id: int, temperature: float = 0.0, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Continues each prompt greedily (temperature 0) or by sampling.

  Args:
    logits_fn: (input_tokens, segment_ids, positions) [batch, length] -> logits [batch, length, vocab].
    prompts: [batch, prompt_width] int tokens, right-padded with 0.
    prompt_lengths: [batch] number of real prompt tokens (>= 1).
    max_decode_length: tokens generated per row (at most).
    eos_id: generation stops for a row after it emits this id.
    temperature: 0 for argmax, > 0 to sample from softmax(logits / temperature).
    rng: PRNG key, required when temperature > 0.
  Returns:
    (generated [batch, max_decode_length] zero-padded after EOS, lengths [batch] counting the EOS).
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key.")
  batch, prompt_width = prompts.shape
  length = prompt_width + max_decode_length
  tokens = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_width].set(prompts.astype(jnp.int32))
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  rng = jax.random.key(0) if rng is None else rng
  rows = jnp.arange(batch)

  def step(t, carry):
    tokens, done = carry
    inputs = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))  # shift right, 0 = BOS
    logits = logits_fn(inputs, jnp.ones_like(inputs), positions)
    target = prompt_lengths + t  # position being generated, per row
    next_logits = logits[rows, target]  # logits at position p predict token p
    if temperature > 0:
      chosen = jax.random.categorical(jax.random.fold_in(rng, t), next_logits / temperature)
    else:
      chosen = jnp.argmax(next_logits, axis=-1)
    chosen = jnp.where(done, 0, chosen).astype(jnp.int32)
    tokens = tokens.at[rows, target].set(chosen)
    return tokens, done | (chosen == eos_id)

  tokens, _ = jax.lax.fori_loop(0, max_decode_length, step, (tokens, jnp.zeros((batch,), bool)))
  take = prompt_lengths[:, None] + jnp.arange(max_decode_length)[None, :]
  generated = jnp.take_along_axis(tokens, take, axis=1)
  is_eos = generated == eos_id
  after_eos = jnp.cumsum(is_eos, axis=1) - is_eos > 0
  generated = jnp.where(after_eos, 0, generated)
  lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_decode_length)
  return generated, lengths


# Streaming over a recurrent-memory LM (Infini-Transformer): bounded memory at any length.

ApplyFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class StreamState(NamedTuple):
  """Where a stream stands. Every memory leaf has the batch on axis 0.

  memory: the model's memory after every complete segment before `buffer`.
  buffer: [batch, segment_length] the newest segment, 1..segment_length tokens, zero after them.
  fill: [batch] number of tokens in `buffer`.
  """
  memory: Any
  buffer: jax.Array
  fill: jax.Array


def _choose(logits: jax.Array, temperature: float, rng: jax.Array) -> jax.Array:
  """logits [batch, vocab] -> [batch] int32 token (argmax at temperature 0, else a sample)."""
  if temperature > 0:
    return jax.random.categorical(rng, logits / temperature).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class MemoryStreamer:
  """Feeds prompts of any length through a segment-recurrent LM and continues them.

  `apply_fn(params, tokens [batch, n], memory, mask [batch, n]) -> (logits [batch, n, vocab],
  memory)`, n a multiple of `segment_length`, is jitted here once per shape: prefill runs
  `chunk_segments` segments per call, generation one segment per token (the newest, partial
  segment is recomputed from the memory before it, so nothing grows with the length).
  """

  def __init__(self, apply_fn: ApplyFn, segment_length: int, *, chunk_segments: int = 8):
    if segment_length <= 0 or chunk_segments <= 0:
      raise ValueError(f"segment_length and chunk_segments must be positive, got {segment_length}, "
                       f"{chunk_segments}.")
    self.segment_length = segment_length
    self.chunk_length = segment_length * chunk_segments
    self._apply_fn = apply_fn
    self._advance = jax.jit(lambda params, tokens, memory, mask: apply_fn(params, tokens, memory, mask)[1])
    self._generate = jax.jit(self._generate_impl, static_argnames=("num_tokens", "eos_id", "temperature"))

  def prefill(self, params: Any, memory: Any, prompts: np.ndarray, lengths: np.ndarray,
              progress: Callable[[int, int], None] | None = None) -> StreamState:
    """Writes every complete segment of the prompts into memory.

    Args:
      params: passed to apply_fn.
      memory: the starting memory (e.g. model.init_memory(batch)).
      prompts: [batch, width] int tokens, right-padded.
      lengths: [batch] real prompt lengths, 1..width.
      progress: called with (tokens done, tokens to do) after every chunk.
    """
    prompts = np.asarray(prompts)
    lengths = np.asarray(lengths, np.int64)
    batch, width = prompts.shape
    if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > width:
      raise ValueError(f"prompt lengths must be [batch={batch}] values in 1..{width}, got {lengths.tolist()}.")
    fill = (lengths - 1) % self.segment_length + 1
    committed = lengths - fill  # a multiple of segment_length per row
    total = int(committed.max())
    for start in range(0, total, self.chunk_length):
      chunk = np.zeros((batch, self.chunk_length), np.int32)
      piece = prompts[:, start:start + self.chunk_length]
      chunk[:, :piece.shape[1]] = piece
      mask = (start + np.arange(self.chunk_length))[None, :] < committed[:, None]
      memory = self._advance(params, chunk, memory, mask.astype(np.int32))
      if progress is not None:
        progress(min(start + self.chunk_length, total), total)
    columns = committed[:, None] + np.arange(self.segment_length)[None, :]
    buffer = np.take_along_axis(prompts, np.minimum(columns, width - 1), axis=1)
    buffer = np.where(np.arange(self.segment_length)[None, :] < fill[:, None], buffer, 0).astype(np.int32)
    return StreamState(memory, jnp.asarray(buffer), jnp.asarray(fill, jnp.int32))

  def generate(self, params: Any, state: StreamState, *, num_tokens: int, eos_id: int, temperature: float = 0.0,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, StreamState]:
    """Continues every row by up to `num_tokens` tokens (greedy at temperature 0, else sampled).

    Returns:
      (generated [batch, num_tokens] zero after EOS, lengths [batch] counting the EOS, the state after).
    """
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and rng is None:
      raise ValueError("sampling (temperature > 0) needs an rng key.")
    rng = jax.random.key(0) if rng is None else rng
    return self._generate(params, state, rng, num_tokens=num_tokens, eos_id=eos_id, temperature=temperature)

  def _generate_impl(self, params, state, rng, *, num_tokens, eos_id, temperature):
    n = self.segment_length
    rows = jnp.arange(state.fill.shape[0])

    def step(carry, t):
      memory, buffer, fill, done = carry
      mask = (jnp.arange(n)[None, :] < fill[:, None]).astype(jnp.int32)
      logits, memory_if_full = self._apply_fn(params, buffer, memory, mask)
      token = jnp.where(done, 0, _choose(logits[rows, fill - 1], temperature, jax.random.fold_in(rng, t)))
      full = fill == n  # the segment is complete: commit it, the new token starts the next one
      memory = select_rows(full, memory_if_full, memory)
      buffer = jnp.where(full[:, None], 0, buffer).at[rows, jnp.where(full, 0, fill)].set(token)
      fill = jnp.where(full, 1, fill + 1)
      return (memory, buffer, fill, done | (token == eos_id)), token

    done = jnp.zeros(state.fill.shape, bool)
    (memory, buffer, fill, _), tokens = jax.lax.scan(step, (state.memory, state.buffer, state.fill, done),
                                                     jnp.arange(num_tokens))
    generated = tokens.T
    is_eos = generated == eos_id
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, num_tokens)
    return generated, lengths, StreamState(memory, buffer, fill)


def prepend_bos(prompts: np.ndarray, lengths: np.ndarray, bos_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The model input of a prompt, as in training (decoder_input_tokens start with BOS).

  prompts [batch, width], lengths [batch] -> ([batch, width + 1], lengths + 1).
  """
  prompts = np.asarray(prompts)
  bos = np.full((prompts.shape[0], 1), bos_id, prompts.dtype)
  return np.concatenate([bos, prompts], axis=1), np.asarray(lengths) + 1
