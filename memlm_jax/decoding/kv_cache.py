"""Chunked forward of the dense TransformerLM with a preallocated key/value cache.

The dense baseline's streaming mode: a sequence is fed `chunk` tokens at a time at
absolute positions offset..offset+chunk-1. Each layer rotates the chunk's keys at those
positions, writes K and V into its cache at `offset`, and lets every query attend to the
cached keys at absolute positions <= its own. Entries past the current position (zeros,
or stale values from an earlier stream) are masked by position, so a cache can be reused
from offset 0 without clearing it.

Attention over the cache is either one softmax over the whole preallocated cache
(`key_block=None`: work per chunk grows with max_length) or an online softmax over
key blocks of `key_block` positions that stops after the block holding the chunk's last
position (work per chunk grows with offset + chunk; the benchmark path).

The network is the model's own: embed_tokens, each layer's attention_norm,
attention.project_raw_qkv / rotate / out, add_attention_and_mlp, then hidden_to_logits.
Inference only (deterministic: no dropout).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memlm_jax.layers.attention import repeat_kv_heads
from memlm_jax.models.transformer_lm import TransformerLM

_NEG_INF = -1e30


class LayerCache(NamedTuple):
  """One layer's cache: rotated keys k and values v, [batch, max_length, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array


Cache = tuple[LayerCache, ...]  # one per layer


def cache_bytes(model: TransformerLM, batch_size: int, max_length: int) -> int:
  """Bytes of the cache init_cache would allocate (nothing is allocated)."""
  per_tensor = batch_size * max_length * model.num_kv_heads * model.head_dim * jnp.dtype(model.dtype).itemsize
  return 2 * model.num_layers * per_tensor


def init_cache(model: TransformerLM, batch_size: int, max_length: int) -> Cache:
  """Zero cache of every layer: k, v [batch, max_length, kv_heads, head_dim] in the compute dtype."""
  shape = (batch_size, max_length, model.num_kv_heads, model.head_dim)
  return tuple(LayerCache(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
               for _ in range(model.num_layers))


def cache_length(cache: Cache) -> int:
  """max_length of a cache (axis 1 of every k and v)."""
  return cache[0].k.shape[1]


def check_room(offset: int | jax.Array, chunk: int, max_length: int) -> None:
  """Raises ValueError when positions offset..offset+chunk-1 do not fit a cache of max_length.

  A traced offset cannot be checked here; CachedLM checks before calling its jitted functions.
  """
  if isinstance(offset, jax.core.Tracer):
    return
  offset = int(offset)
  if offset < 0 or offset + chunk > max_length:
    raise ValueError(f"KV cache overflow: a chunk of {chunk} tokens at offset {offset} needs positions "
                     f"{offset}..{offset + chunk - 1}, but the cache holds max_length={max_length} "
                     f"(positions 0..{max_length - 1}); allocate a longer cache.")


def _write(cache: LayerCache, k: jax.Array, v: jax.Array, offset: jax.Array) -> LayerCache:
  """Writes k, v [batch, chunk, kv_heads, dim] at positions offset.. of the cache."""
  start = (0, offset, 0, 0)
  return LayerCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                    jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))


def _attend_whole_cache(attention: nnx.Module, q: jax.Array, cache: LayerCache, q_pos: jax.Array) -> jax.Array:
  """q [batch, chunk, heads, dim] over every cached key at a position <= its own -> [batch, chunk, heads, dim]."""
  k_pos = jnp.arange(cache.k.shape[1], dtype=jnp.int32)
  mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, chunk, max_length]
  return attention.local_attention(q, cache.k, cache.v, mask)


def _block_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, carry: tuple) -> tuple:
  """Folds one key block into the online-softmax state (running max m, sum l [b, h, q], acc [b, q, h, d]).

  q [b, q, h, d]; k, v [b, block, h, d]; mask [q, block] bool.
  """
  m, l, acc = carry
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  logits = jnp.where(mask, logits, _NEG_INF)
  m_new = jnp.maximum(m, logits.max(axis=-1))
  weights = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
  rescale = jnp.exp(m - m_new)
  l = l * rescale + weights.sum(axis=-1)
  update = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc = acc * rescale.transpose(0, 2, 1)[..., None] + update
  return m_new, l, acc


def _attend_blocks(attention: nnx.Module, q: jax.Array, cache: LayerCache, q_pos: jax.Array, end: jax.Array,
                   key_block: int) -> jax.Array:
  """Like _attend_whole_cache, visiting only the key blocks before position `end` (= offset + chunk)."""
  batch, chunk, heads, dim = q.shape
  heads_first = (batch, heads, chunk)

  def body(i, carry):
    start = i * key_block
    k, v = (jax.lax.dynamic_slice_in_dim(x, start, key_block, axis=1) for x in (cache.k, cache.v))
    mask = (start + jnp.arange(key_block, dtype=jnp.int32))[None, :] <= q_pos[:, None]
    k, v = repeat_kv_heads(k, attention.num_heads), repeat_kv_heads(v, attention.num_heads)
    return _block_step(q, k, v, mask, carry)

  init = (jnp.full(heads_first, _NEG_INF, jnp.float32), jnp.zeros(heads_first, jnp.float32),
          jnp.zeros((batch, chunk, heads, dim), jnp.float32))
  num_blocks = (end + key_block - 1) // key_block
  _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  return (acc / l.transpose(0, 2, 1)[..., None]).astype(q.dtype)  # key 0 is always visible: l > 0


