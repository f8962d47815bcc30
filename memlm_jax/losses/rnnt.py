"""RNN-T (transducer) loss, Graves 2012, in the calling convention of `optax.ctc_loss`.

The lattice has T frames and U labels; cell (t, u) means "t frames consumed, u labels
emitted". From (t, u) a blank moves to (t + 1, u) and labels[u] moves to (t, u + 1);
every alignment ends with a blank emitted at (T - 1, U):

  alpha(0, 0) = 0
  alpha(t, u) = logaddexp(alpha(t - 1, u) + blank(t - 1, u),
                          alpha(t, u - 1) + label(t, u - 1))
  nll = -(alpha(T - 1, U) + blank(T - 1, U))

The recursion runs over anti-diagonals t + u = n with `jax.lax.scan`, each diagonal
vectorised over u. Log-probabilities are computed in float32 (float64 for float64 logits).

Two entry points:
  * `rnnt_loss` takes the full joint logits [batch, frames, labels + 1, vocab].
  * `rnnt_loss_from_joint` takes encoder / predictor outputs and a joint function and
    only ever materialises one chunk of frames of logits at a time; it keeps just the
    blank and next-label log-probs ([batch, frames, labels + 1] each). Its gradient is
    plain autodiff, with `jax.checkpoint` around each chunk so the backward pass
    recomputes the chunk's logits instead of storing them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Returned (with zero gradient) for an example that has no valid alignment: U > 0 labels
# but T = 0 frames. An example with T = 0 and U = 0 (an all-padding row) returns 0.
INFEASIBLE_LOSS = 1e9

_NEG_INF = -jnp.inf


def _safe_logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
  """logaddexp that takes -inf inputs (one or both) with finite (zero) gradients."""
  m = jax.lax.stop_gradient(jnp.maximum(a, b))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.exp(a - m) + jnp.exp(b - m)
  ok = s > 0
  return jnp.where(ok, m + jnp.log(jnp.where(ok, s, 1.0)), _NEG_INF)


def _lengths(logit_paddings: jax.Array, label_paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example frame count T [batch] and label count U [batch] (int32)."""
  t_len = jnp.sum(1.0 - logit_paddings.astype(jnp.float32), axis=1)
  u_len = jnp.sum(1.0 - label_paddings.astype(jnp.float32), axis=1)
  return jnp.round(t_len).astype(jnp.int32), jnp.round(u_len).astype(jnp.int32)


def _extend_labels(labels: jax.Array) -> jax.Array:
  """[batch, max_labels] -> [batch, max_labels + 1]; the extra row u = U_max has no label."""
  return jnp.pad(labels.astype(jnp.int32), ((0, 0), (0, 1)))


def _emissions(logits: jax.Array, labels_ext: jax.Array, frame_idx: jax.Array, t_len: jax.Array,
               u_len: jax.Array, blank_id: int) -> tuple[jax.Array, jax.Array]:
  """Blank and next-label log-probs of a block of frames.

  Args:
    logits: [batch, frames, labels + 1, vocab] joint logits (any float dtype).
    labels_ext: [batch, labels + 1] int, from `_extend_labels`.
    frame_idx: [frames] absolute frame index of each row of `logits`.
    t_len, u_len: [batch] int frame / label counts.
  Returns:
    (blank, label), each [batch, frames, labels + 1] in float32 (or wider), -inf on cells
    outside the example's lattice (label also -inf at u = U, where nothing is left to emit).
  """
  u_idx = jnp.arange(logits.shape[2])
  frame_ok = frame_idx[None, :, None] < t_len[:, None, None]  # [b, f, 1]
  blank_ok = frame_ok & (u_idx[None, None, :] <= u_len[:, None, None])
  label_ok = frame_ok & (u_idx[None, None, :] < u_len[:, None, None])
  # Zero padded cells before normalising so that nothing there (not even inf/nan) leaks in.
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  x = jnp.where(blank_ok[..., None], logits.astype(dtype), 0.0)
  lp = jax.nn.log_softmax(x, axis=-1)
  blank = lp[..., blank_id]
  idx = jnp.broadcast_to(labels_ext[:, None, :, None], lp.shape[:-1] + (1,))
  label = jnp.take_along_axis(lp, idx, axis=-1)[..., 0]
  return jnp.where(blank_ok, blank, _NEG_INF), jnp.where(label_ok, label, _NEG_INF)


