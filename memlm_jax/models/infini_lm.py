"""Infini-Transformer LM: decoder blocks with Infini-attention, run over fixed-length segments.

A sequence of `time` tokens (a multiple of `segment_length`) is cut into segments; one
`lax.scan` walks them, carrying the compressive memory (M, z) of every layer. Each
segment's body is rematerialised in the backward pass, so activation memory is one
segment's, while gradients still flow through M and z into earlier segments.

Training batches come from seqio's DecoderFeatureConverter unpacked (pack=False):
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` [batch, time].

Decoding interface (DecodingMode.MEMORY_STREAM): `init_memory(batch)` and the call
`(tokens, memory, mask) -> (logits, memory)` over whole segments; `streaming_apply_fn`
wraps it for decoding.lm_decoding.MemoryStreamer.

Training over whole documents (data/long_documents.py): `init_carry(batch)` and
`carried_loss(batch, carry)` take the memory from the previous step and return the memory after
this one; a lane whose `start_of_sequence` is 1 starts from an empty memory. The trainer passes the
memory on as data, so gradients stop at the step boundary (Transformer-XL / meliad style).
"""

from __future__ import annotations

from typing import Callable, Mapping

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.attention import causal_segment_mask
from memlm_jax.layers.checks import check_positive_sizes
from memlm_jax.layers.infini_attention import InfiniAttention, InfiniMemory
from memlm_jax.layers.transformer import DecoderBlock
from memlm_jax.losses.cross_entropy import weighted_cross_entropy
from memlm_jax.models.transformer_lm import DecoderLMBase, DecodingMode

Memory = tuple[InfiniMemory, ...]  # one per layer
WRITE_WEIGHTS = "memory_write_weights"  # optional batch feature [batch, time], see InfiniTransformerLM.loss


