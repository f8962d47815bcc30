"""Prediction and joint networks: training-time calls agree with step-by-step decoding."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from memlm_jax.models import transducer_parts


def _plain(cls):
  """Builds the module without a mesh (the partitioning annotations are only metadata here)."""
  def build(*args, **kwargs):
    with nnx.use_eager_sharding(False):
      return cls(*args, **kwargs)
  return build


JointNetwork = _plain(transducer_parts.JointNetwork)
LstmPredictor = _plain(transducer_parts.LstmPredictor)
StatelessPredictor = _plain(transducer_parts.StatelessPredictor)


def _labels(seed, batch=3, length=6, vocab=11):
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, (batch, length)), jnp.int32)


@pytest.mark.parametrize("make", [
    lambda: LstmPredictor(11, embed_dim=8, hidden_dim=12, rngs=nnx.Rngs(0)),
    lambda: StatelessPredictor(11, embed_dim=8, context=2, output_dim=12, rngs=nnx.Rngs(0)),
    lambda: StatelessPredictor(11, embed_dim=8, context=3, output_dim=12, rngs=nnx.Rngs(0)),
])
def test_predictor_call_equals_step_by_step_decoding(make):
  predictor = make()
  labels = _labels(1)
  full = predictor(labels)
  assert full.shape == (3, 7, 12)
  state = predictor.init_state(3)
  previous = jnp.zeros((3,), jnp.int32)  # blank starts every hypothesis
  for u in range(7):
    out, state = predictor.step(state, previous)
    np.testing.assert_allclose(out, full[:, u], rtol=1e-5, atol=1e-6)
    if u < 6:
      previous = labels[:, u]


def test_stateless_predictor_sees_only_the_last_labels():
  predictor = StatelessPredictor(11, embed_dim=8, context=2, output_dim=12, rngs=nnx.Rngs(3))
  a = jnp.asarray([[5, 1, 2, 3]], jnp.int32)
  b = jnp.asarray([[7, 9, 2, 3]], jnp.int32)
  out_a, out_b = predictor(a), predictor(b)
  np.testing.assert_allclose(out_a[:, 4], out_b[:, 4], rtol=1e-6)  # both end in (2, 3)
  assert not np.allclose(out_a[:, 3], out_b[:, 3])  # (1, 2) vs (9, 2)


def test_lstm_predictor_output_depends_on_the_whole_history():
  predictor = LstmPredictor(11, embed_dim=8, hidden_dim=12, rngs=nnx.Rngs(3))
  a = jnp.asarray([[5, 1, 2, 3]], jnp.int32)
  b = jnp.asarray([[7, 1, 2, 3]], jnp.int32)
  assert not np.allclose(predictor(a)[:, 4], predictor(b)[:, 4])


def test_joint_is_additive_then_tanh_then_projection():
  joint = JointNetwork(5, 4, 9, joint_dim=6, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  pred = jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)
  lattice = joint(enc[:, :, None], pred[:, None])
  assert lattice.shape == (2, 3, 4, 9)
  we, be = np.asarray(joint.encoder_proj.kernel.value), np.asarray(joint.encoder_proj.bias.value)
  wp = np.asarray(joint.predictor_proj.kernel.value)
  wo, bo = np.asarray(joint.out.kernel.value), np.asarray(joint.out.bias.value)
  for b in range(2):
    for t in range(3):
      for u in range(4):
        hidden = np.tanh(np.asarray(enc[b, t]) @ we + be + np.asarray(pred[b, u]) @ wp)
        np.testing.assert_allclose(lattice[b, t, u], hidden @ wo + bo, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(joint(enc[:, 1], pred[:, 2]), lattice[:, 1, 2], rtol=1e-6)


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="context must be >= 1"):
    StatelessPredictor(11, context=0, rngs=nnx.Rngs(0))
