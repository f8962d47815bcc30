"""RNN-T loss against brute-force alignment enumeration, finite differences and padding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.losses import rnnt

VOCAB = 5
T_MAX, U_MAX = 4, 3

rnnt_loss = jax.jit(rnnt.rnnt_loss, static_argnames="blank_id")


def _alignments(frames, n_labels):
  """Every alignment as a list of moves ("blank" | "label", t, u); the last is the final blank."""
  for label_slots in itertools.combinations(range(frames + n_labels - 1), n_labels):
    t = u = 0
    moves = []
    for i in range(frames + n_labels - 1):
      if i in label_slots:
        moves.append(("label", t, u))
        u += 1
      else:
        moves.append(("blank", t, u))
        t += 1
    assert (t, u) == (frames - 1, n_labels)
    moves.append(("blank", t, u))
    yield moves


def _brute_force_from_logprobs(blank, label):
  """NLL and occupation gradients by enumerating alignments.

  blank, label: [T, U + 1] float64 log-probs. Returns (nll, d nll / d blank, d nll / d label):
  the gradient on a move is minus the posterior probability of the alignments that use it.
  """
  frames, u1 = blank.shape
  paths = list(_alignments(frames, u1 - 1))
  log_p = np.array([sum(blank[t, u] if kind == "blank" else label[t, u] for kind, t, u in moves)
                    for moves in paths])
  log_z = np.log(np.sum(np.exp(log_p - log_p.max()))) + log_p.max()
  grads = {"blank": np.zeros_like(blank), "label": np.zeros_like(label)}
  for moves, lp in zip(paths, log_p):
    for kind, t, u in moves:
      grads[kind][t, u] -= np.exp(lp - log_z)
  return -log_z, grads["blank"], grads["label"]


def _brute_force_nll(logits, labels, blank_id=rnnt.BLANK_ID):
  """-log sum over all alignments; logits [T, U + 1, vocab] float64, labels [U]."""
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  n_labels = len(labels)
  label_lp = np.zeros(lp.shape[:2])
  label_lp[:, :n_labels] = np.take_along_axis(lp[:, :n_labels], np.asarray(labels)[None, :, None], -1)[..., 0]
  return _brute_force_from_logprobs(lp[..., blank_id], label_lp)[0]


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
  got = rnnt_loss(logits, np.zeros((1, t), np.float32), labels, np.zeros((1, u), np.float32),
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
    single = rnnt_loss(logits[sl, :t, :u + 1], logit_pad[sl, :t], labels[sl, :u], label_pad[sl, :u])
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


# The lattice with the beta-recursion VJP (rnnt_loss_from_logprobs) and the memory-lean
# joint entry point (rnnt_loss_from_joint), against brute force and the plain autodiff path.


def test_from_logprobs_value_and_gradient_match_brute_force_occupations():
  rng = np.random.default_rng(6)
  lengths = ALL_LENGTHS + [(0, 2), (0, 0)]
  b = len(lengths)
  # Unnormalised log-probs: the lattice itself does not need them to be normalised.
  blank = rng.normal(size=(b, T_MAX, U_MAX + 1)) - 1.0
  label = rng.normal(size=(b, T_MAX, U_MAX + 1)) - 1.0
  _, logit_pad, _, label_pad = _padded_batch(rng, lengths)
  valid_blank = np.zeros(blank.shape, bool)
  valid_label = np.zeros(label.shape, bool)
  for i, (t, u) in enumerate(lengths):
    valid_blank[i, :t, :u + 1] = True
    valid_label[i, :t, :u] = True
  # Garbage (nan, inf) off the lattice changes nothing.
  blank_in = np.where(valid_blank, blank, np.nan).astype(np.float32)
  label_in = np.where(valid_label, label, np.inf).astype(np.float32)
  weights = rng.uniform(0.5, 2.0, size=b)

  def f(x, y):
    return jnp.sum(rnnt.rnnt_loss_from_logprobs(x, y, logit_pad, label_pad) * weights)

  nll = np.asarray(jax.jit(rnnt.rnnt_loss_from_logprobs)(blank_in, label_in, logit_pad, label_pad))
  g_blank, g_label = map(np.asarray, jax.jit(jax.grad(f, argnums=(0, 1)))(blank_in, label_in))
  assert nll.dtype == np.float32
  for i, (t, u) in enumerate(lengths):
    if t == 0:
      assert nll[i] == (0.0 if u == 0 else rnnt.INFEASIBLE_LOSS)
      continue
    want, want_blank, want_label = _brute_force_from_logprobs(
        blank_in[i, :t, :u + 1].astype(np.float64), label_in[i, :t, :u + 1].astype(np.float64))
    np.testing.assert_allclose(nll[i], want, rtol=1e-5)
    np.testing.assert_allclose(g_blank[i, :t, :u + 1], weights[i] * want_blank, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_label[i, :t, :u], weights[i] * want_label[:, :u], rtol=1e-5, atol=1e-6)
  assert np.all(g_blank[~valid_blank] == 0) and np.all(g_label[~valid_label] == 0)


def test_from_logprobs_gradient_equals_autodiff_of_alpha_scan():
  rng = np.random.default_rng(7)
  lengths = [(12, 6), (9, 2), (12, 0), (3, 6), (1, 1)]
  logits, logit_pad, labels, label_pad = _padded_batch(rng, lengths, t_max=12, u_max=6, vocab=6)
  blank_id = 3

  def via_logprobs(x):
    lp = jax.nn.log_softmax(x, axis=-1)
    label_lp = jnp.take_along_axis(lp[:, :, :-1], labels[:, None, :, None], axis=-1)[..., 0]
    label_lp = jnp.pad(label_lp, ((0, 0), (0, 0), (0, 1)))
    return rnnt.rnnt_loss_from_logprobs(lp[..., blank_id], label_lp, logit_pad, label_pad)

  def via_logits(x):
    return rnnt.rnnt_loss(x, logit_pad, labels, label_pad, blank_id=blank_id)

  weights = rng.uniform(0.5, 2.0, size=len(lengths))
  got, got_g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(via_logprobs(x) * weights)))(logits)
  want, want_g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(via_logits(x) * weights)))(logits)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-6)


def _joint(params, enc, pred):
  """A small transducer joint: tanh(enc W_e + pred W_p) W_o + b on broadcastable inputs.

  enc [b, c, 1, d] and pred [b, 1, u1, d] give logits [b, c, u1, V].
  """
  hidden = jnp.tanh(enc @ params["enc"] + pred @ params["pred"])
  return hidden @ params["out"] + params["bias"]


def _full_logits(joint_fn, params, enc, pred):
  """The whole lattice of logits [b, T, u1, V] from enc [b, T, d] and pred [b, u1, d]."""
  return joint_fn(params, enc[:, :, None], pred[:, None])


def _joint_problem(rng, lengths, t_max, u_max, vocab=VOCAB, dim=5, hidden=6, dtype=jnp.float32):
  """Random encoder / predictor outputs and joint parameters for a padded batch."""
  _, logit_pad, labels, label_pad = _padded_batch(rng, lengths, t_max, u_max, vocab)
  b = len(lengths)
  enc = jnp.asarray(rng.normal(size=(b, t_max, dim)), dtype)
  pred = jnp.asarray(rng.normal(size=(b, u_max + 1, dim)), dtype)
  params = {"enc": rng.normal(size=(dim, hidden)), "pred": rng.normal(size=(dim, hidden)),
            "out": rng.normal(size=(hidden, vocab)) * 2, "bias": rng.normal(size=(vocab,))}
  params = {k: jnp.asarray(v / np.sqrt(v.shape[0]) if v.ndim == 2 else v, dtype) for k, v in params.items()}
  return enc, pred, params, logit_pad, labels, label_pad


def _plain_and_lean(logit_pad, labels, label_pad, blank_id=0, frame_chunk=3):
  """Summed-loss functions of (params, enc, pred): full logits + autodiff, and the lean path."""
  def plain(params, enc, pred):
    return jnp.sum(rnnt.rnnt_loss(_full_logits(_joint, params, enc, pred), logit_pad, labels, label_pad, blank_id))

  def lean(params, enc, pred):
    return jnp.sum(rnnt.rnnt_loss_from_joint(enc, pred, _joint, params, logit_pad, labels, label_pad,
                                             blank_id=blank_id, frame_chunk=frame_chunk))

  return plain, lean


MIXED_LENGTHS = [(7, 3), (5, 1), (2, 0), (7, 0), (1, 3), (0, 2), (0, 0)]


@pytest.mark.parametrize("frame_chunk,blank_id", [(3, 2), (50, 4)])
def test_from_joint_value_and_gradients_match_full_logits(frame_chunk, blank_id):
  rng = np.random.default_rng(8 + frame_chunk)
  enc, pred, params, logit_pad, labels, label_pad = _joint_problem(rng, MIXED_LENGTHS, t_max=7, u_max=3)
  weights = rng.uniform(0.5, 2.0, size=len(MIXED_LENGTHS))

  def weighted(per_example_fn):
    def f(params, enc, pred):
      nll = per_example_fn(params, enc, pred)
      return jnp.sum(nll * weights), nll
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (want, want_rows), want_g = weighted(lambda p, e, q: rnnt.rnnt_loss(
      _full_logits(_joint, p, e, q), logit_pad, labels, label_pad, blank_id))(params, enc, pred)
  (got, got_rows), got_g = weighted(lambda p, e, q: rnnt.rnnt_loss_from_joint(
      e, q, _joint, p, logit_pad, labels, label_pad, blank_id=blank_id, frame_chunk=frame_chunk))(params, enc, pred)
  assert got_rows.dtype == jnp.float32
  assert got_rows[5] == rnnt.INFEASIBLE_LOSS and got_rows[6] == 0
  np.testing.assert_allclose(np.asarray(got_rows), np.asarray(want_rows), rtol=1e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    scale = np.max(np.abs(np.asarray(w)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6 * scale)
  g_enc, g_pred = np.asarray(got_g[1]), np.asarray(got_g[2])
  for i, (t, u) in enumerate(MIXED_LENGTHS):
    assert np.all(g_enc[i, t:] == 0) and np.all(g_pred[i, u + 1:] == 0)  # padded frames / rows
    assert np.any(g_enc[i, :t] != 0) == (t > 0)
  assert np.all(np.isfinite(g_enc)) and np.all(np.isfinite(g_pred))


def test_from_joint_matches_full_logits_in_float64():
  rng = np.random.default_rng(9)
  with jax.enable_x64(True):
    enc, pred, params, logit_pad, labels, label_pad = _joint_problem(
        rng, [(6, 2), (4, 3), (6, 0)], t_max=6, u_max=3, dtype=jnp.float64)
    plain, lean = _plain_and_lean(logit_pad, labels, label_pad, blank_id=1, frame_chunk=4)
    want, want_g = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(params, enc, pred)
    got, got_g = jax.jit(jax.value_and_grad(lean, argnums=(0, 1, 2)))(params, enc, pred)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      assert g.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)


class _NnxJoint(nnx.Module):
  """The joint of `_joint` as an nnx module: (enc [b, c, 1, d], pred [b, 1, u1, d]) -> [b, c, u1, vocab]."""

  def __init__(self, dim: int, hidden: int, vocab: int, rngs: nnx.Rngs):
    self.enc = nnx.Linear(dim, hidden, rngs=rngs)
    self.pred = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(hidden, vocab, rngs=rngs)

  def __call__(self, enc, pred):
    return self.out(jnp.tanh(self.enc(enc) + self.pred(pred)))


def test_from_joint_gradients_reach_nnx_modules_closed_over_or_split():
  rng = np.random.default_rng(10)
  enc, pred, _, logit_pad, labels, label_pad = _joint_problem(rng, [(5, 2), (3, 1)], t_max=5, u_max=2)
  module = _NnxJoint(enc.shape[-1], 6, VOCAB, nnx.Rngs(0))

  def plain(m):
    return jnp.sum(rnnt.rnnt_loss(_full_logits(lambda _, e, q: m(e, q), None, enc, pred), logit_pad, labels, label_pad))

  def lean_closure(m):  # joint_fn closes over the module; joint_params is None
    return jnp.sum(rnnt.rnnt_loss_from_joint(enc, pred, lambda _, e, q: m(e, q), None, logit_pad, labels,
                                             label_pad, frame_chunk=2))

  graphdef, state = nnx.split(module)

  def lean_state(s):
    joint = lambda s_, e, q: nnx.merge(graphdef, s_)(e, q)  # noqa: E731
    return jnp.sum(rnnt.rnnt_loss_from_joint(enc, pred, joint, s, logit_pad, labels, label_pad, frame_chunk=2))

  want = nnx.jit(nnx.grad(plain))(module)
  for got in (nnx.jit(nnx.grad(lean_closure))(module), jax.jit(jax.grad(lean_state))(state)):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert np.any(np.asarray(w) != 0)
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_from_joint_bf16_inputs_use_a_float32_lattice():
  rng = np.random.default_rng(11)
  lengths = [(6, 3), (4, 1), (6, 0)]
  _, logit_pad, labels, label_pad = _padded_batch(rng, lengths, t_max=6, u_max=3)
  # Multiples of 1/8 in [-4, 4]: the bf16 sums below are exact, so the bf16 and float32
  # logits are equal and any difference would come from a narrower lattice.
  enc = jnp.asarray(rng.integers(-16, 17, size=(3, 6, VOCAB)) / 8, jnp.bfloat16)
  pred = jnp.asarray(rng.integers(-16, 17, size=(3, 4, VOCAB)) / 8, jnp.bfloat16)

  def additive_joint(_, e, q):
    return e + q

  def lean(e, q):
    return rnnt.rnnt_loss_from_joint(e, q, additive_joint, None, logit_pad, labels, label_pad, frame_chunk=4)

  def plain(e, q):
    return rnnt.rnnt_loss(_full_logits(additive_joint, None, e, q), logit_pad, labels, label_pad)

  got, got_g = jax.jit(jax.value_and_grad(lambda e, q: jnp.sum(lean(e, q)), argnums=(0, 1)))(enc, pred)
  want, want_g = jax.jit(jax.value_and_grad(lambda e, q: jnp.sum(plain(e, q)), argnums=(0, 1)))(
      enc.astype(jnp.float32), pred.astype(jnp.float32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(got_g, want_g):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), rtol=1e-2, atol=1e-2 * np.max(np.abs(w)))


def test_from_joint_compiled_temp_memory_is_far_below_full_logits():
  rng = np.random.default_rng(12)
  b, t_max, u_max, vocab, chunk = 2, 64, 8, 2048, 2
  enc, pred, params, logit_pad, labels, label_pad = _joint_problem(rng, [(64, 8), (40, 5)], t_max, u_max, vocab)
  plain, lean = _plain_and_lean(logit_pad, labels, label_pad, frame_chunk=chunk)

  def temp_bytes(f):
    stats = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(params, enc, pred).compile().memory_analysis()
    assert stats is not None, "XLA's CPU backend reports compiled memory; the tests run on CPU"
    return stats.temp_size_in_bytes

  full_logits_bytes = b * t_max * (u_max + 1) * vocab * 4
  plain_bytes, lean_bytes = temp_bytes(plain), temp_bytes(lean)
  assert plain_bytes > full_logits_bytes  # the plain path holds (several) full logit arrays
  assert lean_bytes < full_logits_bytes / 4 and lean_bytes < plain_bytes / 8, (lean_bytes, plain_bytes)


def test_bad_arguments_raise_value_errors():
  rng = np.random.default_rng(13)
  enc, pred, params, logit_pad, labels, label_pad = _joint_problem(rng, [(4, 2)], t_max=4, u_max=2)

  def lean(**overrides):
    args = dict(encoder_out=enc, predictor_out=pred, joint_fn=_joint, joint_params=params,
                logit_paddings=logit_pad, labels=labels, label_paddings=label_pad)
    return rnnt.rnnt_loss_from_joint(**{**args, **overrides})

  with pytest.raises(ValueError, match="frame_chunk"):
    lean(frame_chunk=0)
  with pytest.raises(ValueError, match="label_paddings"):
    lean(predictor_out=pred[:, :2])
  with pytest.raises(ValueError, match="blank_id=5"):
    lean(blank_id=VOCAB)
  with pytest.raises(ValueError, match="joint_fn returned shape"):
    lean(joint_fn=lambda p, e, q: _joint(p, e, q)[:, :, :1])
  with pytest.raises(ValueError, match="logit_paddings"):
    lean(logit_paddings=logit_pad[:, :3])
  with pytest.raises(ValueError, match="logits must be"):
    rnnt.rnnt_loss(jnp.zeros((1, 4, 3)), logit_pad, labels, label_pad)
  with pytest.raises(ValueError, match="blank_logprobs"):
    rnnt.rnnt_loss_from_logprobs(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 2)), logit_pad, label_pad)


def test_from_joint_without_frames_is_infeasible_or_empty_with_zero_gradients():
  rng = np.random.default_rng(14)
  enc, pred, params, _, labels, _ = _joint_problem(rng, [(0, 2), (0, 0)], t_max=0, u_max=2)
  label_pad = np.array([[0, 0], [1, 1]], np.float32)

  def loss(p, e, q):
    return rnnt.rnnt_loss_from_joint(e, q, _joint, p, np.zeros((2, 0)), labels, label_pad)

  np.testing.assert_array_equal(np.asarray(loss(params, enc, pred)), [rnnt.INFEASIBLE_LOSS, 0.0])
  grads = jax.grad(lambda *a: loss(*a).sum(), argnums=(0, 1, 2))(params, enc, pred)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
