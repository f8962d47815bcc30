"""RNN-T (transducer) loss, Graves 2012, in the calling convention of `optax.ctc_loss`.

The lattice has T frames and U labels; cell (t, u) means "t frames consumed, u labels
emitted". From (t, u) a blank moves to (t + 1, u) and labels[u] moves to (t, u + 1);
every alignment ends with a blank emitted at (T - 1, U):

  alpha(0, 0) = 0
  alpha(t, u) = logaddexp(alpha(t - 1, u) + blank(t - 1, u),
                          alpha(t, u - 1) + label(t, u - 1))
  beta(T - 1, U) = blank(T - 1, U)
  beta(t, u) = logaddexp(beta(t + 1, u) + blank(t, u), beta(t, u + 1) + label(t, u))
  nll = -(alpha(T - 1, U) + blank(T - 1, U)) = -beta(0, 0)

Both recursions run over anti-diagonals t + u = n with `jax.lax.scan`, each diagonal
vectorised over u. Log-probabilities and the lattice are float32 (float64 for float64
inputs) whatever the logits' dtype.

Entry points:
  * `rnnt_loss` takes the full joint logits [batch, frames, labels + 1, vocab]; its
    gradient is plain autodiff through the log-softmax and the alpha scan.
  * `rnnt_loss_from_logprobs` takes blank and next-label log-probs [batch, frames,
    labels + 1]; its gradient is the closed-form occupation (custom VJP, beta recursion):
      d nll / d blank(t, u) = -exp(alpha(t, u) + blank(t, u) + beta(t + 1, u) - log Z)
      d nll / d label(t, u) = -exp(alpha(t, u) + label(t, u) + beta(t, u + 1) - log Z)
    with beta(T, U) = 0 for the final blank.
  * `rnnt_loss_from_joint` (memory-lean) takes encoder / predictor outputs and a joint
    function. It never holds more than one chunk of frames of logits [batch,
    frame_chunk, labels + 1, vocab]: per chunk it computes the logits, gathers the blank
    and next-label log-probs and drops the rest. In the backward pass each chunk's logits
    are recomputed (`jax.checkpoint`), d logits = onehot-scatter(g) - softmax * sum(g) is
    formed by a custom VJP (no log-softmax or scatter buffer is kept), and autodiff carries
    it through the joint for that chunk only, accumulating parameter gradients. The
    lattice gradient is the beta recursion of `rnnt_loss_from_logprobs`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# The blank label's id in every transducer vocabulary (the loss, the prediction network's start
# symbol, decoding and phrase boosting all use this one).
BLANK_ID = 0

# Returned (with zero gradient) for an example that has no valid alignment: U > 0 labels
# but T = 0 frames. An example with T = 0 and U = 0 (an all-padding row) returns 0.
INFEASIBLE_LOSS = 1e9

_NEG_INF = -jnp.inf

# joint_fn(joint_params, encoder chunk [batch, chunk, 1, d_enc], predictor_out [batch, 1, labels + 1,
# d_pred]) -> logits [batch, chunk, labels + 1, vocab] (the inputs broadcast against each other).
JointFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def _safe_logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
  """logaddexp that takes -inf inputs (one or both) with finite (zero) gradients."""
  m = jax.lax.stop_gradient(jnp.maximum(a, b))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.exp(a - m) + jnp.exp(b - m)
  ok = s > 0
  return jnp.where(ok, m + jnp.log(jnp.where(ok, s, 1.0)), _NEG_INF)


def _lengths(logit_paddings: jax.Array, label_paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example frame count T [batch] and label count U [batch] (int32)."""
  t_len = jnp.round(jnp.sum(1.0 - logit_paddings.astype(jnp.float32), axis=1)).astype(jnp.int32)
  u_len = jnp.round(jnp.sum(1.0 - label_paddings.astype(jnp.float32), axis=1)).astype(jnp.int32)
  return jnp.clip(t_len, 0, logit_paddings.shape[1]), jnp.clip(u_len, 0, label_paddings.shape[1])


def _extend_labels(labels: jax.Array) -> jax.Array:
  """[batch, max_labels] -> [batch, max_labels + 1]; the extra row u = U_max has no label."""
  return jnp.pad(labels.astype(jnp.int32), ((0, 0), (0, 1)))


