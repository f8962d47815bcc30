"""Dense decoder-only Transformer LM (RMSNorm, RoPE, causal attention, SwiGLU).

The baseline the memory-augmented models are compared against. Batches are the
output of seqio's DecoderFeatureConverter: `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights` [batch, time], plus
`decoder_segment_ids` / `decoder_positions` when packed.
"""

from __future__ import annotations

from typing import Mapping

import gin
import jax
import jax.numpy as jnp
from flax import linen as nn_partitioning
from flax import nnx

from memlm_jax.layers.attention import MultiHeadAttention
from memlm_jax.layers.transformer import DecoderBlock, rms_norm
from memlm_jax.losses.cross_entropy import weighted_cross_entropy


def segments_and_positions(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Segment ids and positions [batch, time]; derived from the targets when not packed."""
  if "decoder_segment_ids" in batch:
    return batch["decoder_segment_ids"], batch["decoder_positions"]
  targets = batch["decoder_target_tokens"]
  segment_ids = (targets != 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(targets.shape[1], dtype=jnp.int32), targets.shape)
  return segment_ids, positions


def check_positive_sizes(owner: str, **sizes: int) -> None:
  """Raises ValueError naming the first size that is not a positive int."""
  for name, value in sizes.items():
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}.")


class DecoderLMBase(nnx.Module):
  """Token embedding, final norm and logits head shared by the decoder-only LMs."""

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
    return nn_partitioning.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

  def hidden_to_logits(self, x: jax.Array) -> jax.Array:
    """x [batch, time, embed] (before the final norm) -> logits [batch, time, vocab] float32."""
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = self.embedding.attend(x) / jnp.sqrt(self.embed_dim).astype(x.dtype)
    else:
      logits = self.logits_head(x)
    logits = nn_partitioning.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
    return logits.astype(jnp.float32)


@gin.configurable
class TransformerLM(DecoderLMBase):
  """Decoder-only LM. Parameters are float32; `dtype` is the compute dtype."""

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
    for layer in self.layers:
      x = layer(x, segment_ids, positions, deterministic=deterministic, rngs=rngs)
    return self.hidden_to_logits(x)

  def loss(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
           rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross entropy over a converted batch (see module docstring)."""
    segment_ids, positions = segments_and_positions(batch)
    logits = self(batch["decoder_input_tokens"], segment_ids, positions, deterministic=deterministic, rngs=rngs)
    return weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
