"""The transducer's prediction and joint networks (Graves 2012; blank = 0).

Prediction networks consume the previous labels and come in two kinds, chosen in gin:
  * `LstmPredictor`: embedding + one LSTM layer (the classic RNN-T decoder);
  * `StatelessPredictor`: embeddings of only the last `context` labels, concatenated and
    projected (Ghodsi et al. 2020, "limited context"); its decoding state is those labels.
Both offer `__call__(labels)` for training (all prefixes at once) and `init_state` /
`step` for decoding, and the two agree exactly.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.losses.rnnt import BLANK_ID


def _embedding(vocab_size: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
  init = nnx.with_partitioning(nnx.initializers.normal(stddev=1.0), ("vocab", "embed"))
  return nnx.Embed(vocab_size, dim, embedding_init=init, param_dtype=jnp.float32, rngs=rngs)


def _dense(in_dim: int, out_dim: int, names: tuple, *, use_bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs
           ) -> nnx.Linear:
  return nnx.Linear(in_dim, out_dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names), rngs=rngs)


def shift_right_with_blank(labels: jax.Array) -> jax.Array:
  """labels [batch, U] -> [batch, U + 1]: blank (the start symbol) followed by the labels."""
  return jnp.concatenate([jnp.full_like(labels[:, :1], BLANK_ID), labels], axis=1)


@gin.configurable
class LstmPredictor(nnx.Module):
  """Embedding of the previous label, then one LSTM layer; output dim = `hidden_dim`."""

  def __init__(self, vocab_size: int, *, embed_dim: int = 256, hidden_dim: int = 320,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.embed = _embedding(vocab_size, embed_dim, rngs)
    self.cell = nnx.OptimizedLSTMCell(embed_dim, hidden_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.output_dim = hidden_dim
    self.dtype = dtype

  def init_state(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """The LSTM carry (c, h), each [batch, hidden] float32, as before any label."""
    zeros = jnp.zeros((batch_size, self.output_dim), jnp.float32)
    return zeros, zeros

  def step(self, state: tuple[jax.Array, jax.Array], labels: jax.Array
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Consumes labels [n] (blank = start) -> (output [n, hidden], new state)."""
    c, h = state
    (c, h), out = self.cell((c, h), self.embed(labels).astype(self.dtype))
    return out, (c.astype(jnp.float32), h.astype(jnp.float32))

  def __call__(self, labels: jax.Array) -> jax.Array:
    """labels [batch, U] -> outputs [batch, U + 1, hidden]; position u has seen labels[:, :u]."""
    inputs = shift_right_with_blank(labels)

    def body(state, column):
      out, state = self.step(state, column)
      return state, out

    _, outs = jax.lax.scan(body, self.init_state(labels.shape[0]), inputs.T)
    return outs.swapaxes(0, 1)


@gin.configurable
class StatelessPredictor(nnx.Module):
  """Embeddings of the last `context` labels (blank before the first), concatenated, projected
  and passed through tanh; output dim = `output_dim`. The decoding state is those labels."""

  def __init__(self, vocab_size: int, *, embed_dim: int = 256, context: int = 2, output_dim: int = 320,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if context < 1:
      raise ValueError(f"StatelessPredictor.context must be >= 1 label, got {context}.")
    self.embed = _embedding(vocab_size, embed_dim, rngs)
    self.proj = _dense(context * embed_dim, output_dim, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
    self.context = context
    self.output_dim = output_dim
    self.dtype = dtype

  def init_state(self, batch_size: int) -> jax.Array:
    """The last `context` labels [batch, context] int32, oldest first (all blank)."""
    return jnp.full((batch_size, self.context), BLANK_ID, jnp.int32)

  def _project(self, history: jax.Array) -> jax.Array:
    """history [..., context] labels -> [..., output_dim]."""
    embedded = self.embed(history).astype(self.dtype)
    return jnp.tanh(self.proj(embedded.reshape(*history.shape[:-1], -1)))

  def step(self, state: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Consumes labels [n] -> (output [n, output_dim], new state [n, context])."""
    state = jnp.concatenate([state[:, 1:], labels[:, None].astype(jnp.int32)], axis=1)
    return self._project(state), state

  def __call__(self, labels: jax.Array) -> jax.Array:
    """labels [batch, U] -> outputs [batch, U + 1, output_dim]; position u has seen labels[:, :u]."""
    padded = jnp.concatenate([jnp.full((labels.shape[0], self.context), BLANK_ID, labels.dtype), labels], axis=1)
    windows = jnp.stack([padded[:, k:k + labels.shape[1] + 1] for k in range(self.context)], axis=-1)
    return self._project(windows)


@gin.configurable
class JointNetwork(nnx.Module):
  """joint(enc, pred) = out(tanh(enc_proj(enc) + pred_proj(pred))) -> vocabulary logits (blank = 0)."""

  def __init__(self, encoder_dim: int, predictor_dim: int, vocab_size: int, *, joint_dim: int = 320,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.encoder_proj = _dense(encoder_dim, joint_dim, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
    self.predictor_proj = _dense(predictor_dim, joint_dim, ("embed", "mlp"), use_bias=False, dtype=dtype,
                                 rngs=rngs)
    self.out = _dense(joint_dim, vocab_size, (None, "vocab"), use_bias=True, dtype=dtype, rngs=rngs)

  def logits_from_projections(self, encoder_proj: jax.Array, predictor_proj: jax.Array) -> jax.Array:
    """Broadcastable projections [..., joint_dim] -> logits [..., vocab]."""
    return self.out(jnp.tanh(encoder_proj + predictor_proj))

  def __call__(self, encoder_out: jax.Array, predictor_out: jax.Array) -> jax.Array:
    """Broadcastable encoder_out [..., encoder_dim] and predictor_out [..., predictor_dim] -> [..., vocab];
    e.g. [batch, frames, 1, E] with [batch, 1, U + 1, P] gives the lattice [batch, frames, U + 1, vocab]."""
    return self.logits_from_projections(self.encoder_proj(encoder_out), self.predictor_proj(predictor_out))
