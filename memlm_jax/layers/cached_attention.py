"""One layer's preallocated key/value cache and the softmax attention over it.

Chunked decoding feeds a sequence `chunk` tokens at a time at absolute positions
offset..offset+chunk-1. MultiHeadAttention rotates the chunk's keys at those positions and
hands q, k, v to the layer's KVCache, which writes K and V at `offset` and lets every query
attend to the cached keys at absolute positions <= its own. Entries past the current
position (zeros, or stale values from an earlier stream) are masked by position, so a cache
can be reused from offset 0 without clearing it.

Attention over the cache is either one softmax over the whole preallocated cache
(`key_block=None`: work per chunk grows with max_length) or an online softmax over key
blocks of `key_block` positions that stops after the block holding the chunk's last
position (work per chunk grows with offset + chunk; the benchmark path).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from memlm_jax.layers.attention import NEG_INF, dot_product_attention, repeat_kv_heads


def check_room(offset: int | jax.Array, chunk: int, max_length: int) -> None:
  """Raises ValueError when positions offset..offset+chunk-1 do not fit a cache of max_length.

  A traced offset cannot be checked here; decoding.kv_cache.CachedLM checks before calling its
  jitted functions.
  """
  if isinstance(offset, jax.core.Tracer):
    return
  offset = int(offset)
  if offset < 0 or offset + chunk > max_length:
    raise ValueError(f"KV cache overflow: a chunk of {chunk} tokens at offset {offset} needs positions "
                     f"{offset}..{offset + chunk - 1}, but the cache holds max_length={max_length} "
                     f"(positions 0..{max_length - 1}); allocate a longer cache.")


def _block_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, carry: tuple) -> tuple:
  """Folds one key block into the online-softmax state (running max m, sum l [b, h, q], acc [b, q, h, d]).

  q [b, q, h, d]; k, v [b, block, h, d]; mask [q, block] bool.
  """
  m, l, acc = carry
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  logits = jnp.where(mask, logits, NEG_INF)
  m_new = jnp.maximum(m, logits.max(axis=-1))
  weights = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
  rescale = jnp.exp(m - m_new)
  l = l * rescale + weights.sum(axis=-1)
  update = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc = acc * rescale.transpose(0, 2, 1)[..., None] + update
  return m_new, l, acc


@flax.struct.dataclass
class KVCache:
  """One layer's cache.

  k, v: [batch, max_length, kv_heads, head_dim], rotated keys and values in the compute dtype.
  key_block (static): None to attend over the whole cache at once, else a divisor of max_length:
    attend block by block, only up to the chunk's last position.
  """
  k: jax.Array
  v: jax.Array
  key_block: int | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def zeros(cls, batch_size: int, max_length: int, kv_heads: int, head_dim: int, dtype: jnp.dtype, *,
            key_block: int | None = None) -> KVCache:
    """Zero k, v [batch_size, max_length, kv_heads, head_dim] of `dtype`."""
    if key_block is not None and (key_block <= 0 or max_length % key_block):
      raise ValueError(f"key_block must be a positive divisor of the cache's max_length={max_length}, "
                       f"got {key_block}.")
    shape = (batch_size, max_length, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), key_block)

  @property
  def max_length(self) -> int:
    return self.k.shape[1]

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> tuple[jax.Array, KVCache]:
    """Writes one chunk's k, v at its positions, then attends its queries over the cache.

    Args:
      q: [batch, chunk, heads, head_dim] rotated queries.
      k, v: [batch, chunk, kv_heads, head_dim], k rotated.
      positions: [batch, chunk], offset..offset+chunk-1 in every row.
    Returns:
      (attended [batch, chunk, heads, head_dim] in q.dtype, the cache with the chunk written).
    """
    q_pos = positions[0]
    start = (0, q_pos[0], 0, 0)
    cache = self.replace(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                         v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start))
    if self.key_block is None:
      return cache._attend_whole(q, q_pos), cache
    return cache._attend_blocks(q, q_pos), cache

  def _attend_whole(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
    """q [batch, chunk, heads, dim] over every cached key at a position <= its own (q_pos [chunk])."""
    heads = q.shape[2]
    k_pos = jnp.arange(self.max_length, dtype=jnp.int32)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, chunk, max_length]
    return dot_product_attention(q, repeat_kv_heads(self.k, heads), repeat_kv_heads(self.v, heads), mask)

  def _attend_blocks(self, q: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Like _attend_whole, visiting only the key blocks before the chunk's end (q_pos[-1] + 1)."""
    batch, chunk, heads, dim = q.shape
    key_block = self.key_block
    heads_first = (batch, heads, chunk)

    def body(i, carry):
      start = i * key_block
      k, v = (jax.lax.dynamic_slice_in_dim(x, start, key_block, axis=1) for x in (self.k, self.v))
      mask = (start + jnp.arange(key_block, dtype=jnp.int32))[None, :] <= q_pos[:, None]
      k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
      return _block_step(q, k, v, mask, carry)

    init = (jnp.full(heads_first, NEG_INF, jnp.float32), jnp.zeros(heads_first, jnp.float32),
            jnp.zeros((batch, chunk, heads, dim), jnp.float32))
    end = q_pos[-1] + 1
    num_blocks = (end + key_block - 1) // key_block
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    return (acc / l.transpose(0, 2, 1)[..., None]).astype(q.dtype)  # key 0 is always visible: l > 0


def cache_length(cache: Sequence[KVCache]) -> int:
  """max_length of a model's cache (one KVCache per layer)."""
  return cache[0].max_length
