"""Infini-attention (Munkhdalai, Faruqui, Gopal 2024, arXiv 2404.07143).

Per layer and key/value head, a compressive memory (M [d_k, d_v], z [d_k]) summarises
every earlier segment. Inside a segment of N tokens the layer computes

  A_dot = causal softmax attention over the segment (RoPE, positions from 0);
  A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})   (sigma = elu + 1; Q before RoPE);
  A     = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot   (beta: one per head);

then writes the segment into memory with the linear rule
M_s = M_{s-1} + sigma(K)^T V or the delta rule
M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1})), z_s = z_{s-1} + sum_t sigma(K_t).
M and z are float32 whatever the compute dtype: z grows with the number of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.attention import MultiHeadAttention

_HIGHEST = jax.lax.Precision.HIGHEST  # memory sums must not drop to bf16 passes on TPU


class InfiniMemory(NamedTuple):
  """Compressive memory of one layer: mem [batch, kv_heads, d_k, d_v], z [batch, kv_heads, d_k], float32."""
  mem: jax.Array
  z: jax.Array


def elu_plus_one(x: jax.Array) -> jax.Array:
  """sigma(x) = elu(x) + 1 > 0, in float32."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def memory_retrieve(q: jax.Array, mem: jax.Array, z: jax.Array) -> jax.Array:
  """A_mem = sigma(q) mem / (sigma(q) z).

  Args:
    q: [batch, heads, seq, d_k] raw queries (sigma is applied here).
    mem: [batch, heads, d_k, d_v].
    z: [batch, heads, d_k].
  Returns:
    [batch, heads, seq, d_v] float32; zero where the normalizer is zero (empty memory), with
    finite gradients there because the denominator is made safe before the division.
  """
  sigma_q = elu_plus_one(q)
  numerator = jnp.einsum("bhnk,bhkv->bhnv", sigma_q, mem.astype(jnp.float32), precision=_HIGHEST)
  denominator = jnp.einsum("bhnk,bhk->bhn", sigma_q, z.astype(jnp.float32), precision=_HIGHEST)
  has_memory = denominator > 0
  safe = jnp.where(has_memory, denominator, 1.0)
  return jnp.where(has_memory[..., None], numerator / safe[..., None], 0.0)


