"""Per-token memory write weights: the Infini memory's training-time haystack augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.layers.infini_attention import memory_update
from memlm_jax.models.infini_lm import WRITE_WEIGHTS, InfiniTransformerLM


def _np_sigma(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0)))


def _random_kv(seed, batch=2, heads=3, seq=6, dk=8, dv=5):
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.standard_normal((batch, heads, seq, dk)) * 1.5, jnp.float32)
  v = jnp.asarray(rng.standard_normal((batch, heads, seq, dv)), jnp.float32)
  mem = jnp.asarray(rng.standard_normal((batch, heads, dk, dv)), jnp.float32)
  z = jnp.asarray(rng.uniform(1.0, 3.0, (batch, heads, dk)), jnp.float32)
  return rng, k, v, mem, z


@pytest.mark.parametrize("repeats", [2, 5])
def test_weight_r_equals_writing_the_segment_r_times_under_the_linear_rule(repeats):
  _, k, v, mem, z = _random_kv(repeats)
  want_mem, want_z = mem, z
  for _ in range(repeats):
    want_mem, want_z = memory_update(k, v, want_mem, want_z, delta=False)
  weights = jnp.full((2, 6), float(repeats))  # [batch, seq]
  got_mem, got_z = memory_update(k, v, mem, z, delta=False, write_weights=weights)
  np.testing.assert_allclose(got_mem, want_mem, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_z, want_z, rtol=1e-5, atol=1e-4)
  assert float(jnp.abs(got_mem - mem).max()) > 0.1


@pytest.mark.parametrize("delta", [False, True])
def test_per_token_weights_match_a_numpy_reference_and_padding_stays_weightless(delta):
  """sigma(k_t) is scaled by w_t * mask_t in M and z: float64 NumPy, token by token; a padded
  token with a huge weight writes nothing."""
  rng, k, v, mem, z = _random_kv(10 + delta)
  weights = rng.uniform(0.5, 50.0, (2, 6)).astype(np.float32)
  mask = np.ones((2, 6), np.int32)
  mask[0, 4:] = 0
  weights[0, 4:] = 1e6  # padding: never written, whatever its weight
  got_mem, got_z = memory_update(k, v, mem, z, delta=delta, mask=jnp.asarray(mask), write_weights=jnp.asarray(weights))
  k64, v64, m64, z64 = (np.asarray(a, np.float64) for a in (k, v, mem, z))
  sk = _np_sigma(k64) * (weights * mask)[:, None, :, None]
  values = v64
  if delta:  # the delta rule's retrieval uses the unweighted key
    sq = _np_sigma(k64)
    values = v64 - np.einsum("bhnk,bhkv->bhnv", sq, m64) / np.einsum("bhnk,bhk->bhn", sq, z64)[..., None]
  np.testing.assert_allclose(got_mem, m64 + np.einsum("bhnk,bhnv->bhkv", sk, values), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(got_z, z64 + sk.sum(axis=2), rtol=1e-5, atol=1e-3)


def _tiny_lm(update_rule):
  with nnx.use_eager_sharding(False):
    return InfiniTransformerLM(vocab_size=40, embed_dim=16, num_layers=2, num_heads=2, head_dim=8, mlp_dim=32,
                               segment_length=4, update_rule=update_rule, rngs=nnx.Rngs(3))


def _batch(seed):
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 40, (3, 16)).astype(np.int32)
  targets[1, 11:] = 0  # padding
  inputs = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)
  return {"decoder_input_tokens": jnp.asarray(inputs), "decoder_target_tokens": jnp.asarray(targets),
          "decoder_loss_weights": jnp.asarray((targets != 0).astype(np.int32))}


@nnx.jit
def _loss(model, batch):
  return model.loss(batch)


@pytest.mark.parametrize("update_rule", ["linear", "delta"])
def test_weight_one_reproduces_the_unweighted_loss_exactly_and_other_weights_change_it(update_rule):
  model, batch = _tiny_lm(update_rule), _batch(0)
  plain = _loss(model, batch)
  ones = _loss(model, {**batch, WRITE_WEIGHTS: jnp.ones((3, 16), jnp.float32)})
  for name in plain:
    np.testing.assert_array_equal(np.asarray(ones[name]), np.asarray(plain[name]))
  heavy = np.ones((3, 16), np.float32)
  heavy[:, 4:8] = 100.0  # the second segment counts as 100 copies
  weighted = _loss(model, {**batch, WRITE_WEIGHTS: jnp.asarray(heavy)})
  assert abs(float(weighted["loss_sum"]) - float(plain["loss_sum"])) > 1e-3
  grads = nnx.jit(nnx.grad(lambda m: m.loss({**batch, WRITE_WEIGHTS: jnp.asarray(heavy)})["loss_sum"]))(model)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_weights_on_padding_change_nothing():
  model, batch = _tiny_lm("delta"), _batch(1)
  weights = np.ones((3, 16), np.float32)
  reference = _loss(model, {**batch, WRITE_WEIGHTS: jnp.asarray(weights)})
  weights[1, 11:] = 1e4  # row 1's padded tail
  padded = _loss(model, {**batch, WRITE_WEIGHTS: jnp.asarray(weights)})
  np.testing.assert_array_equal(np.asarray(padded["loss_sum"]), np.asarray(reference["loss_sum"]))
