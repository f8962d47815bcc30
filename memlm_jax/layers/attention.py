"""Multi-head softmax attention with rotary position embeddings.

One MultiHeadAttention serves every model: the caller gives the mask (causal over packed
segments for the LMs, bidirectional over valid frames for the Conformer), and chunked
decoding gives a KVCache (layers/cached_attention.py) instead of a mask.

Logical axis names used here: parameters `embed`, `heads`, `kv`; activations
sharding_names.HEAD_ACTIVATIONS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.sharding_names import HEAD_ACTIVATIONS, constrain

if TYPE_CHECKING:  # cached_attention imports this module's functions
  from memlm_jax.layers.cached_attention import KVCache

NEG_INF = -1e30


def rotary_embedding(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
  """Rotates pairs of channels by position-dependent angles (RoFormer, half-split layout).

  Args:
    x: [batch, time, heads, head_dim], head_dim even.
    positions: [batch, time] integer positions.
  Returns:
    [batch, time, heads, head_dim] in x.dtype.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary_embedding needs an even head_dim, got {head_dim}.")
  half = head_dim // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, t, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
  """Mask allowing position q to see k <= q within the same (non-zero) segment.

  Args:
    segment_ids: [batch, time] ints; 0 marks padding, packed examples have distinct ids.
  Returns:
    [batch, 1, time, time] bool.
  """
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  not_pad = (segment_ids != 0)[:, :, None]
  return (causal[None] & same_segment & not_pad)[:, None]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention with the softmax in float32.

  Args:
    query: [batch, q_time, heads, head_dim].
    key, value: [batch, k_time, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_time, k_time].
  Returns:
    [batch, q_time, heads, head_dim] in query.dtype. Rows with nothing visible are zero.
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1)
  weights = jnp.where(mask, weights, 0.0)  # fully-masked (padding) rows attend to nothing
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)


def repeat_kv_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[batch, time, kv_heads, dim] -> [batch, time, num_heads, dim]; query head j uses kv head j // group."""
  group = num_heads // x.shape[2]
  return x if group == 1 else jnp.repeat(x, group, axis=2)


@gin.configurable
class MultiHeadAttention(nnx.Module):
  """Self-attention with RoPE over packed or padded sequences, under the mask the caller gives;
  grouped-query attention when `num_kv_heads` < `num_heads` (query head j attends with key/value
  head j // group)."""

  def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
               rope_max_wavelength: float = 10_000.0, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={num_heads}, got {num_kv_heads}.")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_max_wavelength = rope_max_wavelength
    self.dtype = dtype
    in_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "heads", "kv"))
    out_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("heads", "kv", "embed"))

    def proj_in(heads):
      return nnx.LinearGeneral(embed_dim, (heads, head_dim), axis=-1, use_bias=False, kernel_init=in_init,
                               dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    self.query, self.key, self.value = proj_in(num_heads), proj_in(num_kv_heads), proj_in(num_kv_heads)
    self.out = nnx.LinearGeneral((num_heads, head_dim), embed_dim, axis=(-2, -1), use_bias=False,
                                 kernel_init=out_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def project_raw_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [batch, time, embed] -> q [batch, time, heads, head_dim], k, v [batch, time, kv_heads, head_dim],
    before RoPE."""
    return tuple(constrain(proj(x), HEAD_ACTIVATIONS) for proj in (self.query, self.key, self.value))

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, positions: jax.Array,
             cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Rotates raw q, k at `positions`, then softmax attention over this call's keys or over a cache.

    Args:
      q: [batch, time, heads, head_dim]; k, v: [batch, time, kv_heads, head_dim], before RoPE.
      mask: without a cache, bool broadcastable to [batch, heads, time, time], which keys each query
        sees; with a cache None (a query sees every cached key at a position <= its own).
      positions: [batch, time] absolute positions (with a cache: offset..offset+time-1 in every row).
      cache: None, or this layer's KVCache, which receives this call's k and v.
    Returns:
      (attended [batch, time, heads, head_dim] in q.dtype, before the output projection;
       the cache with this call's keys and values written, or None).
    """
    q = rotary_embedding(q, positions, self.rope_max_wavelength)
    k = rotary_embedding(k, positions, self.rope_max_wavelength)
    if cache is not None:
      if mask is not None:
        raise ValueError("MultiHeadAttention: with a KV cache the mask must be None (visibility follows the "
                         "positions).")
      return cache.attend(q, k, v, positions)
    heads = self.num_heads
    return dot_product_attention(q, repeat_kv_heads(k, heads), repeat_kv_heads(v, heads), mask), None

  def __call__(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array,
               state: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """x: [batch, time, embed]; mask and positions as in `attend`; state: an optional KVCache.

    Returns:
      (out [batch, time, embed], the cache after this call or None).
    """
    q, k, v = self.project_raw_qkv(x)
    attended, state = self.attend(q, k, v, mask, positions, state)
    return self.out(attended), state
