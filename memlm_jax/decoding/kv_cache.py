"""Chunked decoding with a preallocated key/value cache, over a model's extend function.

The dense baseline's streaming mode: a sequence is fed `chunk` tokens at a time at
absolute positions offset..offset+chunk-1 through `extend_fn(params, tokens, cache, offset)
-> (logits, cache)` (models.transformer_lm.extend_apply_fn). The model owns the forward
pass and the cache layout (layers/cached_attention.py); this module jits the function,
checks that each chunk fits the cache, and runs greedy continuation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from memlm_jax.layers.cached_attention import cache_length, check_room
from memlm_jax.runtime import multihost

ExtendFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class CachedLM:
  """A jitted extend function: compiles once per (chunk, cache) shape.

  The cache argument is donated (updated in place where the backend allows): do not reuse
  a cache after passing it in; use the returned one.
  """

  def __init__(self, extend_fn: ExtendFn):
    self.num_traces = 0  # how many times a jitted function was traced (a test hook)

    def counted(params, tokens, cache, offset):
      self.num_traces += 1
      return extend_fn(params, tokens, cache, offset)

    self._forward = jax.jit(counted, donate_argnums=2)
    self._advance = jax.jit(lambda *args: counted(*args)[1], donate_argnums=2)

  def forward(self, params: Any, tokens: jax.Array, cache: Any, offset: int) -> tuple[jax.Array, Any]:
    """tokens [batch, chunk] at positions offset.. -> (logits [batch, chunk, vocab] float32, cache)."""
    check_room(offset, tokens.shape[1], cache_length(cache))
    return self._forward(params, tokens, cache, np.int32(offset))

  def advance(self, params: Any, tokens: jax.Array, cache: Any, offset: int) -> Any:
    """Like forward but returns only the cache (prefill: no logits are computed)."""
    check_room(offset, tokens.shape[1], cache_length(cache))
    return self._advance(params, tokens, cache, np.int32(offset))


def cache_positions_needed(length: int, num_tokens: int, chunk: int) -> int:
  """Positions greedy_continue needs for prompts of `length` tokens prefilled in chunks of `chunk`
  and continued by `num_tokens`: max(ceil(length / chunk) * chunk, length + num_tokens)."""
  return max(-(-length // chunk) * chunk, length + num_tokens)


def greedy_continue(lm: CachedLM, params: Any, cache: Any, prompts: np.ndarray, num_tokens: int, *,
                    chunk: int) -> np.ndarray:
  """Prefills equal-length prompts [batch, length] chunk by chunk, then appends `num_tokens`
  argmax tokens one at a time -> [batch, num_tokens]. The cache must hold
  cache_positions_needed(length, num_tokens, chunk) positions."""
  batch, length = prompts.shape
  offset, last = 0, None
  while offset < length:
    piece = np.zeros((batch, chunk), np.int32)
    real = prompts[:, offset:offset + chunk]
    piece[:, :real.shape[1]] = real
    logits, cache = lm.forward(params, piece, cache, offset)
    last = logits[:, real.shape[1] - 1]  # positions past the prompt are overwritten by generated tokens
    offset += chunk
  out = []
  for t in range(num_tokens):
    token = multihost.fetch(jnp.argmax(last, axis=-1)).astype(np.int32)
    out.append(token)
    logits, cache = lm.forward(params, token[:, None], cache, length + t)
    last = logits[:, 0]
  return np.stack(out, axis=1)