def _cell_masks(frame_idx: jax.Array, t_len: jax.Array, u_len: jax.Array,
                u1: int) -> tuple[jax.Array, jax.Array]:
  """Which cells may emit a blank / a label, each [batch, frames, u1] bool.

  Args:
    frame_idx: [frames] absolute frame index of each row.
    t_len, u_len: [batch] int frame / label counts.
  """
  u_idx = jnp.arange(u1)
  frame_ok = frame_idx[None, :, None] < t_len[:, None, None]
  blank_ok = frame_ok & (u_idx[None, None, :] <= u_len[:, None, None])
  label_ok = frame_ok & (u_idx[None, None, :] < u_len[:, None, None])
  return blank_ok, label_ok


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_logprobs(x: jax.Array, labels_ext: jax.Array, blank_id: int) -> tuple[jax.Array, jax.Array]:
  """Blank and next-label log-softmax entries of x [batch, frames, u1, vocab] (float32+).

  Returns (blank, label), each [batch, frames, u1]. The backward pass forms d x from the
  saved logits and log-normaliser only (fused log-softmax gradient).
  """
  return _gather_logprobs_fwd(x, labels_ext, blank_id)[0]


def _gather_logprobs_fwd(x, labels_ext, blank_id):
  log_z = jax.nn.logsumexp(x, axis=-1)
  idx = jnp.broadcast_to(labels_ext[:, None, :, None], x.shape[:-1] + (1,))
  blank = x[..., blank_id] - log_z
  label = jnp.take_along_axis(x, idx, axis=-1)[..., 0] - log_z
  return (blank, label), (x, log_z, labels_ext)


def _gather_logprobs_bwd(blank_id, residuals, cotangents):
  x, log_z, labels_ext = residuals
  g_blank, g_label = cotangents
  vocab = jnp.arange(x.shape[-1])
  # d log_softmax(x)[k] / d x = onehot(k) - softmax(x), summed over the two gathered entries.
  dx = (jnp.where(vocab == blank_id, g_blank[..., None], 0.0)
        + jnp.where(vocab == labels_ext[:, None, :, None], g_label[..., None], 0.0)
        - jnp.exp(x - log_z[..., None]) * (g_blank + g_label)[..., None])
  return dx.astype(x.dtype), None


_gather_logprobs.defvjp(_gather_logprobs_fwd, _gather_logprobs_bwd)


def _emissions(logits: jax.Array, labels_ext: jax.Array, frame_idx: jax.Array, t_len: jax.Array,
               u_len: jax.Array, blank_id: int, fused: bool = False) -> tuple[jax.Array, jax.Array]:
  """Blank and next-label log-probs of a block of frames.

  Args:
    logits: [batch, frames, labels + 1, vocab] joint logits (any float dtype).
    labels_ext: [batch, labels + 1] int, from `_extend_labels`.
    frame_idx: [frames] absolute frame index of each row of `logits`.
    t_len, u_len: [batch] int frame / label counts.
    fused: gather with `_gather_logprobs` (custom VJP) instead of autodiff through
      `log_softmax`.
  Returns:
    (blank, label), each [batch, frames, labels + 1] in float32 (or wider), -inf on cells
    outside the example's lattice (label also -inf at u = U, where nothing is left to emit).
  """
  blank_ok, label_ok = _cell_masks(frame_idx, t_len, u_len, logits.shape[2])
  # Zero padded cells before normalising so that nothing there (not even inf/nan) leaks in.
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  x = jnp.where(blank_ok[..., None], logits.astype(dtype), 0.0)
  if fused:
    blank, label = _gather_logprobs(x, labels_ext, blank_id)
  else:
    lp = jax.nn.log_softmax(x, axis=-1)
    blank = lp[..., blank_id]
    idx = jnp.broadcast_to(labels_ext[:, None, :, None], lp.shape[:-1] + (1,))
    label = jnp.take_along_axis(lp, idx, axis=-1)[..., 0]
  return jnp.where(blank_ok, blank, _NEG_INF), jnp.where(label_ok, label, _NEG_INF)


