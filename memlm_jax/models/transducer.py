"""Transducer ASR model: log-mel front end, SpecAugment, Conformer encoder, prediction and
joint networks, RNN-T loss.

Batch contract (see data/speech.py): audio [batch, samples] float32 waveforms (or
precomputed features [batch, frames, bins]), audio_paddings [batch, samples] (1.0 =
padded), targets [batch, U] int32 label ids (no blank, 0-padded), target_paddings
[batch, U]. `loss` returns the summed negative log-likelihood and the number of labels,
so the trainer reports the RNN-T loss per label.

The encoder may take a `context` (e.g. NAM phrase embeddings) that its context-injection
hook consumes; `None` runs the plain encoder.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.conformer import ConformerEncoder
from memlm_jax.layers.frontend import LogMelFrontend, SpecAugment
from memlm_jax.losses import rnnt
from memlm_jax.models.transducer_parts import JointNetwork, LstmPredictor


@gin.configurable
class Transducer(nnx.Module):
  """RNN-T over a Conformer encoder. Sub-modules are gin factories (`Transducer.encoder =
  @ConformerEncoder`, `Transducer.predictor = @StatelessPredictor`, ...)."""

  def __init__(self, vocab_size: int, *, num_mel_bins: int = 80,
               frontend: Callable[..., nnx.Module] = LogMelFrontend,
               spec_augment: Callable[..., nnx.Module] | None = SpecAugment,
               encoder: Callable[..., nnx.Module] = ConformerEncoder,
               predictor: Callable[..., nnx.Module] = LstmPredictor,
               joint: Callable[..., nnx.Module] = JointNetwork,
               loss_frame_chunk: int | None = None, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if vocab_size < 2:
      raise ValueError(f"Transducer.vocab_size must be >= 2 (blank + at least one label), got {vocab_size}.")
    if loss_frame_chunk is not None and loss_frame_chunk <= 0:
      raise ValueError(f"Transducer.loss_frame_chunk must be a positive number of frames or None, "
                       f"got {loss_frame_chunk}.")
    self.vocab_size = vocab_size
    self.frontend = frontend(num_mel_bins=num_mel_bins)
    self.spec_augment = spec_augment() if spec_augment is not None else None
    self.encoder = encoder(input_dim=num_mel_bins, dtype=dtype, rngs=rngs)
    self.predictor = predictor(vocab_size, dtype=dtype, rngs=rngs)
    self.joint = joint(self.encoder.model_dim, self.predictor.output_dim, vocab_size, dtype=dtype, rngs=rngs)
    self.loss_frame_chunk = loss_frame_chunk

  def encode(self, audio: jax.Array, audio_paddings: jax.Array, *, context: Any = None,
             deterministic: bool = True, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """audio [batch, samples] (or features [batch, frames, bins]), audio_paddings [batch, samples | frames]
    -> (encoder_out [batch, frames', dim], encoder_paddings [batch, frames'])."""
    features, paddings = self.frontend(audio, audio_paddings)
    if self.spec_augment is not None and not deterministic:
      features = self.spec_augment(features, paddings, deterministic=False, rngs=rngs)
    return self.encoder(features, paddings, context=context, deterministic=deterministic, rngs=rngs)

  def per_example_nll(self, batch: Mapping[str, jax.Array], *, context: Any = None, deterministic: bool = True,
                      rngs: nnx.Rngs | None = None) -> jax.Array:
    """-log p(targets | audio) per example, [batch] float32."""
    encoder_out, encoder_paddings = self.encode(batch["audio"], batch["audio_paddings"], context=context,
                                                deterministic=deterministic, rngs=rngs)
    predictor_out = self.predictor(batch["targets"])
    labels, label_paddings = batch["targets"], batch["target_paddings"]
    if self.loss_frame_chunk is None:
      logits = self.joint(encoder_out[:, :, None, :], predictor_out[:, None, :, :])
      return rnnt.rnnt_loss(logits, encoder_paddings, labels, label_paddings)
    joint_graph, joint_params = nnx.split(self.joint)

    def joint_fn(params, encoder_chunk, predictor_all):
      return nnx.merge(joint_graph, params)(encoder_chunk, predictor_all)

    return rnnt.rnnt_loss_from_joint(encoder_out, predictor_out, joint_fn, joint_params, encoder_paddings,
                                     labels, label_paddings, frame_chunk=self.loss_frame_chunk)

  def loss(self, batch: Mapping[str, jax.Array], *, deterministic: bool = True,
           rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Summed RNN-T loss and label count over the batch (rows with no audio contribute nothing)."""
    nll = self.per_example_nll(batch, deterministic=deterministic, rngs=rngs)
    return {"loss_sum": jnp.sum(nll), "weight_sum": jnp.sum(1.0 - batch["target_paddings"].astype(jnp.float32))}

  # The step functions decoding takes (decoding/transducer_beam.py: TransducerFns.from_model).

  def init_decoder_state(self, batch_size: int) -> Any:
    """The prediction network's state before any label (pytree, every leaf [batch_size, ...])."""
    return self.predictor.init_state(batch_size)

  def decoder_step(self, state: Any, labels: jax.Array) -> tuple[jax.Array, Any]:
    """Consumes labels [n] int32 (blank = the start symbol) -> (predictor_out [n, pred_dim], new state)."""
    return self.predictor.step(state, labels)

  def joint_logits(self, encoder_out: jax.Array, predictor_out: jax.Array) -> jax.Array:
    """Broadcastable encoder_out [..., enc_dim] and predictor_out [..., pred_dim] -> logits [..., vocab]
    (blank = losses.rnnt.BLANK_ID)."""
    return self.joint(encoder_out, predictor_out)