def memory_update(k: jax.Array, v: jax.Array, mem: jax.Array, z: jax.Array, delta: bool,
                  mask: jax.Array | None = None,
                  write_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Writes one segment into memory (linear or delta rule).

  Args:
    k: [batch, heads, seq, d_k] raw keys; v: [batch, heads, seq, d_v].
    mem: [batch, heads, d_k, d_v]; z: [batch, heads, d_k].
    delta: use the delta rule (write only what memory does not already retrieve for k).
    mask: optional [batch, seq], 1 for tokens to write, 0 for padding (written as nothing).
    write_weights: optional [batch, seq] float, each token's sigma(k) is scaled by it in both
      mem and z (1: the plain write). Under the linear rule, weight r equals writing the
      token r times; training uses it to simulate haystacks longer than the sequence.
  Returns:
    (new_mem [batch, heads, d_k, d_v], new_z [batch, heads, d_k]) float32.
  """
  sigma_k = elu_plus_one(k)
  values = v.astype(jnp.float32)
  if delta:
    values = values - memory_retrieve(k, mem, z)
  if mask is not None:
    sigma_k = sigma_k * mask.astype(jnp.float32)[:, None, :, None]
  if write_weights is not None:
    sigma_k = sigma_k * write_weights.astype(jnp.float32)[:, None, :, None]
  new_mem = mem.astype(jnp.float32) + jnp.einsum("bhnk,bhnv->bhkv", sigma_k, values, precision=_HIGHEST)
  new_z = z.astype(jnp.float32) + sigma_k.sum(axis=2)
  return new_mem, new_z


def empty_memory(batch_size: int, kv_heads: int, key_dim: int, value_dim: int) -> InfiniMemory:
  """Zero memory for `batch_size` rows."""
  return InfiniMemory(jnp.zeros((batch_size, kv_heads, key_dim, value_dim), jnp.float32),
                      jnp.zeros((batch_size, kv_heads, key_dim), jnp.float32))


def _retrieve_grouped(q: jax.Array, memory: InfiniMemory) -> jax.Array:
  """q [batch, time, heads, d] -> A_mem [batch, time, heads, d_v]; query head j reads the memory
  of key/value head j // group. Only the (group, time) axes are merged, and retrieval is
  position-wise, so no position ever sees another."""
  batch, time, heads, dim = q.shape
  kv_heads = memory.mem.shape[1]
  group = heads // kv_heads
  grouped = q.reshape(batch, time, kv_heads, group, dim).transpose(0, 2, 3, 1, 4)
  grouped = grouped.reshape(batch, kv_heads, group * time, dim)
  out = memory_retrieve(grouped, memory.mem, memory.z)
  out = out.reshape(batch, kv_heads, group, time, -1).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, time, heads, -1)


@gin.configurable
class InfiniAttention(MultiHeadAttention):
  """Multi-head attention with a compressive memory per key/value head and a learned gate.

  Same parameters as MultiHeadAttention (so a memory-off model is the dense model restricted
  to a segment) plus `gate` [heads] (beta). Give `gate` its own learning-rate multiplier and
  no weight decay through make_optimizer's parameter groups (regex 'gate').
  """

  def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
               update_rule: str = "delta", use_memory: bool = True, gate_init: float = 0.0,
               rope_max_wavelength: float = 10_000.0, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(embed_dim, num_heads, head_dim, num_kv_heads=num_kv_heads,
                     rope_max_wavelength=rope_max_wavelength, dtype=dtype, rngs=rngs)
    if update_rule not in ("linear", "delta"):
      raise ValueError(f"InfiniAttention.update_rule must be 'linear' or 'delta', got {update_rule!r}.")
    self.update_rule = update_rule
    self.use_memory = use_memory
    if use_memory:
      init = nnx.with_partitioning(nnx.initializers.constant(gate_init), ("heads",))
      self.gate = nnx.Param(init(rngs.params(), (num_heads,), jnp.float32))

  def init_memory(self, batch_size: int) -> InfiniMemory:
    return empty_memory(batch_size, self.num_kv_heads, self.head_dim, self.head_dim)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, state: InfiniMemory | None = None, *,
               write_weights: jax.Array | None = None) -> tuple[jax.Array, InfiniMemory]:
    """One segment (MultiHeadAttention's call, with the memory as the state).

    Args:
      x: [batch, seg_len, embed].
      mask: [batch, 1, seg_len, seg_len] bool, the local attention mask (causal_segment_mask of the
        segment's 0/1 token mask). A token is written into memory iff the mask lets it see itself,
        so padding is neither attended to nor written.
      positions: [batch, seg_len] RoPE positions of the local attention (0..seg_len-1).
      state: the memory before this segment; None is the empty memory.
      write_weights: optional [batch, seg_len] float, each token's weight in the memory write
        (see memory_update); None writes every real token once.
    Returns:
      ([batch, seg_len, embed], memory after this segment).
    """
    memory = self.init_memory(x.shape[0]) if state is None else state
    q, k, v = self.project_raw_qkv(x)
    local, _ = self.attend(q, k, v, mask, positions)
    if not self.use_memory:
      return self.out(local), memory
    retrieved = _retrieve_grouped(q, memory)
    gate = jax.nn.sigmoid(self.gate[...])[:, None]  # [heads, 1]
    combined = gate * retrieved + (1.0 - gate) * local.astype(jnp.float32)
    to_heads_first = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731  [b, t, h, d] -> [b, h, t, d]
    written = jnp.diagonal(mask[:, 0], axis1=-2, axis2=-1)  # [batch, seg_len]
    new_mem, new_z = memory_update(to_heads_first(k), to_heads_first(v), memory.mem, memory.z,
                                   delta=self.update_rule == "delta", mask=written, write_weights=write_weights)
    return self.out(combined.astype(self.dtype)), InfiniMemory(new_mem, new_z)