def _skew(x: jax.Array) -> jax.Array:
  """[batch, frames, u1] -> anti-diagonals [frames + u1 - 1, batch, u1]; d[n, b, u] = x[b, n - u, u]."""
  _, frames, u1 = x.shape
  t_of = jnp.arange(frames + u1 - 1)[:, None] - jnp.arange(u1)[None, :]  # [n, u1]
  on_grid = (t_of >= 0) & (t_of < frames)
  d = jnp.where(on_grid[None], x[:, jnp.clip(t_of, 0, frames - 1), jnp.arange(u1)[None, :]], _NEG_INF)
  return jnp.swapaxes(d, 0, 1)


def _unskew(d: jax.Array, frames: int) -> jax.Array:
  """Inverse of `_skew`: [frames + u1 - 1, batch, u1] -> [batch, frames, u1]."""
  u1 = d.shape[2]
  n_of = jnp.arange(frames)[:, None] + jnp.arange(u1)[None, :]  # [frames, u1]
  return jnp.transpose(d[n_of, :, jnp.arange(u1)[None, :]], (2, 0, 1))


def _alpha(blank: jax.Array, label: jax.Array) -> jax.Array:
  """Forward log-variables alpha [batch, frames, u1] from emissions [batch, frames, u1]."""
  batch, frames, u1 = blank.shape

  def step(alpha_n, xs):
    blank_n, label_n = xs
    from_blank = alpha_n + blank_n  # (t, u) -> (t + 1, u): same u on the next diagonal
    from_label = alpha_n + label_n  # (t, u) -> (t, u + 1): shift u by one
    pad = jnp.full((batch, 1), _NEG_INF, alpha_n.dtype)
    from_label = jnp.concatenate([pad, from_label[:, :-1]], axis=1)
    return _safe_logaddexp(from_blank, from_label), alpha_n

  alpha0 = jnp.full((batch, u1), _NEG_INF, blank.dtype).at[:, 0].set(0.0)
  _, alpha_d = jax.lax.scan(step, alpha0, (_skew(blank), _skew(label)))
  return _unskew(alpha_d, frames)


def _beta(blank: jax.Array, label: jax.Array, t_len: jax.Array, u_len: jax.Array) -> jax.Array:
  """Backward log-variables beta [batch, frames, u1]: log-prob of finishing from (t, u).

  Cells outside an example's lattice get -inf (their emissions are -inf, and the only
  start, beta(T - 1, U) = blank(T - 1, U), is set on the example's last diagonal).
  """
  batch, frames, u1 = blank.shape
  final_diag = t_len - 1 + u_len
  final_u = jnp.arange(u1)[None, :] == u_len[:, None]  # [b, u1]

  def step(beta_next, xs):
    n, blank_n, label_n = xs
    from_blank = beta_next + blank_n  # (t, u) -> (t + 1, u) is cell u of diagonal n + 1
    pad = jnp.full((batch, 1), _NEG_INF, beta_next.dtype)
    from_label = jnp.concatenate([beta_next[:, 1:], pad], axis=1) + label_n  # -> (t, u + 1)
    beta_n = _safe_logaddexp(from_blank, from_label)
    beta_n = jnp.where((n == final_diag)[:, None] & final_u, blank_n, beta_n)
    return beta_n, beta_n

  n_diag = frames + u1 - 1
  beta_init = jnp.full((batch, u1), _NEG_INF, blank.dtype)
  _, beta_d = jax.lax.scan(step, beta_init, (jnp.arange(n_diag), _skew(blank), _skew(label)),
                           reverse=True)
  return _unskew(beta_d, frames)