@gin.configurable
class InfiniTransformerLM(DecoderLMBase):
  """Decoder-only LM with Infini-attention in every layer.

  `update_rule` is 'linear' or 'delta'; `use_memory=False` gives the dense model restricted
  to each segment (same parameters minus the gates). `gate_init` is beta's initial value.
  """

  decoding_mode = DecodingMode.MEMORY_STREAM

  def __init__(self, vocab_size: int = gin.REQUIRED, embed_dim: int = gin.REQUIRED, num_layers: int = gin.REQUIRED,
               num_heads: int = gin.REQUIRED, head_dim: int = gin.REQUIRED, mlp_dim: int = gin.REQUIRED,
               segment_length: int = gin.REQUIRED, *, num_kv_heads: int | None = None, update_rule: str = "delta",
               use_memory: bool = True, gate_init: float = 0.0, dropout_rate: float = 0.0,
               tie_embeddings: bool = False, rope_max_wavelength: float = 10_000.0, remat: bool = True,
               dtype: str | jnp.dtype = "float32", rngs: nnx.Rngs):
    check_positive_sizes("InfiniTransformerLM", vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers,
                         num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim, segment_length=segment_length)
    dtype = jnp.dtype(dtype)
    self._init_io(vocab_size, embed_dim, dropout_rate=dropout_rate, tie_embeddings=tie_embeddings, dtype=dtype,
                  rngs=rngs)
    self._init_sizes(num_layers, num_heads, num_kv_heads, head_dim, mlp_dim)
    self.segment_length = segment_length
    self.update_rule = update_rule
    self.use_memory = use_memory
    self.remat = remat
    self.layers = nnx.List([
        DecoderBlock(embed_dim, mlp_dim,
                     InfiniAttention(embed_dim, num_heads, head_dim, num_kv_heads=num_kv_heads,
                                     update_rule=update_rule, use_memory=use_memory, gate_init=gate_init,
                                     rope_max_wavelength=rope_max_wavelength, dtype=dtype, rngs=rngs),
                     dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)
    ])

  @property
  def label(self) -> str:
    return f"Infini ({self.update_rule})"

  def init_memory(self, batch_size: int) -> Memory:
    """Empty memory of every layer: M [batch, kv_heads, head_dim, head_dim], z [batch, kv_heads, head_dim]."""
    return tuple(layer.attention.init_memory(batch_size) for layer in self.layers)

  def attended_length(self, seq_len: int) -> int:
    return min(seq_len, self.segment_length)

  def extra_flops_per_token(self) -> float:
    # Retrieval per query head and the update per key/value head: 2 * d_k * d_v each.
    if not self.use_memory:
      return 0.0
    return self.num_layers * 2 * self.head_dim * self.head_dim * (self.num_heads + self.num_kv_heads)

  def _segment(self, tokens: jax.Array, memory: Memory, mask: jax.Array, write_weights: jax.Array | None,
               deterministic: bool, rngs: nnx.Rngs | None) -> tuple[jax.Array, Memory]:
    """tokens, mask, write_weights [batch, seg_len] -> (hidden [batch, seg_len, embed] before the final norm,
    memory)."""
    x = self.embed_tokens(tokens, deterministic=deterministic, rngs=rngs)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # from 0 per segment
    return self.run_layers(x, causal_segment_mask(mask), positions, memory, deterministic=deterministic, rngs=rngs,
                           write_weights=write_weights)

  def __call__(self, tokens: jax.Array, memory: Memory | None = None, mask: jax.Array | None = None, *,
               write_weights: jax.Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Memory]:
    """Runs the segments of `tokens` in order, starting from `memory` (empty if None).

    Args:
      tokens: [batch, time] int, time a multiple of segment_length.
      memory: the state returned by a previous call (streaming) or None.
      mask: [batch, time], 1 for real tokens, 0 for padding (padding is neither attended to nor
        written into memory); None means all real.
      write_weights: optional [batch, time] float, each token's weight in the memory writes
        (memory_update); None writes every real token once. A training-time feature: the
        passkey task uses it to make filler segments count as a longer haystack.
    Returns:
      (logits [batch, time, vocab] float32, memory after the last segment).
    """
    batch, time = tokens.shape
    if time % self.segment_length:
      raise ValueError(f"InfiniTransformerLM: time={time} is not a multiple of segment_length="
                       f"{self.segment_length}; pad the tokens (with a 0 mask) to a multiple of it.")
    num_segments = time // self.segment_length
    memory = self.init_memory(batch) if memory is None else memory
    mask = jnp.ones((batch, time), jnp.int32) if mask is None else mask.astype(jnp.int32)

    def by_segment(x):  # [batch, time, ...] -> [segments, batch, seg_len, ...]
      return jnp.swapaxes(x.reshape(batch, num_segments, self.segment_length, *x.shape[2:]), 0, 1)

    segments = {"tokens": by_segment(tokens), "mask": by_segment(mask)}
    if write_weights is not None:
      segments["write_weights"] = by_segment(write_weights.astype(jnp.float32))
    if not deterministic:  # scan bodies cannot advance an outer Rngs: one dropout key per segment
      segments["dropout"] = jax.random.split(rngs.dropout(), num_segments)

    def body(carry, inputs):
      segment_rngs = nnx.Rngs(dropout=inputs["dropout"]) if not deterministic else None
      hidden, carry = self._segment(inputs["tokens"], carry, inputs["mask"], inputs.get("write_weights"),
                                    deterministic, segment_rngs)
      return carry, hidden

    if self.remat:
      body = jax.checkpoint(body)
    memory, hidden = jax.lax.scan(body, memory, segments)
    hidden = jnp.swapaxes(hidden, 0, 1).reshape(batch, time, self.embed_dim)
    return self.hidden_to_logits(hidden), memory

  def loss(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
           rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross entropy; every example starts with an empty memory.

    An optional `memory_write_weights` [batch, time] feature (aligned with
    decoder_input_tokens) scales each token's memory write; absent, every token is written once.
    """
    if "decoder_segment_ids" in batch:
      raise ValueError("InfiniTransformerLM needs unpacked examples (its memory would carry one document "
                       "into the next); set DatasetConfig.pack = False.")
    targets = batch["decoder_target_tokens"]
    logits, _ = self(batch["decoder_input_tokens"], mask=targets != 0, write_weights=batch.get(WRITE_WEIGHTS),
                     deterministic=deterministic, rngs=rngs)
    return weighted_cross_entropy(logits, targets, batch["decoder_loss_weights"])


  def init_carry(self, batch_size: int) -> Memory:
    """The state carried between training steps over long documents: an empty memory."""
    return self.init_memory(batch_size)

  def carried_loss(self, batch: Mapping[str, jax.Array], carry: Memory, *, per_row: bool = False,
                   deterministic: bool = True, rngs: nnx.Rngs | None = None
                   ) -> tuple[dict[str, jax.Array], Memory]:
    """The loss sums of one chunk of each lane's document, reading from and writing to the carried memory.

    Args:
      batch: the long-document reader's features: decoder_input_tokens, decoder_target_tokens,
        decoder_loss_weights [batch, time] and start_of_sequence [batch] (1: the lane begins a
        document and its memory is reset first).
      carry: the memory after the previous step (`init_carry` at the start).
      per_row: sums per lane ([batch]) instead of scalars (per-document evaluation).
    Returns:
      (loss_sum, weight_sum, correct_sum; the memory after this chunk).
    """
    targets = batch["decoder_target_tokens"]
    reset = batch["start_of_sequence"].astype(bool)
    empty = self.init_memory(targets.shape[0])
    memory = jax.tree.map(lambda old, new: jnp.where(reset.reshape(-1, *(1,) * (old.ndim - 1)), new, old),
                          carry, empty)
    logits, memory = self(batch["decoder_input_tokens"], memory, mask=targets != 0, deterministic=deterministic,
                          rngs=rngs)
    sums = weighted_cross_entropy(logits, targets, batch["decoder_loss_weights"], per_row=per_row)
    return sums, jax.lax.stop_gradient(memory)


def streaming_apply_fn(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, Memory]]:
  """(params, tokens, memory, mask) -> (logits, memory) for decoding.MemoryStreamer."""
  def apply(params, tokens, memory, mask):
    return nnx.merge(graphdef, params)(tokens, memory, mask)
  return apply
