"""Deferred NAM: contextual biasing of the transducer's audio encoder by a list of phrases.

NAM (Chang et al. 2021, arXiv 2110.02220) biases the encoder stream by cross-attention into
encoded phrases, x <- x + s * Delta (s = 0: the unbiased model); Dual-mode NAM keeps only the
top-K phrases; Deferred NAM (Wu et al. 2024, arXiv 2404.10180) picks those K with a cheap
filter *before* the context encoder, so only K phrases are ever encoded. Three stages:

  filter   the audio encoded so far (the stream at the first biasing block) -> frame queries
           [filter_dim]; a phrase's score is the max over valid frames of query . key /
           sqrt(filter_dim); `lax.top_k` keeps K (static). A padded phrase scores -1e30 and is
           never selected as a valid one. The phrase keys:
             deferred=True  (Deferred NAM) the wordpiece embeddings -> masked mean -> small MLP
                            (a Deep Averaging Network, DAN), before any context encoding;
             deferred=False (the Dual-mode NAM baseline) a projection of the phrase embedding the
                            context encoder gives, so every phrase is encoded first.
  encoder  a few pre-norm Transformer layers over each selected phrase's wordpieces (bidirectional,
           RoPE, key padding); the phrase embedding is the masked mean of its encoded wordpieces.
           Both settings have the same parameters (each leaves the other's filter keys unused),
           and with K >= phrases (everything selected) the same output. The DAN and the context
           encoder share the wordpiece embedding, so the filter loss trains it too.
  biasing  `BiasingAttention`, the Conformer's context hook in gin-chosen blocks: phrase-level
           attention over the K phrases plus a learned no-bias entry, wordpiece-level attention
           inside each phrase, Delta = sum_k p_k sum_l w_kl V(wordpiece_kl), projected to the
           model width and added as x + s * Delta.

Spotting evidence (ours; a hybrid transducer-CTC base, Transducer.ctc_weight > 0). The DAN keys are
learned from the training names and retrieve held-out ones at chance, while the base model's CTC head
ranks the spoken phrase first about half the time (losses/ctc_spotting.py, experiments/deferred_nam).
`selection='ctc_spotting'` keeps the K phrases that fit the CTC posteriors best (gain per token)
instead of the DAN's, and `spotting_prior` p > 0 adds p to the phrase attention's logit of each kept
phrase at the frames of its spotted window, when it loses at most `spotting_threshold` nats per token.
Both read the base model's CTC head on the stream at the biasing block (under stop_gradient).

Supervision of retrieval (the paper's two added losses, with our target construction):
  CE-PA    per frame, cross entropy of the phrase attention against the phrases whose
           wordpieces the model emits there (or the no-bias entry);
  CE-WPA   per frame that emits wordpieces of a selected phrase, cross entropy of the wordpiece
           attention against those wordpieces;
  filter   top-K passes no gradient, so the DAN filter gets its own cross entropy: its scores
           (softmax over the list plus a no-bias score) against the spoken phrases (each an
           equal share), or no-bias when none is spoken.
"Emits at frame t" comes from the model's own RNN-T Viterbi forced alignment
(losses/rnnt.viterbi_alignment, under stop_gradient): label u is emitted at frame e_u. A label
belongs to an occurrence of a selected phrase in the reference (the longest one covering it,
then the lowest index), or to no phrase. The targets of frame t are the labels emitted at t,
each an equal share: CE-PA's over the K + 1 entries (a label of no phrase counts for no-bias; a
frame that emits nothing is all no-bias), CE-WPA's over the (phrase, wordpiece) pairs of the
phrase labels (frames without one are not scored). Equal shares, not the first label, because
the Conformer encoder sees the whole utterance: its transducer may emit a burst of many labels at
one frame (and nothing for many frames), so the frame's bias must carry all of them, and the
prediction network picks which comes next.

Arrays: bias_tokens [batch, phrases, phrase_len] int32 (0 = padding), bias_paddings [batch,
phrases, phrase_len] float32 (1.0 = padded; a phrase's tokens form a prefix; an all-padded row
is no phrase), the encoder stream x [batch, frames, model_dim] with paddings [batch, frames].
"""

from __future__ import annotations

from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
from flax import nnx, struct

