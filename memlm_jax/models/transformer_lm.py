"""Dense decoder-only Transformer LM (RMSNorm, RoPE, causal attention, SwiGLU).

The baseline the memory-augmented models are compared against. Batches are the
output of seqio's DecoderFeatureConverter: `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights` [batch, time], plus
`decoder_segment_ids` / `decoder_positions` when packed.

Decoding interface (DecodingMode.KV_CACHE): `init_cache(batch, max_length)` and
`extend(tokens, cache, offset)`, a chunk of tokens through the model reading and extending a
preallocated key/value cache; `extend_apply_fn` wraps it for decoding.kv_cache.CachedLM.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.attention import MultiHeadAttention, causal_segment_mask
from memlm_jax.layers.cached_attention import KVCache, cache_length, check_room
from memlm_jax.layers.checks import check_positive_sizes
from memlm_jax.layers.sharding_names import EMBED_ACTIVATIONS, LOGIT_ACTIVATIONS, constrain
from memlm_jax.layers.transformer import DecoderBlock, rms_norm
from memlm_jax.losses.cross_entropy import weighted_cross_entropy

Cache = tuple[KVCache, ...]  # one per layer


def segments_and_positions(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Segment ids and positions [batch, time]; derived from the targets when not packed."""
  if "decoder_segment_ids" in batch:
    return batch["decoder_segment_ids"], batch["decoder_positions"]
  targets = batch["decoder_target_tokens"]
  segment_ids = (targets != 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(targets.shape[1], dtype=jnp.int32), targets.shape)
  return segment_ids, positions


class DecodingMode(enum.Enum):
  """The decoding interface a decoder-only LM declares (DecoderLMBase.decoding_mode)."""
  KV_CACHE = "kv_cache"  # init_cache(batch, max_length); extend(tokens, cache, offset) -> (logits, cache)
  MEMORY_STREAM = "memory_stream"  # init_memory(batch); (tokens, memory, mask) -> (logits, memory) by segments


