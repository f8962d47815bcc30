"""Fixed-shape autoregressive decoding for decoder-only LMs.

`decode` runs one `lax.fori_loop` over output positions; each step calls
`logits_fn(input_tokens, segment_ids, positions)` on the whole [batch, length]
buffer (no KV cache: O(length^2) work, compiled once). Recurrent-memory models
replace this with streaming decoding over their memory state.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

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