from memlm_jax.layers.checks import check_positive_sizes
from memlm_jax.layers.conformer import FeedForward, SelfAttention, dense, layer_norm
from memlm_jax.losses import ctc_spotting

PHRASE_ATTENTION_FRAMES = ("all", "emitting")
SELECTIONS = ("dan", "ctc_spotting")
# Score of a phrase that cannot be selected (padding); finite, so softmaxes stay NaN-free.
_NEG = -1e30


@struct.dataclass
class NamContext:
  """The selected phrases, encoded; entry K (the last) is the no-bias entry.

  wordpieces: [batch, K + 1, phrase_len, context_dim] encoded wordpieces.
  wordpiece_valid: [batch, K + 1, phrase_len] bool.
  phrases: [batch, K + 1, context_dim] phrase embeddings.
  phrase_valid: [batch, K + 1] bool; a selected slot holding no phrase is False, no-bias True.
  selected: [batch, K] int32 index into the list of each selected phrase (score order).
  phrase_prior: [batch, frames, K + 1] float32 added to the phrase attention's logits (the spotting
    prior; zeros without it).
  """
  wordpieces: jax.Array
  wordpiece_valid: jax.Array
  phrases: jax.Array
  phrase_valid: jax.Array
  selected: jax.Array
  phrase_prior: jax.Array


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """x [..., n, d], valid [..., n] bool -> [..., d] mean over the valid entries (0 when none)."""
  weights = valid.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=-2) / jnp.maximum(jnp.sum(weights, axis=-2), 1.0)


def _check_bias_arrays(bias_tokens: jax.Array, bias_paddings: jax.Array, batch: int) -> None:
  if bias_tokens.ndim != 3 or bias_paddings.shape != bias_tokens.shape or bias_tokens.shape[0] != batch:
    raise ValueError(f"NAM biasing expects bias_tokens and bias_paddings [batch={batch}, phrases, phrase_len], "
                     f"got {bias_tokens.shape} and {bias_paddings.shape}.")