class DecoderLMBase(nnx.Module):
  """Token embedding, the stack of decoder blocks, final norm and logits head shared by the
  decoder-only LMs. A subclass sets `decoding_mode` and `label` (a short name for reports)."""

  decoding_mode: DecodingMode

  def _init_io(self, vocab_size: int, embed_dim: int, *, dropout_rate: float, tie_embeddings: bool,
               dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
    self.vocab_size = vocab_size
    self.embed_dim = embed_dim
    self.tie_embeddings = tie_embeddings
    self.dtype = dtype
    self.embedding = nnx.Embed(vocab_size, embed_dim, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
                               rngs=rngs)
    self.final_norm = rms_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    if not tie_embeddings:
      self.logits_head = nnx.Linear(embed_dim, vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                      ("embed", "vocab")), rngs=rngs)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  def _init_sizes(self, num_layers: int, num_heads: int, num_kv_heads: int | None, head_dim: int,
                  mlp_dim: int) -> None:
    self.num_layers = num_layers
    self.num_heads = num_heads
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.head_dim = head_dim
    self.mlp_dim = mlp_dim

  def attended_length(self, seq_len: int) -> int:
    """How many keys a query attends to (for FLOP counts)."""
    return seq_len

  def extra_flops_per_token(self) -> float:
    """Forward FLOPs per token outside the matmuls and softmax attention (e.g. memory)."""
    return 0.0

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style."""
    e, d = self.embed_dim, self.head_dim
    matmul_params = self.num_layers * (2 * e * d * (self.num_heads + self.num_kv_heads) + 3 * e * self.mlp_dim)
    matmul_params += e * self.vocab_size
    attention = self.num_layers * 2 * self.num_heads * d * self.attended_length(seq_len)  # causal-unaware
    return 3 * (2 * matmul_params + 2 * attention + self.extra_flops_per_token())

  def embed_tokens(self, tokens: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """tokens [batch, time] -> [batch, time, embed] in the compute dtype."""
    x = self.dropout(self.embedding(tokens), deterministic=deterministic, rngs=rngs)
    return constrain(x, EMBED_ACTIVATIONS)

  def run_layers(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array, states: Sequence[Any], *,
                 deterministic: bool, rngs: nnx.Rngs | None,
                 **attention_kwargs: jax.Array | None) -> tuple[jax.Array, tuple[Any, ...]]:
    """x [batch, time, embed] through every DecoderBlock, each with its attention state (None, a
    KVCache or an Infini memory) -> (x [batch, time, embed] before the final norm, the new states)."""
    new_states = []
    for layer, state in zip(self.layers, states, strict=True):
      x, state = layer(x, mask, positions, state, deterministic=deterministic, rngs=rngs, **attention_kwargs)
      new_states.append(state)
    return x, tuple(new_states)

  def hidden_to_logits(self, x: jax.Array) -> jax.Array:
    """x [batch, time, embed] (before the final norm) -> logits [batch, time, vocab] float32."""
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = self.embedding.attend(x) / jnp.sqrt(self.embed_dim).astype(x.dtype)
    else:
      logits = self.logits_head(x)
    return constrain(logits, LOGIT_ACTIVATIONS).astype(jnp.float32)


@gin.configurable
class TransformerLM(DecoderLMBase):
  """Decoder-only LM. Parameters are float32; `dtype` is the compute dtype."""

  decoding_mode = DecodingMode.KV_CACHE

  def __init__(self, vocab_size: int = gin.REQUIRED, embed_dim: int = gin.REQUIRED, num_layers: int = gin.REQUIRED,
               num_heads: int = gin.REQUIRED, head_dim: int = gin.REQUIRED, mlp_dim: int = gin.REQUIRED, *,
               num_kv_heads: int | None = None, dropout_rate: float = 0.0, tie_embeddings: bool = False,
               rope_max_wavelength: float = 10_000.0, dtype: str | jnp.dtype = "float32", rngs: nnx.Rngs):
    check_positive_sizes("TransformerLM", vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers,
                         num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim)
    dtype = jnp.dtype(dtype)
    self._init_io(vocab_size, embed_dim, dropout_rate=dropout_rate, tie_embeddings=tie_embeddings, dtype=dtype,
                  rngs=rngs)
    self._init_sizes(num_layers, num_heads, num_kv_heads, head_dim, mlp_dim)
    self.layers = nnx.List([
        DecoderBlock(embed_dim, mlp_dim,
                     MultiHeadAttention(embed_dim, num_heads, head_dim, num_kv_heads=num_kv_heads,
                                        rope_max_wavelength=rope_max_wavelength, dtype=dtype, rngs=rngs),
                     dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)
    ])

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """tokens, segment_ids, positions: [batch, time] -> logits [batch, time, vocab] float32."""
    x = self.embed_tokens(tokens, deterministic=deterministic, rngs=rngs)
    x, _ = self.run_layers(x, causal_segment_mask(segment_ids), positions, (None,) * len(self.layers),
                           deterministic=deterministic, rngs=rngs)
    return self.hidden_to_logits(x)

  @property
  def label(self) -> str:
    return "dense"

  def init_cache(self, batch_size: int, max_length: int, *, key_block: int | None = None) -> Cache:
    """Zero cache of every layer: k, v [batch, max_length, kv_heads, head_dim] in the compute dtype.

    key_block: None to attend over the whole cache in each extend, else a divisor of max_length:
    attend block by block, only up to the chunk's last position (see layers/cached_attention.py).
    """
    return tuple(KVCache.zeros(batch_size, max_length, self.num_kv_heads, self.head_dim, self.dtype,
                               key_block=key_block) for _ in range(self.num_layers))

  def cache_bytes(self, batch_size: int, max_length: int) -> int:
    """Bytes of the cache init_cache would allocate (nothing is allocated)."""
    per_tensor = batch_size * max_length * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
    return 2 * self.num_layers * per_tensor

  def extend(self, tokens: jax.Array, cache: Cache, offset: int | jax.Array) -> tuple[jax.Array, Cache]:
    """One chunk through the model, reading and extending the cache (inference: no dropout).

    Args:
      tokens: [batch, chunk] int tokens at absolute positions offset..offset+chunk-1.
      cache: from init_cache or a previous call; chunks before `offset` must already be in it.
      offset: int or int32 scalar (traced inside jit).
    Returns:
      (logits [batch, chunk, vocab] float32, the cache with this chunk's rotated K and V written).
    """
    batch, chunk = tokens.shape
    check_room(offset, chunk, cache_length(cache))
    offset = jnp.asarray(offset, jnp.int32)
    positions = jnp.broadcast_to(offset + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    x = self.embed_tokens(tokens, deterministic=True, rngs=None)
    x, cache = self.run_layers(x, None, positions, cache, deterministic=True, rngs=None)
    return self.hidden_to_logits(x), cache

  def loss(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
           rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross entropy over a converted batch (see module docstring)."""
    segment_ids, positions = segments_and_positions(batch)
    logits = self(batch["decoder_input_tokens"], segment_ids, positions, deterministic=deterministic, rngs=rngs)
    return weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])

  def init_carry(self, batch_size: int) -> tuple:
    """Nothing is carried between steps over long documents: each chunk is read on its own."""
    del batch_size
    return ()

  def carried_loss(self, batch: Mapping[str, jax.Array], carry: tuple, *, per_row: bool = False,
                   deterministic: bool = True, rngs: nnx.Rngs | None = None) -> tuple[dict[str, jax.Array], tuple]:
    """The loss sums of one chunk per lane of the long-document reader (see InfiniTransformerLM.carried_loss),
    attending within the chunk only: the dense model's context budget is one step."""
    segment_ids, positions = segments_and_positions(batch)
    logits = self(batch["decoder_input_tokens"], segment_ids, positions, deterministic=deterministic, rngs=rngs)
    return weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
                                  per_row=per_row), carry


ExtendFn = Callable[[Any, jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]


def extend_apply_fn(graphdef: nnx.GraphDef) -> ExtendFn:
  """(params, tokens, cache, offset) -> (logits, cache): TransformerLM.extend for decoding.kv_cache.CachedLM."""
  def apply(params, tokens, cache, offset):
    return nnx.merge(graphdef, params).extend(tokens, cache, offset)
  return apply