def cached_forward(model: TransformerLM, tokens: jax.Array, cache: Cache, offset: int | jax.Array, *,
                   key_block: int | None = None) -> tuple[jax.Array, Cache]:
  """One chunk through the model, reading and extending the cache.

  Args:
    model: the TransformerLM (or a model merged from its graphdef and params).
    tokens: [batch, chunk] int tokens at absolute positions offset..offset+chunk-1.
    cache: from init_cache or a previous call; chunks before `offset` must already be in it.
    offset: int or int32 scalar (traced inside jit).
    key_block: None to attend over the whole cache at once, else a divisor of max_length:
      attend block by block, only up to the chunk's last position.
  Returns:
    (logits [batch, chunk, vocab] float32, cache with this chunk's rotated K and V written).
  """
  batch, chunk = tokens.shape
  max_length = cache_length(cache)
  check_room(offset, chunk, max_length)
  if key_block is not None and (key_block <= 0 or max_length % key_block):
    raise ValueError(f"key_block must be a positive divisor of the cache's max_length={max_length}, "
                     f"got {key_block}.")
  offset = jnp.asarray(offset, jnp.int32)
  q_pos = offset + jnp.arange(chunk, dtype=jnp.int32)
  positions = jnp.broadcast_to(q_pos, (batch, chunk))
  x = model.embed_tokens(tokens, deterministic=True, rngs=None)
  new_cache = []
  for layer, layer_cache in zip(model.layers, cache):
    attention = layer.attention
    q, k, v = attention.project_raw_qkv(layer.attention_norm(x))
    q, k = attention.rotate(q, k, positions)
    layer_cache = _write(layer_cache, k, v, offset)
    if key_block is None:
      attended = _attend_whole_cache(attention, q, layer_cache, q_pos)
    else:
      attended = _attend_blocks(attention, q, layer_cache, q_pos, offset + chunk, key_block)
    x = layer.add_attention_and_mlp(x, attention.out(attended), deterministic=True, rngs=None)
    new_cache.append(layer_cache)
  return model.hidden_to_logits(x), tuple(new_cache)


CachedApplyFn = Callable[[Any, jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]


def cached_apply_fn(graphdef: nnx.GraphDef, *, key_block: int | None = None) -> CachedApplyFn:
  """(params, tokens, cache, offset) -> (logits, cache), for jitting with params as an argument."""
  def apply(params, tokens, cache, offset):
    return cached_forward(nnx.merge(graphdef, params), tokens, cache, offset, key_block=key_block)
  return apply


class CachedLM:
  """Jitted cached_forward of one TransformerLM graph: compiles once per (chunk, cache) shape.

  The cache argument is donated (updated in place where the backend allows): do not reuse
  a cache after passing it in; use the returned one.
  """

  def __init__(self, graphdef: nnx.GraphDef, *, key_block: int | None = None):
    self.key_block = key_block
    self.num_traces = 0  # how many times a jitted function was traced (a test hook)
    apply = cached_apply_fn(graphdef, key_block=key_block)

    def counted(params, tokens, cache, offset):
      self.num_traces += 1
      return apply(params, tokens, cache, offset)

    self._forward = jax.jit(counted, donate_argnums=2)
    self._advance = jax.jit(lambda *args: counted(*args)[1], donate_argnums=2)

  def forward(self, params: Any, tokens: jax.Array, cache: Cache, offset: int) -> tuple[jax.Array, Cache]:
    """tokens [batch, chunk] at positions offset.. -> (logits [batch, chunk, vocab] float32, cache)."""
    check_room(offset, tokens.shape[1], cache_length(cache))
    return self._forward(params, tokens, cache, np.int32(offset))

  def advance(self, params: Any, tokens: jax.Array, cache: Cache, offset: int) -> Cache:
    """Like forward but returns only the cache (prefill: no logits are computed)."""
    check_room(offset, tokens.shape[1], cache_length(cache))
    return self._advance(params, tokens, cache, np.int32(offset))


def greedy_continue(lm: CachedLM, params: Any, cache: Cache, prompts: np.ndarray, num_tokens: int, *,
                    chunk: int) -> np.ndarray:
  """Prefills equal-length prompts [batch, length] chunk by chunk, then appends `num_tokens`
  argmax tokens one at a time -> [batch, num_tokens]. The cache must hold
  max(ceil(length / chunk) * chunk, length + num_tokens) positions."""
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
    token = np.asarray(jnp.argmax(last, axis=-1), np.int32)
    out.append(token)
    logits, cache = lm.forward(params, token[:, None], cache, length + t)
    last = logits[:, 0]
  return np.stack(out, axis=1)
