"""RNN-T loss against brute-force alignment enumeration, finite differences and padding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm_jax.losses import rnnt

VOCAB = 5
T_MAX, U_MAX = 4, 3

rnnt_loss = jax.jit(rnnt.rnnt_loss, static_argnames="blank_id")


def _brute_force_nll(logits, labels, blank_id=0):
  """-log sum over all alignments; logits [T, U + 1, vocab] float64, labels [U]."""
  frames, u1, _ = logits.shape
  n_labels = u1 - 1
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total = 0.0
  # T blanks and U labels; the last symbol is always the final blank.
  for label_slots in itertools.combinations(range(frames + n_labels - 1), n_labels):
    t = u = 0
    log_p = 0.0
    for i in range(frames + n_labels - 1):
      if i in label_slots:
        log_p += lp[t, u, labels[u]]
        u += 1
      else:
        log_p += lp[t, u, blank_id]
        t += 1
    log_p += lp[t, u, blank_id]
    assert (t, u) == (frames - 1, n_labels)
    total += np.exp(log_p)
  return -np.log(total)


def _padded_batch(rng, lengths, t_max=T_MAX, u_max=U_MAX, vocab=VOCAB):
  """Random padded batch for (T, U) lengths; padded logits are garbage on purpose."""
  b = len(lengths)
  logits = rng.normal(size=(b, t_max, u_max + 1, vocab)).astype(np.float32) * 2
  labels = rng.integers(1, vocab, size=(b, u_max)).astype(np.int32)
  logit_pad = np.ones((b, t_max), np.float32)
  label_pad = np.ones((b, u_max), np.float32)
  for i, (t, u) in enumerate(lengths):
    logit_pad[i, :t] = 0
    label_pad[i, :u] = 0
  return logits, logit_pad, labels, label_pad


ALL_LENGTHS = [(t, u) for t in range(1, T_MAX + 1) for u in range(U_MAX + 1)]


def test_matches_brute_force_padded_batch():
  rng = np.random.default_rng(0)
  logits, logit_pad, labels, label_pad = _padded_batch(rng, ALL_LENGTHS)
  got = np.asarray(rnnt_loss(logits, logit_pad, labels, label_pad))
  assert got.dtype == np.float32
  want = [_brute_force_nll(logits[i, :t, :u + 1].astype(np.float64), labels[i, :u])
          for i, (t, u) in enumerate(ALL_LENGTHS)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,u,blank_id", [(3, 2, 0), (1, 3, 2), (4, 0, 4)])
def test_matches_brute_force_unpadded(t, u, blank_id):
  rng = np.random.default_rng(t * 10 + u)
  logits = rng.normal(size=(1, t, u + 1, VOCAB)).astype(np.float32)
  labels = rng.integers(0, VOCAB, size=(1, u)).astype(np.int32)
  got = rnnt.rnnt_loss(logits, np.zeros((1, t), np.float32), labels, np.zeros((1, u), np.float32),
                       blank_id=blank_id)
  want = _brute_force_nll(logits[0].astype(np.float64), labels[0], blank_id)
  np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-5)


def test_per_example_equals_batched_and_padding_is_inert():
  rng = np.random.default_rng(1)
  lengths = [(4, 3), (2, 1), (3, 0), (1, 2)]
  logits, logit_pad, labels, label_pad = _padded_batch(rng, lengths)
  batched = np.asarray(rnnt_loss(logits, logit_pad, labels, label_pad))
  for i, (t, u) in enumerate(lengths):
    sl = slice(i, i + 1)
    single = rnnt.rnnt_loss(logits[sl, :t, :u + 1], logit_pad[sl, :t], labels[sl, :u],
                            label_pad[sl, :u])
    np.testing.assert_allclose(batched[i], np.asarray(single)[0], rtol=1e-6)

  # Garbage (including inf / nan) at padded frames, rows and labels changes nothing.
  valid = np.zeros(logits.shape[:3], bool)
  for i, (t, u) in enumerate(lengths):
    valid[i, :t, :u + 1] = True
  noisy = np.where(valid[..., None], logits, rng.normal(size=logits.shape) * 100)
  noisy = noisy.astype(np.float32)
  noisy[~valid] = np.nan
  noisy[0, :, :, 0] = np.where(valid[0], noisy[0, :, :, 0], np.inf)
  noisy_labels = np.where(label_pad > 0, rng.integers(0, VOCAB, size=labels.shape), labels)
  noisy_labels = noisy_labels.astype(np.int32)
  noisy_loss = rnnt_loss(noisy, logit_pad, noisy_labels, label_pad)
  np.testing.assert_array_equal(np.asarray(noisy_loss), batched)

  grads = jax.grad(lambda x: rnnt_loss(x, logit_pad, noisy_labels, label_pad).sum())(noisy)
  grads = np.asarray(grads)
  assert np.all(np.isfinite(grads))
  assert np.all(grads[~valid] == 0)


def test_gradient_matches_finite_differences_f64():
  rng = np.random.default_rng(2)
  lengths = [(3, 2), (2, 1)]
  logits, logit_pad, labels, label_pad = _padded_batch(rng, lengths, t_max=3, u_max=2, vocab=4)
  weights = np.array([1.0, 0.7])
  valid = np.zeros(logits.shape, bool)
  for i, (t, u) in enumerate(lengths):
    valid[i, :t, :u + 1] = True
  with jax.enable_x64(True):
    x = jnp.asarray(logits, jnp.float64)
    f = jax.jit(lambda z: jnp.sum(rnnt.rnnt_loss(z, logit_pad, labels, label_pad) * weights))
    assert f(x).dtype == jnp.float64
    grad = np.asarray(jax.grad(f)(x))
    # Central differences on every valid coordinate at once: one batched evaluation.
    eps = 1e-5
    coords = np.argwhere(valid)
    bumps = np.zeros((len(coords),) + logits.shape)
    bumps[np.arange(len(coords)), *coords.T] = eps
    f_many = jax.jit(jax.vmap(f))
    fd = (np.asarray(f_many(x + bumps)) - np.asarray(f_many(x - bumps))) / (2 * eps)
  np.testing.assert_allclose(grad[valid], fd, rtol=1e-6, atol=1e-8)
  assert np.all(grad[~valid] == 0)
  # Softmax invariance: the gradient over the vocab sums to zero in each cell.
  np.testing.assert_allclose(grad.sum(-1), 0, atol=1e-12)


def test_bf16_logits_close_to_f32():
  rng = np.random.default_rng(3)
  logits, logit_pad, labels, label_pad = _padded_batch(rng, ALL_LENGTHS[:6])
  bf = jnp.asarray(logits, jnp.bfloat16)
  got = rnnt_loss(bf, logit_pad, labels, label_pad)
  assert got.dtype == jnp.float32
  want = rnnt_loss(bf.astype(jnp.float32), logit_pad, labels, label_pad)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  f32 = rnnt_loss(logits, logit_pad, labels, label_pad)
  np.testing.assert_allclose(np.asarray(got), np.asarray(f32), rtol=2e-2)


def test_infeasible_and_empty_examples_are_finite():
  rng = np.random.default_rng(4)
  # Row 0: labels but all frames padded; row 1: nothing at all; row 2: normal.
  logits, logit_pad, labels, label_pad = _padded_batch(rng, [(0, 2), (0, 0), (2, 1)])

  def f(x):
    return rnnt_loss(x, logit_pad, labels, label_pad)

  loss = np.asarray(f(logits))
  assert loss[0] == rnnt.INFEASIBLE_LOSS
  assert loss[1] == 0.0
  assert np.isfinite(loss[2]) and 0 < loss[2] < 100
  grads = np.asarray(jax.grad(lambda x: f(x).sum())(logits))
  assert np.all(np.isfinite(grads))
  assert np.all(grads[:2] == 0) and np.any(grads[2] != 0)

  # Zero frames statically.
  zero_t = jnp.zeros((2, 0, 3, VOCAB))
  lab = np.ones((2, 2), np.int32)
  lab_pad = np.array([[0, 0], [1, 1]], np.float32)
  out = rnnt.rnnt_loss(zero_t, jnp.zeros((2, 0)), lab, lab_pad)
  np.testing.assert_array_equal(np.asarray(out), [rnnt.INFEASIBLE_LOSS, 0.0])
  g = jax.grad(lambda x: rnnt.rnnt_loss(x, jnp.zeros((2, 0)), lab, lab_pad).sum())(zero_t)
  assert g.shape == zero_t.shape


def test_from_joint_matches_full_logits():
  rng = np.random.default_rng(5)
  b, t_max, u_max, d, vocab = 3, 7, 3, 6, VOCAB
  lengths = [(7, 3), (5, 1), (2, 0)]
  _, logit_pad, labels, label_pad = _padded_batch(rng, lengths, t_max, u_max, vocab)
  enc = jnp.asarray(rng.normal(size=(b, t_max, d)), jnp.float32)
  pred = jnp.asarray(rng.normal(size=(b, u_max + 1, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)

  def joint(w, e, p):
    return jnp.tanh(e[:, :, None, :] + p[:, None, :, :]) @ w

  def full(w, e, p):
    return rnnt.rnnt_loss(joint(w, e, p), logit_pad, labels, label_pad).sum()

  def chunked(w, e, p):
    return rnnt.rnnt_loss_from_joint(e, p, lambda ec, pc: joint(w, ec, pc), logit_pad, labels,
                                     label_pad, frame_chunk=3).sum()

  want, want_g = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2)))(w, enc, pred)
  got, got_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(w, enc, pred)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b_ in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)
  # Padded encoder frames get no gradient.
  assert np.all(np.asarray(got_g[1])[1, 5:] == 0)
