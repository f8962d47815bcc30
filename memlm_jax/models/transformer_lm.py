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


@gin.configurable
class TransformerLM(nnx.Module):
  """Decoder-only LM. Parameters are float32; `dtype` is the compute dtype."""

  def __init__(self, vocab_size: int = gin.REQUIRED, embed_dim: int = gin.REQUIRED, num_layers: int = gin.REQUIRED,
               num_heads: int = gin.REQUIRED, head_dim: int = gin.REQUIRED, mlp_dim: int = gin.REQUIRED, *,
               dropout_rate: float = 0.0, tie_embeddings: bool = False, rope_max_wavelength: float = 10_000.0,
               dtype: str | jnp.dtype = "float32", rngs: nnx.Rngs):
    for name, value in dict(vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers,
                            num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim).items():
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"TransformerLM.{name} must be a positive int, got {value!r}.")
    dtype = jnp.dtype(dtype)
    self.vocab_size = vocab_size
    self.embed_dim = embed_dim
    self.num_layers = num_layers
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.mlp_dim = mlp_dim
    self.tie_embeddings = tie_embeddings
    self.dtype = dtype
    self.embedding = nnx.Embed(vocab_size, embed_dim, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
                               rngs=rngs)
    self.layers = nnx.List([
        DecoderBlock(embed_dim, mlp_dim,
                     MultiHeadAttention(embed_dim, num_heads, head_dim, rope_max_wavelength=rope_max_wavelength,
                                        dtype=dtype, rngs=rngs),
                     dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.final_norm = rms_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    if not tie_embeddings:
      self.logits_head = nnx.Linear(embed_dim, vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                      ("embed", "vocab")), rngs=rngs)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """tokens, segment_ids, positions: [batch, time] -> logits [batch, time, vocab] float32."""
    x = self.embedding(tokens)
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    x = nn_partitioning.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    for layer in self.layers:
      x = layer(x, segment_ids, positions, deterministic=deterministic, rngs=rngs)
    x = self.final_norm(x)
    if self.tie_embeddings:
      logits = self.embedding.attend(x) / jnp.sqrt(self.embed_dim).astype(x.dtype)
    else:
      logits = self.logits_head(x)
    logits = nn_partitioning.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
    return logits.astype(jnp.float32)

  def loss(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
           rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross entropy over a converted batch (see module docstring)."""
    segment_ids, positions = segments_and_positions(batch)
    logits = self(batch["decoder_input_tokens"], segment_ids, positions, deterministic=deterministic, rngs=rngs)
    return weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style."""
    matmul_params = self.num_layers * (4 * self.embed_dim * self.num_heads * self.head_dim
                                       + 3 * self.embed_dim * self.mlp_dim) + self.embed_dim * self.vocab_size
    attention = self.num_layers * 2 * self.num_heads * self.head_dim * seq_len  # QK^T and AV, causal-unaware
    return 3 * (2 * matmul_params + 2 * attention)