def _log_likelihood(alpha: jax.Array, blank: jax.Array, t_len: jax.Array,
                    u_len: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log Z [batch] = alpha(T - 1, U) + blank(T - 1, U), and whether it is usable [batch] bool."""
  batch_idx = jnp.arange(alpha.shape[0])
  t_last = jnp.maximum(t_len - 1, 0)
  log_z = alpha[batch_idx, t_last, u_len] + blank[batch_idx, t_last, u_len]
  return log_z, (t_len > 0) & jnp.isfinite(log_z)


def _nll(log_z: jax.Array, ok: jax.Array, t_len: jax.Array, u_len: jax.Array) -> jax.Array:
  """-log Z where usable, else 0 (no frames, no labels) or INFEASIBLE_LOSS."""
  empty = (t_len == 0) & (u_len == 0)
  nll = -jnp.where(ok, log_z, 0.0)
  return jnp.where(ok, nll, jnp.where(empty, 0.0, INFEASIBLE_LOSS)).astype(log_z.dtype)


def _no_frames_nll(t_len: jax.Array, u_len: jax.Array) -> jax.Array:
  """NLL [batch] when the frame axis is statically empty: 0 without labels, else infeasible."""
  return jnp.where(u_len == 0, 0.0, INFEASIBLE_LOSS).astype(jnp.float32)


def _rnnt_from_emissions(blank: jax.Array, label: jax.Array, t_len: jax.Array,
                         u_len: jax.Array) -> jax.Array:
  """Per-example NLL [batch] from masked blank / label log-probs [batch, frames, labels + 1].

  Differentiated by autodiff through the alpha scan (the reference for `_lattice_nll`).
  """
  alpha = _alpha(blank, label)
  log_z, ok = _log_likelihood(alpha, blank, t_len, u_len)
  return _nll(log_z, ok, t_len, u_len)


@jax.custom_vjp
def _lattice_nll(blank: jax.Array, label: jax.Array, t_len: jax.Array, u_len: jax.Array) -> jax.Array:
  """`_rnnt_from_emissions` whose gradient is the alpha-beta occupation (no autodiff of the scan).

  Args:
    blank, label: [batch, frames, u1] log-probs, -inf outside each example's lattice
      (as `_emissions` returns them); frames > 0.
    t_len, u_len: [batch] int32 lengths, at most frames and u1 - 1.
  Returns:
    [batch] NLL in the emissions' dtype.
  """
  return _lattice_nll_fwd(blank, label, t_len, u_len)[0]


def _lattice_nll_fwd(blank, label, t_len, u_len):
  alpha = _alpha(blank, label)
  log_z, ok = _log_likelihood(alpha, blank, t_len, u_len)
  return _nll(log_z, ok, t_len, u_len), (alpha, blank, label, t_len, u_len, log_z, ok)


def _lattice_nll_bwd(residuals, g):
  alpha, blank, label, t_len, u_len, log_z, ok = residuals
  batch, frames, u1 = blank.shape
  beta = _beta(blank, label, t_len, u_len)
  # beta(t + 1, u); the final blank at (T - 1, U) ends the alignment: beta(T, U) = 0.
  beta_after_blank = jnp.concatenate([beta[:, 1:], jnp.full((batch, 1, u1), _NEG_INF, beta.dtype)], axis=1)
  final_cell = ((jnp.arange(frames)[None, :, None] == (t_len - 1)[:, None, None])
                & (jnp.arange(u1)[None, None, :] == u_len[:, None, None]))
  beta_after_blank = jnp.where(final_cell, 0.0, beta_after_blank)
  beta_after_label = jnp.concatenate([beta[:, :, 1:], jnp.full((batch, frames, 1), _NEG_INF, beta.dtype)],
                                     axis=2)
  keep = ok[:, None, None]
  log_z = jnp.where(keep, log_z[:, None, None], 0.0)
  scale = -g.astype(blank.dtype)[:, None, None]
  # Cells off the lattice have -inf in alpha or the emission: exp(-inf) = 0 exactly.
  g_blank = jnp.where(keep, scale * jnp.exp(alpha + blank + beta_after_blank - log_z), 0.0)
  g_label = jnp.where(keep, scale * jnp.exp(alpha + label + beta_after_label - log_z), 0.0)
  return g_blank, g_label, None, None


_lattice_nll.defvjp(_lattice_nll_fwd, _lattice_nll_bwd)


def _check_paddings(batch: int, frames: int, n_labels: int, logit_paddings: jax.Array,
                    label_paddings: jax.Array, labels: jax.Array | None = None) -> None:
  """ValueError unless the paddings (and labels) fit a [batch, frames, n_labels + 1] lattice."""
  if logit_paddings.shape != (batch, frames):
    raise ValueError(f"logit_paddings has shape {logit_paddings.shape}; expected (batch, frames) = "
                     f"{(batch, frames)}.")
  for name, x in (("label_paddings", label_paddings), ("labels", labels)):
    if x is not None and x.shape != (batch, n_labels):
      raise ValueError(f"{name} has shape {x.shape}; expected (batch, labels) = {(batch, n_labels)}, one label "
                       "fewer than the labels + 1 axis of the logits / predictor output.")


def _check_blank_id(blank_id: int, vocab: int) -> None:
  if not 0 <= blank_id < vocab:
    raise ValueError(f"blank_id={blank_id} is outside the vocabulary [0, {vocab}).")


def _logit_lengths(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array, label_paddings: jax.Array,
                   blank_id: int) -> tuple[jax.Array, jax.Array]:
  """Checks full joint logits [batch, frames, labels + 1, vocab] against the paddings, labels and blank;
  returns the lengths T, U [batch]."""
  if logits.ndim != 4:
    raise ValueError(f"logits must be [batch, frames, labels + 1, vocab]; got shape {logits.shape}.")
  batch, frames, u1, vocab = logits.shape
  _check_paddings(batch, frames, u1 - 1, logit_paddings, label_paddings, labels)
  _check_blank_id(blank_id, vocab)
  return _lengths(logit_paddings, label_paddings)


def rnnt_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array,
              label_paddings: jax.Array, blank_id: int = BLANK_ID) -> jax.Array:
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
    gradient; one with neither frames nor labels returns 0. Gradients are finite (plain
    autodiff; `rnnt_loss_from_joint` is the memory-lean variant).
  """
  t_len, u_len = _logit_lengths(logits, logit_paddings, labels, label_paddings, blank_id)
  frames = logits.shape[1]
  if frames == 0:
    return _no_frames_nll(t_len, u_len)
  blank, label = _emissions(logits, _extend_labels(labels), jnp.arange(frames), t_len, u_len, blank_id)
  return _rnnt_from_emissions(blank, label, t_len, u_len)


def _masked_lattice(blank_logprobs: jax.Array, label_logprobs: jax.Array, logit_paddings: jax.Array,
                    label_paddings: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Checks the two [batch, frames, labels + 1] log-prob arrays against the paddings; returns them in
  float32 (or wider) with -inf off each example's lattice, and the lengths T, U [batch]."""
  if blank_logprobs.ndim != 3 or blank_logprobs.shape != label_logprobs.shape:
    raise ValueError(f"blank_logprobs / label_logprobs must both be [batch, frames, labels + 1]; got shapes "
                     f"{blank_logprobs.shape} / {label_logprobs.shape}.")
  batch, frames, u1 = blank_logprobs.shape
  _check_paddings(batch, frames, u1 - 1, logit_paddings, label_paddings)
  t_len, u_len = _lengths(logit_paddings, label_paddings)
  blank_ok, label_ok = _cell_masks(jnp.arange(frames), t_len, u_len, u1)
  dtype = jnp.promote_types(blank_logprobs.dtype, jnp.float32)
  blank = jnp.where(blank_ok, blank_logprobs.astype(dtype), _NEG_INF)
  label = jnp.where(label_ok, label_logprobs.astype(dtype), _NEG_INF)
  return blank, label, t_len, u_len


def rnnt_loss_from_logprobs(blank_logprobs: jax.Array, label_logprobs: jax.Array, logit_paddings: jax.Array,
                            label_paddings: jax.Array) -> jax.Array:
  """Per-example RNN-T NLL from the two log-probs each lattice cell uses.

  Args:
    blank_logprobs: [batch, frames, labels + 1] log P(blank | t, u) (any float dtype).
    label_logprobs: [batch, frames, labels + 1] log P(labels[u] | t, u); row u = labels
      is never used.
    logit_paddings: [batch, frames], 1.0 on padded frames.
    label_paddings: [batch, labels], 1.0 on padded labels.
  Returns:
    [batch] NLL in float32 (float64 for float64 inputs), with `rnnt_loss`'s conventions for
    padding, empty and infeasible examples. The gradient is the closed-form alpha-beta
    occupation (custom VJP running the beta recursion), exactly zero off the lattice.
  """
  blank, label, t_len, u_len = _masked_lattice(blank_logprobs, label_logprobs, logit_paddings, label_paddings)
  if blank.shape[1] == 0:
    return _no_frames_nll(t_len, u_len)
  return _lattice_nll(blank, label, t_len, u_len)


def rnnt_loss_from_joint(encoder_out: jax.Array, predictor_out: jax.Array, joint_fn: JointFn, joint_params: Any,
                         logit_paddings: jax.Array, labels: jax.Array, label_paddings: jax.Array,
                         blank_id: int = BLANK_ID, frame_chunk: int = 16) -> jax.Array:
  """Memory-lean `rnnt_loss`: the joint logits exist one chunk of frames at a time.

  Args:
    encoder_out: [batch, frames, d_enc].
    predictor_out: [batch, labels + 1, d_pred]; row u has seen labels[:u].
    joint_fn: (joint_params, encoder chunk [batch, chunk, 1, d_enc], predictor_out
      [batch, 1, labels + 1, d_pred]) -> logits [batch, chunk, labels + 1, vocab], any float
      dtype; a joint that broadcasts its two inputs gives the full lattice from
      (encoder_out[:, :, None], predictor_out[:, None]). It may also close over arrays
      (gradients reach those too). For an nnx module, pass its state:
      `graphdef, state = nnx.split(joint)`, `joint_fn = lambda s, e, p: nnx.merge(graphdef, s)(e, p)`.
    joint_params: pytree handed to joint_fn (None if it needs nothing); gradients flow to it.
    logit_paddings, labels, label_paddings, blank_id: as in `rnnt_loss`.
    frame_chunk: frames per joint evaluation; peak logits memory is about
      [batch, frame_chunk, labels + 1, vocab] in the forward and in the backward pass.
  Returns:
    [batch] float32 NLL (float64 for float64 logits), equal to
    `rnnt_loss(joint_fn(joint_params, encoder_out[:, :, None], predictor_out[:, None]), ...)`
    with the same
    padding / infeasible conventions. Backward: each chunk's logits are recomputed, the
    lattice gradient comes from the beta recursion and the log-softmax gradient is fused
    (see the module docstring); only [batch, frames, labels + 1] arrays span all frames.
  """
  if encoder_out.ndim != 3 or predictor_out.ndim != 3 or predictor_out.shape[0] != encoder_out.shape[0]:
    raise ValueError(f"encoder_out must be [batch, frames, d_enc] and predictor_out [batch, labels + 1, d_pred]; "
                     f"got shapes {encoder_out.shape} and {predictor_out.shape}.")
  if frame_chunk < 1:
    raise ValueError(f"frame_chunk must be a positive number of frames, got {frame_chunk}.")
  batch, frames, d_enc = encoder_out.shape
  u1 = predictor_out.shape[1]
  _check_paddings(batch, frames, u1 - 1, logit_paddings, label_paddings, labels)
  t_len, u_len = _lengths(logit_paddings, label_paddings)
  if frames == 0:
    return _no_frames_nll(t_len, u_len)

  labels_ext = _extend_labels(labels)
  chunk = min(frame_chunk, frames)
  n_chunks = -(-frames // chunk)
  enc = jnp.pad(encoder_out, ((0, 0), (0, n_chunks * chunk - frames), (0, 0)))
  enc = jnp.swapaxes(enc.reshape(batch, n_chunks, chunk, d_enc), 0, 1)  # [n_chunks, b, chunk, d]

  def chunk_emissions(enc_c, start):
    logits = joint_fn(joint_params, enc_c[:, :, None, :], predictor_out[:, None, :, :])
    if logits.ndim != 4 or logits.shape[:3] != (batch, chunk, u1):
      raise ValueError(f"joint_fn returned shape {logits.shape}; expected [batch, chunk, labels + 1, vocab] with "
                       f"(batch, chunk, labels + 1) = {(batch, chunk, u1)}.")
    _check_blank_id(blank_id, logits.shape[-1])
    return _emissions(logits, labels_ext, start + jnp.arange(chunk), t_len, u_len, blank_id, fused=True)

  # Under jax.checkpoint the backward pass recomputes each chunk's logits from its inputs.
  chunk_emissions = jax.checkpoint(chunk_emissions, prevent_cse=False)
  blank, label = jax.lax.map(lambda xs: chunk_emissions(*xs), (enc, jnp.arange(n_chunks) * chunk))

  def unchunk(x):  # [n_chunks, b, chunk, u1] -> [b, frames, u1]
    return jnp.swapaxes(x, 0, 1).reshape(batch, n_chunks * chunk, u1)[:, :frames]

  return _lattice_nll(unchunk(blank), unchunk(label), t_len, u_len)


def emission_logprobs(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array, label_paddings: jax.Array,
                      blank_id: int = BLANK_ID) -> tuple[jax.Array, jax.Array]:
  """The two log-probs each lattice cell uses, from full joint logits.

  Args:
    logits, logit_paddings, labels, label_paddings, blank_id: as in `rnnt_loss`.
  Returns:
    (blank, label), each [batch, frames, labels + 1] float32: log P(blank | t, u) and
    log P(labels[u] | t, u), -inf off each example's lattice (the input of
    `rnnt_loss_from_logprobs` and `viterbi_alignment`).
  """
  t_len, u_len = _logit_lengths(logits, logit_paddings, labels, label_paddings, blank_id)
  return _emissions(logits, _extend_labels(labels), jnp.arange(logits.shape[1]), t_len, u_len, blank_id)


def viterbi_alignment(blank_logprobs: jax.Array, label_logprobs: jax.Array, logit_paddings: jax.Array,
                      label_paddings: jax.Array) -> jax.Array:
  """The frame at which the most likely alignment emits each label (forced alignment).

  The max-product version of the loss's alpha recursion, over the same anti-diagonals,
  remembering at each cell whether the best path arrived by a label or by a blank; then a
  backtrack from the final cell (T - 1, U). Ties go to the blank. Not differentiable (use it
  under `jax.lax.stop_gradient` inputs).

  Args:
    blank_logprobs, label_logprobs: [batch, frames, labels + 1] (as `emission_logprobs`
      returns them; cells off the lattice are masked here again).
    logit_paddings: [batch, frames], 1.0 on padded frames.
    label_paddings: [batch, labels], 1.0 on padded labels.
  Returns:
    emit_frames [batch, labels] int32: frame index t of label u's emission, nondecreasing in
    u; -1 on padded labels and for every label of an example with no alignment (no frames).
  """
  blank, label, t_len, u_len = _masked_lattice(blank_logprobs, label_logprobs, logit_paddings, label_paddings)
  batch, frames, u1 = blank.shape
  if frames == 0:
    return jnp.full((batch, u1 - 1), -1, jnp.int32)

  def step(best_n, xs):
    blank_n, label_n = xs
    from_blank = best_n + blank_n
    pad = jnp.full((batch, 1), _NEG_INF, best_n.dtype)
    from_label = jnp.concatenate([pad, (best_n + label_n)[:, :-1]], axis=1)
    by_label = from_label > from_blank
    return jnp.where(by_label, from_label, from_blank), by_label

  best0 = jnp.full((batch, u1), _NEG_INF, blank.dtype).at[:, 0].set(0.0)
  _, by_label_next = jax.lax.scan(step, best0, (_skew(blank), _skew(label)))
  # by_label_next[n] is the choice on diagonal n + 1; diagonal 0 is the start.
  by_label_d = jnp.concatenate([jnp.zeros((1, batch, u1), bool), by_label_next[:-1]], axis=0)
  by_label = _unskew(by_label_d, frames)  # [batch, frames, u1]
  batch_idx = jnp.arange(batch)

  def back(carry, _):
    t, u, emit = carry
    active = (t + u) > 0
    label_move = active & (u > 0) & by_label[batch_idx, jnp.maximum(t, 0), u]
    emit = emit.at[batch_idx, jnp.maximum(u - 1, 0)].set(
        jnp.where(label_move, t, emit[batch_idx, jnp.maximum(u - 1, 0)]))
    u = jnp.where(label_move, u - 1, u)
    t = jnp.where(active & ~label_move, t - 1, t)
    return (t, u, emit), None

  start = (jnp.maximum(t_len - 1, 0), u_len, jnp.full((batch, u1), -1, jnp.int32))
  (_, _, emit), _ = jax.lax.scan(back, start, None, length=frames + u1 - 2)
  feasible = (t_len > 0)[:, None] & (jnp.arange(u1 - 1)[None, :] < u_len[:, None])
  return jnp.where(feasible, emit[:, :u1 - 1], -1)
