"""Transducer ASR model: log-mel front end, SpecAugment, Conformer encoder, prediction and
joint networks, RNN-T loss.

Batch contract (see data/speech.py): audio [batch, samples] float32 waveforms (or
precomputed features [batch, frames, bins]), audio_paddings [batch, samples] (1.0 =
padded), targets [batch, U] int32 label ids (no blank, 0-padded), target_paddings
[batch, U]. `loss` returns the summed negative log-likelihood and the number of labels,
so the trainer reports the RNN-T loss per label.

With a `biaser` (gin: `Transducer.biaser = @NamBiaser`, models/nam.py) the encoder is biased by
each utterance's phrase list, the batch's bias_tokens / bias_paddings [batch, phrases,
phrase_len]: the biaser picks and encodes phrases from the stream at the first of the encoder's
`context_layers`, whose BiasingAttention hooks add the bias. The loss then adds the biaser's
retrieval losses (CE-PA, CE-WPA, filter; their targets from the model's own Viterbi alignment).
Without bias arrays (or without a biaser) the encoder is the plain one.

With `ctc_weight > 0` a linear CTC head on the encoder output adds ctc_weight x its CTC loss (a hybrid
transducer-CTC, as NeMo's and ESPnet's): CTC must give each label its own frame, so the encoder learns
to carry each label where it is spoken instead of the whole sentence in the first frames (the RNN-T
alone lets a full-context encoder emit in bursts; experiments/deferred_nam/README.md).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.conformer import ConformerEncoder
from memlm_jax.layers.frontend import LogMelFrontend, SpecAugment
from memlm_jax.losses import ctc, rnnt
from memlm_jax.models import nam
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
               biaser: Callable[..., nnx.Module] | None = None, loss_frame_chunk: int | None = None,
               ctc_weight: float = 0.0, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if vocab_size < 2:
      raise ValueError(f"Transducer.vocab_size must be >= 2 (blank + at least one label), got {vocab_size}.")
    if loss_frame_chunk is not None and loss_frame_chunk <= 0:
      raise ValueError(f"Transducer.loss_frame_chunk must be a positive number of frames or None, "
                       f"got {loss_frame_chunk}.")
    if not ctc_weight >= 0:
      raise ValueError(f"Transducer.ctc_weight must be >= 0 (0 = no CTC head), got {ctc_weight}.")
    self.vocab_size = vocab_size
    self.frontend = frontend(num_mel_bins=num_mel_bins)
    self.spec_augment = spec_augment() if spec_augment is not None else None
    self.encoder = encoder(input_dim=num_mel_bins, dtype=dtype, rngs=rngs)
    self.predictor = predictor(vocab_size, dtype=dtype, rngs=rngs)
    self.joint = joint(self.encoder.model_dim, self.predictor.output_dim, vocab_size, dtype=dtype, rngs=rngs)
    self.loss_frame_chunk = loss_frame_chunk
    self.ctc_weight = float(ctc_weight)
    self.ctc_head = (nnx.Linear(self.encoder.model_dim, vocab_size, dtype=dtype, rngs=rngs) if ctc_weight > 0
                     else None)
    if biaser is not None and not getattr(self.encoder, "context_layers", ()):
      raise ValueError("Transducer.biaser needs an encoder with biasing blocks: set ConformerEncoder.context_layers "
                       "(e.g. (2,)) and ConformerEncoder.context_module_factory = @BiasingAttention.")
    self.biaser = biaser(vocab_size, self.encoder.model_dim, dtype=dtype, rngs=rngs) if biaser is not None else None
    if self.biaser is not None and self.biaser.uses_spotting:
      if self.ctc_head is None:
        raise ValueError("Transducer.biaser reads CTC spotting evidence (NamBiaser.selection='ctc_spotting' or "
                         "spotting_prior > 0) but the model has no CTC head: set Transducer.ctc_weight > 0.")
      last_block = len(self.encoder.blocks) - 1
      if min(self.encoder.context_layers) != last_block:
        raise ValueError(f"NamBiaser's CTC spotting reads the CTC head, trained on the encoder's output, on the stream "
                         f"at the first biasing block; ConformerEncoder.context_layers="
                         f"{list(self.encoder.context_layers)} must start at the last block ({last_block}).")

  def encode(self, audio: jax.Array, audio_paddings: jax.Array, *, bias_tokens: jax.Array | None = None,
             bias_paddings: jax.Array | None = None, context: Any = None, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """audio [batch, samples] (or features [batch, frames, bins]), audio_paddings [batch, samples | frames]
    -> (encoder_out [batch, frames', dim], encoder_paddings [batch, frames']).

    bias_tokens / bias_paddings [batch, phrases, phrase_len] bias the encoder through the biaser
    (which then sows its selection, `selected_phrases`); a raw `context` goes to the encoder's hooks."""
    if bias_tokens is not None:
      if self.biaser is None:
        raise ValueError("Transducer.encode got bias_tokens but the model has no biaser (Transducer.biaser).")
      if context is not None:
        raise ValueError("Transducer.encode takes bias_tokens or a context, not both.")
      context = self._biasing_context(bias_tokens, bias_paddings)
      if bias_tokens.shape[0] != audio.shape[0]:
        raise ValueError(f"Transducer.encode: bias_tokens {bias_tokens.shape} hold lists for {bias_tokens.shape[0]} "
                         f"utterances, the audio {audio.shape} for {audio.shape[0]}.")
    features, paddings = self.frontend(audio, audio_paddings)
    if self.spec_augment is not None and not deterministic:
      features = self.spec_augment(features, paddings, deterministic=False, rngs=rngs)
    return self.encoder(features, paddings, context=context, deterministic=deterministic, rngs=rngs)

  def encode_biased(self, audio: jax.Array, audio_paddings: jax.Array, bias_tokens: jax.Array,
                    bias_paddings: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The biased encoding for decoding: audio [batch, samples], audio_paddings [batch, samples],
    bias_tokens / bias_paddings [batch, phrases, phrase_len] -> (encoder_out [batch, frames', dim],
    encoder_paddings [batch, frames'], selected [batch, K] int32: the phrases the biaser kept)."""
    encoder_out, encoder_paddings = self.encode(audio, audio_paddings, bias_tokens=bias_tokens,
                                                bias_paddings=bias_paddings)
    selected = self._pop_biasing_intermediates()["selected_phrases"]
    return encoder_out, encoder_paddings, selected

  def _biasing_context(self, bias_tokens: jax.Array, bias_paddings: jax.Array | None) -> Callable:
    """The encoder's context: a callable (stream x [batch, frames', dim], paddings [batch, frames']) ->
    NamContext that also sows the selection (`selected_phrases` [batch, K])."""
    if bias_paddings is None or bias_paddings.shape != bias_tokens.shape or bias_tokens.ndim != 3:
      raise ValueError(f"Transducer.encode needs bias_tokens [batch, phrases, phrase_len] and bias_paddings of the "
                       f"same shape, got {bias_tokens.shape} and {None if bias_paddings is None else bias_paddings.shape}.")
    if not jnp.issubdtype(bias_tokens.dtype, jnp.integer) or bias_tokens.shape[-1] < 1:
      raise ValueError(f"Transducer.encode needs integer bias_tokens with phrase_len >= 1, got {bias_tokens.dtype} "
                       f"{bias_tokens.shape}.")

    def context(x, paddings):
      ctc_log_probs = self.ctc_log_probs(x) if self.biaser.uses_spotting else None
      biasing = self.biaser(x, paddings, bias_tokens, bias_paddings, ctc_log_probs)
      self.biaser.sow(nnx.Intermediate, "selected_phrases", biasing.selected)
      return biasing

    return context

  def per_example_nll(self, batch: Mapping[str, jax.Array], *, context: Any = None, deterministic: bool = True,
                      rngs: nnx.Rngs | None = None) -> jax.Array:
    """-log p(targets | audio) per example, [batch] float32 (unbiased unless a context is given)."""
    encoder_out, encoder_paddings = self.encode(batch["audio"], batch["audio_paddings"], context=context,
                                                deterministic=deterministic, rngs=rngs)
    return self.nll_of_encoding(encoder_out, encoder_paddings, batch)

  def nll_of_encoding(self, encoder_out: jax.Array, encoder_paddings: jax.Array,
                      batch: Mapping[str, jax.Array]) -> jax.Array:
    """The RNN-T -log p(batch's targets | an encoding) per example, [batch] float32: encoder_out [batch,
    frames', dim], encoder_paddings [batch, frames'], batch["targets"] / ["target_paddings"] [batch, U]
    (scoring several transcripts against one encoding without encoding it again)."""
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
    """Summed RNN-T loss and label count over the batch (rows with no audio contribute nothing).

    With a CTC head loss_sum adds ctc_weight x the CTC loss (`ctc_loss_sum`; rows too short for a CTC
    alignment add none). With a biaser the encoder is biased by the batch's phrase lists and loss_sum
    adds weight_sum x (the biaser's weighted mean CE-PA, CE-WPA and filter losses). Each added term is
    also reported unweighted (`rnnt_loss_sum`, `ctc_loss_sum`, `phrase_attention_loss_sum`, ...)."""
    weight_sum = jnp.sum(1.0 - batch["target_paddings"].astype(jnp.float32))
    biased = self.biaser is not None
    encoder_out, encoder_paddings = self.encode(
        batch["audio"], batch["audio_paddings"], bias_tokens=batch["bias_tokens"] if biased else None,
        bias_paddings=batch["bias_paddings"] if biased else None, deterministic=deterministic, rngs=rngs)
    intermediates = self._pop_biasing_intermediates() if biased else None
    rnnt_sum = jnp.sum(self.nll_of_encoding(encoder_out, encoder_paddings, batch))
    total = rnnt_sum
    sums = {"weight_sum": weight_sum}
    if biased or self.ctc_head is not None:
      sums["rnnt_loss_sum"] = rnnt_sum
    if self.ctc_head is not None:
      ctc_nll = ctc.ctc_loss(self.ctc_head(encoder_out), encoder_paddings, batch["targets"],
                            batch["target_paddings"], blank_id=rnnt.BLANK_ID)
      sums["ctc_loss_sum"] = jnp.sum(ctc_nll)
      total = total + self.ctc_weight * sums["ctc_loss_sum"]
    if biased:
      weights = {"phrase_attention": self.biaser.phrase_attention_weight,
                 "wordpiece_attention": self.biaser.wordpiece_attention_weight, "filter": self.biaser.filter_weight}
      utterance_valid = jnp.min(batch["audio_paddings"], axis=1) < 1.0
      losses = {}
      if weights["filter"]:
        losses["filter"] = nam.filter_loss(intermediates["filter_logits"], batch, utterance_valid)
      if weights["phrase_attention"] or weights["wordpiece_attention"]:  # only these need the alignment
        emit_frames = self.forced_alignment(encoder_out, encoder_paddings, batch["targets"],
                                            batch["target_paddings"])
        losses.update(nam.attention_losses(intermediates, batch, emit_frames, encoder_paddings, utterance_valid,
                                           self.biaser.phrase_attention_frames))
      for name, value in losses.items():  # reported unweighted, added weighted
        sums[f"{name}_loss_sum"] = value * weight_sum
        total = total + weights[name] * value * weight_sum
    sums["loss_sum"] = total
    return sums

  def _pop_biasing_intermediates(self) -> dict[str, Any]:
    """What the biaser and its hooks sowed in the last encode (and removes it from the model)."""
    hooks = list(self.encoder.context_modules)
    found = {"filter_logits": self.biaser.sown_filter_logits.get_value()[-1],
             "selected_phrases": self.biaser.selected_phrases.get_value()[-1],
             "phrase_log_attention": [hook.phrase_log_attention.get_value()[-1] for hook in hooks],
             "wordpiece_log_attention": [hook.wordpiece_log_attention.get_value()[-1] for hook in hooks]}
    nnx.pop(self, nnx.Intermediate)
    return found

  def forced_alignment(self, encoder_out: jax.Array, encoder_paddings: jax.Array, labels: jax.Array,
                       label_paddings: jax.Array) -> jax.Array:
    """The frame of each label's emission on the model's most likely alignment, emit_frames [batch,
    labels] int32 (-1 on padded labels), computed without gradient, loss_frame_chunk frames of joint
    logits at a time."""
    encoder_out = jax.lax.stop_gradient(encoder_out)
    predictor_out = jax.lax.stop_gradient(self.predictor(labels))
    batch, frames, dim = encoder_out.shape
    chunk = min(self.loss_frame_chunk or frames, frames)
    n_chunks = -(-frames // chunk)
    padded = jnp.pad(encoder_out, ((0, 0), (0, n_chunks * chunk - frames), (0, 0)))
    chunks = jnp.swapaxes(padded.reshape(batch, n_chunks, chunk, dim), 0, 1)
    labels_ext = jnp.pad(labels.astype(jnp.int32), ((0, 0), (0, 1)))

    def emissions(encoder_chunk):
      log_p = jax.nn.log_softmax(self.joint(encoder_chunk[:, :, None], predictor_out[:, None]).astype(jnp.float32))
      label = jnp.take_along_axis(log_p, jnp.broadcast_to(labels_ext[:, None, :, None], log_p.shape[:-1] + (1,)), -1)
      return log_p[..., rnnt.BLANK_ID], label[..., 0]

    blank, label = jax.lax.map(emissions, chunks)
    unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape(batch, n_chunks * chunk, -1)[:, :frames]
    return rnnt.viterbi_alignment(unchunk(blank), unchunk(label), encoder_paddings, label_paddings)

  def internal_lm_nll(self, labels: jax.Array, label_paddings: jax.Array) -> jax.Array:
    """-log p_ILM(labels) per example, [batch] float32: the prediction and joint networks' own prior over
    label sequences, estimated as in ILME (Meng et al. 2021) by the joint with a zero encoder frame, the
    softmax renormalised over the non-blank labels. labels, label_paddings [batch, labels].

    Subtracting it from the RNN-T NLL leaves (approximately) the acoustic evidence for the labels."""
    predictor_out = self.predictor(labels)[:, :labels.shape[1]]  # the output after each label's prefix
    logits = self.joint(jnp.zeros((1, 1, self.encoder.model_dim), predictor_out.dtype), predictor_out)
    non_blank = jnp.arange(self.vocab_size) != rnnt.BLANK_ID
    log_p = jax.nn.log_softmax(jnp.where(non_blank, logits.astype(jnp.float32), -jnp.inf), axis=-1)
    label_log_p = jnp.take_along_axis(log_p, labels.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(label_paddings <= 0, label_log_p, 0.0), axis=-1)

  def ctc_log_probs(self, encoder_out: jax.Array) -> jax.Array:
    """The CTC head's log-posteriors [batch, frames, vocab] float32 (blank = losses.rnnt.BLANK_ID) of
    encoder_out [batch, frames, enc_dim]; a ValueError when the model has no CTC head (ctc_weight 0)."""
    if self.ctc_head is None:
      raise ValueError("this transducer has no CTC head (Transducer.ctc_weight = 0); CTC log-probs need one.")
    return jax.nn.log_softmax(self.ctc_head(encoder_out).astype(jnp.float32), axis=-1)

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