class PhraseEncoderLayer(nnx.Module):
  """Pre-norm bidirectional self-attention + feed-forward over one phrase's wordpieces."""

  def __init__(self, dim: int, num_heads: int, ff_mult: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.attention = SelfAttention(dim, num_heads, dropout_rate=0.0, dtype=dtype, rngs=rngs)
    self.feed_forward = FeedForward(dim, ff_mult, dropout_rate=0.0, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, paddings: jax.Array) -> jax.Array:
    """x [phrases, phrase_len, dim], paddings [phrases, phrase_len] -> [phrases, phrase_len, dim]."""
    x = x + self.attention(x, paddings, deterministic=True, rngs=None)
    return x + self.feed_forward(x, deterministic=True, rngs=None)


@gin.configurable
class NamBiaser(nnx.Module):
  """The filter and the context encoder (module docstring); `BiasingAttention` applies the result.

  Called as the encoder's context (`ConformerEncoder(context=...)` with a callable): given the
  stream at the first biasing block it returns a `NamContext`.

  Args:
    vocab_size: the transducer's vocabulary (phrase wordpieces are its label ids).
    model_dim: width of the encoder stream it reads.
    context_dim: width of wordpiece and phrase embeddings (BiasingAttention.context_dim must match).
    num_layers, num_heads, ff_mult: the context encoder.
    filter_dim: width of the DAN keys and frame queries.
    top_k: phrases kept by the filter (static); a shorter list is padded to it.
    deferred: select with the DAN and encode only the K selected phrases (Deferred NAM), or encode
      all and select with keys from the encoded phrases (Dual-mode NAM).
    phrase_attention_weight, wordpiece_attention_weight, filter_weight: the CE-PA, CE-WPA and
      filter losses' weights (0 = off), each a mean over the frames (phrases) it covers.
    phrase_attention_frames: the frames CE-PA averages over: 'all' valid frames, or only 'emitting'
      ones (where the alignment emits a label; the silent majority, all no-bias, otherwise dominates).
    selection: 'dan' (the filter's scores) or 'ctc_spotting' (the K phrases that fit the base model's
      CTC posteriors best; module docstring).
    spotting_prior, spotting_threshold: the phrase attention's spotting prior (0 = off; module docstring).
  """

  def __init__(self, vocab_size: int, model_dim: int, *, context_dim: int = 96, num_layers: int = 1,
               num_heads: int = 4, ff_mult: int = 2, filter_dim: int = 64, top_k: int = 16, deferred: bool = True,
               phrase_attention_weight: float = 0.0, wordpiece_attention_weight: float = 0.0,
               filter_weight: float = 1.0, phrase_attention_frames: str = "all", selection: str = "dan",
               spotting_prior: float = 0.0, spotting_threshold: float = 3.0, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    check_positive_sizes("NamBiaser", vocab_size=vocab_size, model_dim=model_dim, context_dim=context_dim,
                         num_layers=num_layers, num_heads=num_heads, ff_mult=ff_mult, filter_dim=filter_dim,
                         top_k=top_k)
    for name, weight in (("phrase_attention_weight", phrase_attention_weight),
                         ("wordpiece_attention_weight", wordpiece_attention_weight), ("filter_weight", filter_weight)):
      if not weight >= 0:
        raise ValueError(f"NamBiaser.{name} must be >= 0 (0 = off), got {weight}.")
    if phrase_attention_frames not in PHRASE_ATTENTION_FRAMES:
      raise ValueError(f"NamBiaser.phrase_attention_frames must be one of {PHRASE_ATTENTION_FRAMES}, got "
                       f"{phrase_attention_frames!r}.")
    if selection not in SELECTIONS:
      raise ValueError(f"NamBiaser.selection must be one of {SELECTIONS}, got {selection!r}.")
    if not (0 <= spotting_prior < float("inf") and 0 <= spotting_threshold < float("inf")):
      raise ValueError(f"NamBiaser.spotting_prior and spotting_threshold must be finite and >= 0, got "
                       f"{spotting_prior} and "
                       f"{spotting_threshold}.")
    self.phrase_attention_frames = phrase_attention_frames
    self.selection = selection
    self.spotting_prior = float(spotting_prior)
    self.spotting_threshold = float(spotting_threshold)
    self.context_dim = context_dim
    self.top_k = top_k
    self.deferred = deferred
    self.phrase_attention_weight = float(phrase_attention_weight)
    self.wordpiece_attention_weight = float(wordpiece_attention_weight)
    self.filter_weight = float(filter_weight)
    embed_init = nnx.with_partitioning(nnx.initializers.normal(stddev=1.0), ("vocab", "embed"))
    self.embed = nnx.Embed(vocab_size, context_dim, embedding_init=embed_init, param_dtype=jnp.float32, rngs=rngs)
    self.dan_hidden = dense(context_dim, filter_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.dan_out = dense(filter_dim, filter_dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.filter_query = dense(model_dim, filter_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.encoded_filter_key = dense(context_dim, filter_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    normal = nnx.initializers.normal(stddev=context_dim ** -0.5)
    self.no_bias_key = nnx.Param(normal(rngs.params(), (filter_dim,), jnp.float32))
    self.layers = nnx.List([PhraseEncoderLayer(context_dim, num_heads, ff_mult, dtype=dtype, rngs=rngs)
                            for _ in range(num_layers)])
    self.final_norm = layer_norm(context_dim, dtype=dtype, rngs=rngs)
    self.no_bias_wordpiece = nnx.Param(normal(rngs.params(), (context_dim,), jnp.float32))
    self.no_bias_phrase = nnx.Param(normal(rngs.params(), (context_dim,), jnp.float32))

  # -- filter ----------------------------------------------------------------------------------------------------

  def phrase_keys(self, bias_tokens: jax.Array, bias_valid: jax.Array) -> jax.Array:
    """The DAN: bias_tokens [batch, phrases, len], bias_valid [..] bool -> keys [batch, phrases, filter_dim]."""
    averaged = _masked_mean(self.embed(bias_tokens), bias_valid)
    return self.dan_out(jax.nn.relu(self.dan_hidden(averaged)))

  def filter_logits(self, x: jax.Array, paddings: jax.Array, phrase_keys: jax.Array, bias_valid: jax.Array
                    ) -> jax.Array:
    """Scores [batch, phrases + 1] of keys [batch, phrases, filter_dim] against the stream x [batch, frames,
    model_dim]: each phrase's, then the no-bias score (last); padded phrases (no valid token in bias_valid
    [batch, phrases, len]) -1e30."""
    queries = self.filter_query(x)  # [batch, frames, filter_dim]
    keys = jnp.concatenate([phrase_keys.astype(queries.dtype), jnp.broadcast_to(
        self.no_bias_key[...].astype(queries.dtype), (x.shape[0], 1, self.no_bias_key.shape[0]))], 1)
    scores = jnp.einsum("btf,bnf->btn", queries, keys, preferred_element_type=jnp.float32)
    scores = scores * keys.shape[-1] ** -0.5
    valid_frames = (paddings <= 0)[:, :, None]
    scores = jnp.max(jnp.where(valid_frames, scores, _NEG), axis=1)  # [batch, phrases + 1]
    scores = jnp.where(jnp.any(valid_frames, axis=1), scores, 0.0)  # an utterance with no frames
    phrase_valid = jnp.concatenate([jnp.any(bias_valid, -1), jnp.ones((x.shape[0], 1), bool)], axis=1)
    return jnp.where(phrase_valid, scores, _NEG)

  # -- context encoder -------------------------------------------------------------------------------------------

  def encode_phrases(self, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """tokens [batch, n, len], valid [batch, n, len] bool -> encoded wordpieces [batch, n, len, context_dim]."""
    batch, n, length = tokens.shape
    x = self.embed(tokens.reshape(batch * n, length))
    paddings = 1.0 - valid.reshape(batch * n, length).astype(jnp.float32)
    for layer in self.layers:
      x = layer(x, paddings)
    return self.final_norm(x).reshape(batch, n, length, -1)

  @property
  def uses_spotting(self) -> bool:
    """Whether the biaser reads the base model's CTC posteriors (its __call__ needs ctc_log_probs)."""
    return self.selection == "ctc_spotting" or self.spotting_prior > 0

  def __call__(self, x: jax.Array, paddings: jax.Array, bias_tokens: jax.Array, bias_paddings: jax.Array,
               ctc_log_probs: jax.Array | None = None) -> NamContext:
    """x [batch, frames, model_dim] (the stream at the first biasing block), paddings [batch, frames],
    bias_tokens / bias_paddings [batch, phrases, phrase_len], ctc_log_probs [batch, frames, vocab] (the
    base model's CTC head on x; needed when `uses_spotting`) -> NamContext with K = top_k.

    Sows `sown_filter_logits` [batch, phrases' + 1] (phrases' = max(phrases, K)) for the filter loss."""
    _check_bias_arrays(bias_tokens, bias_paddings, x.shape[0])
    if self.uses_spotting and ctc_log_probs is None:
      raise ValueError("NamBiaser with selection='ctc_spotting' or spotting_prior > 0 needs the base model's CTC "
                       "log-probs (a transducer with a CTC head, Transducer.ctc_weight > 0).")
    batch, phrases, length = bias_tokens.shape
    if phrases < self.top_k:  # fewer phrases than K: padded slots, never valid
      extra = self.top_k - phrases
      bias_tokens = jnp.pad(bias_tokens, ((0, 0), (0, extra), (0, 0)))
      bias_paddings = jnp.pad(bias_paddings, ((0, 0), (0, extra), (0, 0)), constant_values=1.0)
    bias_valid = bias_paddings <= 0
    if self.deferred:
      keys = self.phrase_keys(bias_tokens, bias_valid)
    else:
      every_wordpiece = self.encode_phrases(bias_tokens, bias_valid)
      keys = self.encoded_filter_key(_masked_mean(every_wordpiece, bias_valid))
    logits = self.filter_logits(x, paddings, keys, bias_valid)
    self.sow(nnx.Intermediate, "sown_filter_logits", logits)
    if self.uses_spotting:
      spots = ctc_spotting.phrase_spots(jax.lax.stop_gradient(ctc_log_probs), paddings, bias_tokens, bias_paddings)
      tokens_per_phrase = jnp.sum(bias_valid, axis=-1)
      fit = jnp.where(tokens_per_phrase > 0, spots.gain / jnp.maximum(tokens_per_phrase, 1), _NEG)  # [batch, phrases']
      fit = jnp.where(jnp.isfinite(fit), fit, _NEG)
    ranking = fit if self.selection == "ctc_spotting" else logits[:, :-1]
    _, selected = jax.lax.top_k(ranking, self.top_k)  # [batch, K]
    pick = lambda a: jnp.take_along_axis(a, selected.reshape(batch, self.top_k, *(1,) * (a.ndim - 2)), axis=1)
    tokens, valid = pick(bias_tokens), pick(bias_valid)
    wordpieces = self.encode_phrases(tokens, valid) if self.deferred else pick(every_wordpiece)
    no_bias_wordpieces = jnp.zeros((batch, 1, length, self.context_dim), wordpieces.dtype)
    no_bias_wordpieces = no_bias_wordpieces.at[:, :, 0].set(self.no_bias_wordpiece[...].astype(wordpieces.dtype))
    wordpieces = jnp.concatenate([wordpieces, no_bias_wordpieces], axis=1)
    wordpiece_valid = jnp.concatenate([valid, (jnp.arange(length) == 0)[None, None].repeat(batch, 0)], axis=1)
    phrase_embeddings = jnp.concatenate([
        _masked_mean(wordpieces[:, :-1], valid),
        jnp.broadcast_to(self.no_bias_phrase[...].astype(wordpieces.dtype), (batch, 1, self.context_dim))], axis=1)
    phrase_valid = jnp.any(wordpiece_valid, axis=-1)
    prior = jnp.zeros((batch, x.shape[1], self.top_k + 1), jnp.float32)
    if self.spotting_prior > 0:
      take = lambda a: jnp.take_along_axis(a, selected, axis=1)  # noqa: E731
      trusted = take(fit) >= -self.spotting_threshold  # [batch, K]
      frame = jnp.arange(x.shape[1])[None, :, None]
      inside = (frame >= take(spots.start)[:, None]) & (frame <= take(spots.end)[:, None]) & trusted[:, None]
      prior = prior.at[..., :-1].set(self.spotting_prior * inside.astype(jnp.float32))
    return NamContext(wordpieces, wordpiece_valid, phrase_embeddings, phrase_valid, selected.astype(jnp.int32),
                      prior)


@gin.configurable
class BiasingAttention(nnx.Module):
  """The encoder's context hook (ConformerEncoder.context_module_factory): x <- x + s * Delta.

  Phrase-level attention p [batch, frames, K + 1] over the selected phrases and no-bias,
  wordpiece-level attention w [batch, frames, K + 1, phrase_len] inside each phrase, both from
  the layer-normed stream; Delta = out(sum_k p_k sum_l w_kl V(wordpiece_kl)). The output
  projection starts at zero, so a biaser warm-started on a trained transducer starts as it; once
  trained, the no-bias entry's value (and out's bias) make Delta nonzero even for an empty list,
  so only s = 0 (or no list at all) is exactly the unbiased encoder.
  Sows `phrase_log_attention` and `wordpiece_log_attention` for the CE-PA / CE-WPA losses.

  Args:
    model_dim: the stream's width.
    context_dim: NamBiaser.context_dim.
    attention_dim: width of the queries, keys and values.
    strength: s; 0 reproduces the unbiased encoder bit for bit.
  """

  def __init__(self, model_dim: int, *, context_dim: int = 96, attention_dim: int = 64, strength: float = 1.0,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    check_positive_sizes("BiasingAttention", model_dim=model_dim, context_dim=context_dim,
                         attention_dim=attention_dim)
    if not (isinstance(strength, (int, float)) and strength >= 0 and strength == strength):
      raise ValueError(f"BiasingAttention.strength must be a number >= 0 (0 = no biasing), got {strength!r}.")
    self.context_dim = context_dim
    self.strength = float(strength)
    self.norm = layer_norm(model_dim, dtype=dtype, rngs=rngs)
    self.phrase_query = dense(model_dim, attention_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.phrase_key = dense(context_dim, attention_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.wordpiece_query = dense(model_dim, attention_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.wordpiece_key = dense(context_dim, attention_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.value = dense(context_dim, attention_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(attention_dim, model_dim, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp", "embed")),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array, paddings: jax.Array, context: NamContext) -> jax.Array:
    """x [batch, frames, model_dim], paddings [batch, frames] -> x + s * Delta, same shape."""
    del paddings  # per frame; the encoder zeroes padded frames at its end
    if context.wordpieces.shape[-1] != self.context_dim:
      raise ValueError(f"BiasingAttention.context_dim={self.context_dim} does not match the biaser's context "
                       f"width {context.wordpieces.shape[-1]} (set NamBiaser.context_dim and "
                       "BiasingAttention.context_dim alike).")
    h = self.norm(x)
    scale = self.phrase_query.out_features ** -0.5
    phrase_logits = jnp.einsum("bta,bka->btk", self.phrase_query(h), self.phrase_key(context.phrases),
                               preferred_element_type=jnp.float32) * scale + context.phrase_prior
    phrase_log_p = jax.nn.log_softmax(jnp.where(context.phrase_valid[:, None, :], phrase_logits, _NEG), axis=-1)
    wordpiece_logits = jnp.einsum("bta,bkla->btkl", self.wordpiece_query(h), self.wordpiece_key(context.wordpieces),
                                  preferred_element_type=jnp.float32) * scale
    wordpiece_log_p = jax.nn.log_softmax(
        jnp.where(context.wordpiece_valid[:, None], wordpiece_logits, _NEG), axis=-1)
    self.sow(nnx.Intermediate, "phrase_log_attention", phrase_log_p)
    self.sow(nnx.Intermediate, "wordpiece_log_attention", wordpiece_log_p)
    # An invalid slot's wordpiece softmax is uniform over padding; its phrase weight is exactly 0.
    weights = jnp.exp(phrase_log_p)[..., None] * jnp.exp(wordpiece_log_p)  # [batch, frames, K + 1, len]
    values = self.value(context.wordpieces)
    delta = self.out(jnp.einsum("btkl,bkla->bta", weights.astype(values.dtype), values))
    if self.strength == 0.0:
      return x
    return x + self.strength * delta.astype(x.dtype)


# -- retrieval targets and losses --------------------------------------------------------------------------------


def label_phrases(targets: jax.Array, target_paddings: jax.Array, phrase_tokens: jax.Array, phrase_valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Which phrase occurrence in the reference covers each label.

  Args:
    targets: [batch, labels] int label ids; target_paddings [batch, labels] (1.0 = padded).
    phrase_tokens: [batch, K, phrase_len] int; phrase_valid [batch, K, phrase_len] bool (a prefix).
  Returns:
    (phrase [batch, labels] int32: index k of the phrase whose occurrence in the targets covers
     the label, -1 for none; position [batch, labels] int32: the label's wordpiece index inside
     that phrase, -1 for none). Overlapping occurrences: the longest phrase wins, then the lowest k.
  """
  batch, labels = targets.shape
  _, num_phrases, length = phrase_tokens.shape
  lengths = jnp.sum(phrase_valid, axis=-1)  # [batch, K]
  label_ok = target_paddings <= 0
  # match[b, k, a]: phrase k occurs at label a.
  offsets = jnp.arange(labels)[:, None] + jnp.arange(length)[None, :]  # [a, l]
  inside = offsets < labels
  window = jnp.where(inside[None], targets[:, jnp.minimum(offsets, labels - 1)], -1)  # [batch, a, l]
  window_ok = inside[None] & label_ok[:, jnp.minimum(offsets, labels - 1)]
  equal = (window[:, None] == phrase_tokens[:, :, None, :]) & window_ok[:, None]  # [batch, K, a, l]
  match = jnp.all(equal | ~phrase_valid[:, :, None, :], axis=-1) & (lengths > 0)[:, :, None]  # [batch, K, a]
  # Label u is covered by an occurrence of k starting at u - l for some wordpiece l < len_k: one
  # [batch, K, labels] pass per l (memory O(batch K labels), not labels squared).
  rank = lengths[:, :, None] * (num_phrases + 1) + (num_phrases - jnp.arange(num_phrases))[None, :, None]
  best = jnp.zeros((batch, labels), jnp.int32)
  phrase = jnp.full((batch, labels), -1, jnp.int32)
  position = jnp.full((batch, labels), -1, jnp.int32)
  for l in range(length):
    starts_here = jnp.pad(match, ((0, 0), (0, 0), (l, 0)))[:, :, :labels] & (l < lengths)[:, :, None]
    priority = jnp.where(starts_here, rank, 0)  # longest phrase, then the lowest k
    top = jnp.max(priority, axis=1)
    better = top >= jnp.maximum(best, 1)  # ties (the same phrase): the earliest start
    best = jnp.where(better, top, best)
    phrase = jnp.where(better, jnp.argmax(priority, axis=1), phrase)
    position = jnp.where(better, l, position)
  return phrase.astype(jnp.int32), position.astype(jnp.int32)


def frame_targets(emit_frames: jax.Array, label_phrase: jax.Array, label_position: jax.Array, frame_paddings: jax.Array,
                  num_phrases: int, phrase_len: int) -> tuple[jax.Array, jax.Array]:
  """Per-frame CE-PA / CE-WPA targets from a forced alignment (module docstring).

  Args:
    emit_frames: [batch, labels] int32 frame of each label's emission (-1 on padded labels)
      (rnnt.viterbi_alignment).
    label_phrase, label_position: [batch, labels] from `label_phrases` (-1 = no phrase).
    frame_paddings: [batch, frames] (1.0 = padded).
    num_phrases: K (entry K, the last of K + 1, is no-bias); phrase_len: wordpieces per phrase.
  Returns:
    (phrase_target [batch, frames, K + 1] float32: a distribution per valid frame (padded frames
     all 0); wordpiece_counts [batch, frames, K + 1, phrase_len] float32: how many labels of phrase
     k at wordpiece l the frame emits).
  """
  frames = frame_paddings.shape[1]
  emitted = (emit_frames[:, None, :] == jnp.arange(frames)[None, :, None]) & (emit_frames >= 0)[:, None, :]
  emitted = emitted.astype(jnp.float32)  # [batch, frames, labels]
  slot = jnp.where(label_phrase >= 0, label_phrase, num_phrases)
  slot_onehot = jax.nn.one_hot(slot, num_phrases + 1, dtype=jnp.float32)  # [batch, labels, K + 1]
  counts = jnp.einsum("btu,buk->btk", emitted, slot_onehot)
  silent = jnp.sum(counts, axis=-1, keepdims=True) == 0
  counts = jnp.where(silent, jax.nn.one_hot(num_phrases, num_phrases + 1, dtype=jnp.float32), counts)
  valid = (frame_paddings <= 0)[..., None]
  phrase_target = jnp.where(valid, counts / jnp.sum(counts, axis=-1, keepdims=True), 0.0)
  in_phrase = (label_phrase >= 0).astype(jnp.float32)
  position_onehot = jax.nn.one_hot(jnp.maximum(label_position, 0), phrase_len, dtype=jnp.float32)
  pairs = slot_onehot[..., :, None] * position_onehot[..., None, :] * in_phrase[..., None, None]  # [b, u, K+1, len]
  wordpiece_counts = jnp.einsum("btu,bukl->btkl", emitted, pairs) * valid[..., None]
  return phrase_target, wordpiece_counts


def filter_targets(bias_tokens: jax.Array, bias_paddings: jax.Array, targets: jax.Array, target_paddings: jax.Array
                   ) -> jax.Array:
  """The filter loss's target distribution [batch, phrases + 1]: an equal share for each phrase of the list
  that occurs in the reference, or all mass on no-bias (last) when none does."""
  phrases = bias_tokens.shape[1]
  label_phrase, _ = label_phrases(targets, target_paddings, bias_tokens, bias_paddings <= 0)
  spoken = jnp.any(label_phrase[:, :, None] == jnp.arange(phrases)[None, None, :], axis=1)  # [batch, phrases]
  # A phrase inside a longer spoken one covers no label of its own; it is not counted as spoken.
  spoken = jnp.concatenate([spoken, ~jnp.any(spoken, axis=1, keepdims=True)], axis=1).astype(jnp.float32)
  return spoken / jnp.sum(spoken, axis=1, keepdims=True)


def _padded_to(bias_tokens: jax.Array, bias_paddings: jax.Array, phrases: int) -> tuple[jax.Array, jax.Array]:
  """The lists padded with empty phrases to at least `phrases` (as NamBiaser pads a list shorter than K)."""
  extra = max(phrases - bias_tokens.shape[1], 0)
  return (jnp.pad(bias_tokens, ((0, 0), (0, extra), (0, 0))),
          jnp.pad(bias_paddings, ((0, 0), (0, extra), (0, 0)), constant_values=1.0))


def filter_loss(filter_logits: jax.Array, batch: Mapping[str, jax.Array], utterance_valid: jax.Array) -> jax.Array:
  """Mean over utterances of the filter's cross entropy against `filter_targets` (float32 scalar).

  Args:
    filter_logits: [batch, phrases' + 1] (NamBiaser's, phrases' = max(phrases, K)).
    batch: targets, target_paddings, bias_tokens, bias_paddings.
    utterance_valid: [batch] bool, rows that hold an utterance.
  """
  bias_tokens, bias_paddings = _padded_to(batch["bias_tokens"], batch["bias_paddings"], filter_logits.shape[1] - 1)
  target = filter_targets(bias_tokens, bias_paddings, batch["targets"], batch["target_paddings"])
  log_p = jax.nn.log_softmax(filter_logits, axis=-1)
  cross_entropy = -jnp.sum(jnp.where(target > 0, target * log_p, 0.0), axis=-1)
  return jnp.sum(jnp.where(utterance_valid, cross_entropy, 0.0)) / jnp.maximum(jnp.sum(utterance_valid), 1)


def attention_losses(intermediates: Mapping[str, Any], batch: Mapping[str, jax.Array], emit_frames: jax.Array,
                     encoder_paddings: jax.Array, utterance_valid: jax.Array, phrase_attention_frames: str = "all"
                     ) -> dict[str, jax.Array]:
  """Mean CE-PA and CE-WPA of one batch ({"phrase_attention", "wordpiece_attention"}, float32 scalars, 0
  when nothing is scored), averaged over the biasing blocks.

  Args:
    intermediates: {"selected_phrases": [batch, K] indices into the list, "phrase_log_attention": list of
      [batch, frames, K + 1] (one per biasing block), "wordpiece_log_attention": list of [batch, frames,
      K + 1, len]}.
    batch: the training batch (targets, target_paddings, bias_tokens, bias_paddings).
    emit_frames: [batch, labels] from the forced alignment.
    encoder_paddings: [batch, frames].
    utterance_valid: [batch] bool, rows that hold an utterance.
    phrase_attention_frames: 'all' or 'emitting' (NamBiaser.phrase_attention_frames).
  """
  context_selected = intermediates["selected_phrases"]
  top_k = context_selected.shape[1]
  bias_tokens, bias_paddings = _padded_to(batch["bias_tokens"], batch["bias_paddings"], top_k)
  pick = lambda a: jnp.take_along_axis(a, context_selected[:, :, None], axis=1)
  selected_tokens, selected_valid = pick(bias_tokens), pick(bias_paddings) <= 0
  label_phrase, label_position = label_phrases(batch["targets"], batch["target_paddings"], selected_tokens,
                                               selected_valid)
  phrase_target, wordpiece_counts = frame_targets(emit_frames, label_phrase, label_position, encoder_paddings,
                                                  top_k, bias_tokens.shape[-1])
  frame_ok = (encoder_paddings <= 0) & utterance_valid[:, None]
  pa_frames = frame_ok
  if phrase_attention_frames == "emitting":
    frames = encoder_paddings.shape[1]
    pa_frames = frame_ok & jnp.any((emit_frames[:, None, :] == jnp.arange(frames)[None, :, None]) &
                                   (emit_frames >= 0)[:, None, :], axis=-1)
  emitted_pieces = jnp.sum(wordpiece_counts, axis=(-2, -1))  # [batch, frames]
  in_phrase = frame_ok & (emitted_pieces > 0)
  wordpiece_target = wordpiece_counts / jnp.maximum(emitted_pieces, 1.0)[..., None, None]
  pa_terms, wpa_terms = [], []
  for phrase_log_p, wordpiece_log_p in zip(intermediates["phrase_log_attention"],
                                           intermediates["wordpiece_log_attention"]):
    pa = -jnp.sum(jnp.where(phrase_target > 0, phrase_target * phrase_log_p, 0.0), axis=-1)
    pa_terms.append(jnp.sum(jnp.where(pa_frames, pa, 0.0)) / jnp.maximum(jnp.sum(pa_frames), 1))
    wpa = -jnp.sum(jnp.where(wordpiece_target > 0, wordpiece_target * wordpiece_log_p, 0.0), axis=(-2, -1))
    wpa_terms.append(jnp.sum(jnp.where(in_phrase, wpa, 0.0)) / jnp.maximum(jnp.sum(in_phrase), 1))
  return {"phrase_attention": jnp.mean(jnp.stack(pa_terms)), "wordpiece_attention": jnp.mean(jnp.stack(wpa_terms))}