def _rnnt_from_emissions(blank: jax.Array, label: jax.Array, t_len: jax.Array,
                         u_len: jax.Array) -> jax.Array:
  """Per-example NLL [batch] from blank / label log-probs [batch, frames, labels + 1]."""
  batch, frames, u1 = blank.shape
  t_len = jnp.minimum(t_len, frames)
  u_len = jnp.minimum(u_len, u1 - 1)
  empty = (t_len == 0) & (u_len == 0)
  if frames == 0:
    return jnp.where(empty, 0.0, INFEASIBLE_LOSS).astype(jnp.float32)

  # Skew to anti-diagonals: diag[b, n, u] = x[b, n - u, u], -inf where n - u is off-grid.
  n_diag = frames + u1 - 1
  t_of = jnp.arange(n_diag)[:, None] - jnp.arange(u1)[None, :]  # [n, u1]
  on_grid = (t_of >= 0) & (t_of < frames)
  t_clip = jnp.clip(t_of, 0, frames - 1)
  u_of = jnp.arange(u1)[None, :]

  def skew(x):
    d = jnp.where(on_grid[None], x[:, t_clip, u_of], _NEG_INF)  # [b, n, u1]
    return jnp.swapaxes(d, 0, 1)  # [n, b, u1]

  blank_d, label_d = skew(blank), skew(label)
  final_diag = t_len - 1 + u_len  # [b]
  batch_idx = jnp.arange(batch)

  def step(carry, xs):
    alpha, final = carry  # [b, u1], [b]
    n, blank_n, label_n = xs
    final = jnp.where(n == final_diag, alpha[batch_idx, u_len], final)
    from_blank = alpha + blank_n  # (t, u) -> (t + 1, u): same u on the next diagonal
    from_label = alpha + label_n  # (t, u) -> (t, u + 1): shift u by one
    pad = jnp.full((batch, 1), _NEG_INF, alpha.dtype)
    from_label = jnp.concatenate([pad, from_label[:, :-1]], axis=1)
    return (_safe_logaddexp(from_blank, from_label), final), None

  dtype = blank.dtype
  alpha0 = jnp.full((batch, u1), _NEG_INF, dtype).at[:, 0].set(0.0)
  final0 = jnp.full((batch,), _NEG_INF, dtype)
  (_, final), _ = jax.lax.scan(step, (alpha0, final0), (jnp.arange(n_diag), blank_d, label_d))

  last_blank = blank[batch_idx, jnp.maximum(t_len - 1, 0), u_len]
  ll = final + last_blank
  ok = (t_len > 0) & jnp.isfinite(ll)
  nll = -jnp.where(ok, ll, 0.0)
  return jnp.where(ok, nll, jnp.where(empty, 0.0, INFEASIBLE_LOSS)).astype(dtype)


def rnnt_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array,
              label_paddings: jax.Array, blank_id: int = 0) -> jax.Array:
  """Per-example RNN-T negative log-likelihood.

  Args:
    logits: [batch, frames, labels + 1, vocab] unnormalised joint-network outputs (any
      float dtype; the log-softmax is done in float32, or float64 for float64 logits).
      Row u is the joint output after the predictor has seen labels[:u].
    logit_paddings: [batch, frames], 1.0 on padded frames (right-padded).
    labels: [batch, labels] int label ids.
    label_paddings: [batch, labels], 1.0 on padded labels (right-padded).
    blank_id: vocabulary index of blank.
  Returns:
    [batch] float32 NLL (float64 for float64 logits). Padded frames / labels contribute
    nothing: the value equals the one on the example's unpadded slice and the gradient
    there is exactly zero (even if the padded logits are inf / nan). An example with
    labels but no frames (no valid alignment) returns `INFEASIBLE_LOSS` (1e9) with a zero
    gradient; one with neither frames nor labels returns 0. Gradients are finite.
  """
  t_len, u_len = _lengths(logit_paddings, label_paddings)
  blank, label = _emissions(logits, _extend_labels(labels), jnp.arange(logits.shape[1]),
                            t_len, u_len, blank_id)
  return _rnnt_from_emissions(blank, label, t_len, u_len)


def rnnt_loss_from_joint(encoder_out: jax.Array, predictor_out: jax.Array,
                         joint_fn: Callable[[jax.Array, jax.Array], jax.Array],
                         logit_paddings: jax.Array, labels: jax.Array, label_paddings: jax.Array,
                         blank_id: int = 0, frame_chunk: int = 16) -> jax.Array:
  """`rnnt_loss` without materialising all joint logits at once.

  Args:
    encoder_out: [batch, frames, d_enc].
    predictor_out: [batch, labels + 1, d_pred].
    joint_fn: (encoder chunk [batch, chunk, d_enc], predictor_out [batch, labels + 1, d_pred])
      -> logits [batch, chunk, labels + 1, vocab]. May close over parameters.
    logit_paddings, labels, label_paddings, blank_id: as in `rnnt_loss`.
    frame_chunk: frames per joint evaluation; peak logits memory is
      [batch, frame_chunk, labels + 1, vocab].
  Returns:
    [batch] float32 NLL, equal to `rnnt_loss(joint_fn(encoder_out, predictor_out), ...)`.
    Gradients are plain autodiff with each chunk under `jax.checkpoint` (the chunk's logits
    are recomputed in the backward pass).
  """
  batch, frames, d = encoder_out.shape
  u1 = predictor_out.shape[1]
  t_len, u_len = _lengths(logit_paddings, label_paddings)
  labels_ext = _extend_labels(labels)
  if frames == 0:
    empty = jnp.zeros((batch, 0, u1), jnp.float32)
    return _rnnt_from_emissions(empty, empty, t_len, u_len)

  chunk = max(1, min(frame_chunk, frames))
  n_chunks = -(-frames // chunk)
  enc = jnp.pad(encoder_out, ((0, 0), (0, n_chunks * chunk - frames), (0, 0)))
  enc = jnp.swapaxes(enc.reshape(batch, n_chunks, chunk, d), 0, 1)  # [n_chunks, b, chunk, d]

  @jax.checkpoint
  def one_chunk(enc_c, start):
    logits = joint_fn(enc_c, predictor_out)
    return _emissions(logits, labels_ext, start + jnp.arange(chunk), t_len, u_len, blank_id)

  blank, label = jax.lax.map(lambda xs: one_chunk(*xs), (enc, jnp.arange(n_chunks) * chunk))

  def unchunk(x):  # [n_chunks, b, chunk, u1] -> [b, frames, u1]
    return jnp.swapaxes(x, 0, 1).reshape(batch, n_chunks * chunk, u1)[:, :frames]

  return _rnnt_from_emissions(unchunk(blank), unchunk(label), t_len, u_len)
