"""Attention, RoPE, the dense LM and the loss against slow, obviously-correct references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.layers.attention import causal_segment_mask, dot_product_attention, rotary_embedding
from memlm_jax.losses.cross_entropy import weighted_cross_entropy
from memlm_jax.models.transformer_lm import TransformerLM

TINY = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64)


def tiny_lm(**overrides) -> TransformerLM:
  with nnx.use_eager_sharding(False):
    return TransformerLM(**{**TINY, **overrides}, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding.


def naive_rotary(x: np.ndarray, positions: np.ndarray, max_wavelength: float = 10_000.0) -> np.ndarray:
  """Rotates channel pairs (j, j + half) by positions * max_wavelength**(-j / half), one pair at a time."""
  x = np.asarray(x, np.float64)
  batch, time, heads, dim = x.shape
  half = dim // 2
  out = np.zeros_like(x)
  for b in range(batch):
    for t in range(time):
      for h in range(heads):
        for j in range(half):
          theta = float(positions[b, t]) * max_wavelength ** (-j / half)
          c, s = np.cos(theta), np.sin(theta)
          a, e = x[b, t, h, j], x[b, t, h, j + half]
          out[b, t, h, j] = a * c - e * s
          out[b, t, h, j + half] = e * c + a * s
  return out


@pytest.mark.parametrize("seed,head_dim,max_wavelength", [(0, 8, 10_000.0), (1, 16, 10_000.0), (2, 6, 500.0)])
def test_rotary_embedding_matches_naive_rotation(seed, head_dim, max_wavelength):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 7, 3, head_dim)).astype(np.float32)
  positions = rng.integers(0, 300, size=(2, 7)).astype(np.int32)
  got = rotary_embedding(jnp.asarray(x), jnp.asarray(positions), max_wavelength)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), naive_rotary(x, positions, max_wavelength), atol=2e-4, rtol=1e-4)


def test_rotary_embedding_keeps_dtype_and_rejects_odd_head_dim():
  x = jax.random.normal(jax.random.key(3), (1, 4, 2, 8), jnp.bfloat16)
  assert rotary_embedding(x, jnp.zeros((1, 4), jnp.int32)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="even head_dim"):
    rotary_embedding(jnp.ones((1, 4, 2, 7)), jnp.zeros((1, 4), jnp.int32))


def test_rotary_dot_product_depends_only_on_relative_position():
  rng = np.random.default_rng(11)
  dim = 16
  q = rng.standard_normal(dim).astype(np.float32)
  k = rng.standard_normal(dim).astype(np.float32)

  def rotated_dot(i: int, j: int) -> float:
    both = jnp.asarray(np.stack([q, k])[:, None, None, :])  # [2 (q, k), time=1, heads=1, dim]
    out = rotary_embedding(both, jnp.asarray([[i], [j]], jnp.int32))
    return float(jnp.dot(out[0, 0, 0], out[1, 0, 0]))

  for offset in (0, 3, -5, 17):
    starts = rng.integers(0, 200, size=4) + 20
    dots = [rotated_dot(int(s), int(s) - offset) for s in starts]
    np.testing.assert_allclose(dots, dots[0], atol=2e-4, rtol=1e-4)
  # Offset 0 is the plain dot product (a rotation preserves it), and the score really moves with the offset.
  np.testing.assert_allclose(rotated_dot(37, 37), float(q @ k), rtol=1e-4, atol=1e-4)
  assert abs(rotated_dot(40, 37) - rotated_dot(40, 40)) > 1e-2
  assert abs(rotated_dot(40, 37) - rotated_dot(37, 40)) > 1e-2  # relative position is signed


# ----------------------------------------------------------------------------------------------------------------
# Attention with a causal, segment-aware mask.


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """For each query: softmax over keys at or before it in its own segment; padding queries get zeros."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, time, heads, dim = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      for i in range(time):
        if segment_ids[b, i] == 0:
          continue
        visible = [j for j in range(i + 1) if segment_ids[b, j] == segment_ids[b, i]]
        scores = np.array([q[b, i, h] @ k[b, j, h] / np.sqrt(dim) for j in visible])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        out[b, i, h] = sum(p * v[b, j, h] for p, j in zip(probs, visible))
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dot_product_attention_matches_naive_loop(seed):
  rng = np.random.default_rng(100 + seed)
  time, heads, dim = 10, 3, 8
  segment_ids = np.array([
      [1, 1, 1, 2, 2, 2, 2, 3, 0, 0],  # three packed examples, then padding
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # one full-length example
      [1, 1, 2, 2, 2, 2, 2, 0, 0, 0],
  ], np.int32)
  q, k, v = (rng.standard_normal((3, time, heads, dim)).astype(np.float32) * 2 for _ in range(3))
  mask = causal_segment_mask(jnp.asarray(segment_ids))
  assert mask.shape == (3, 1, time, time) and mask.dtype == jnp.bool_
  got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))
  want = naive_attention(q, k, v, segment_ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.all(got[segment_ids == 0] == 0.0)


def test_causal_segment_mask_matches_definition():
  segment_ids = np.array([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 0, 0]], np.int32)
  got = np.asarray(causal_segment_mask(jnp.asarray(segment_ids)))[:, 0]
  for b in range(2):
    for i in range(6):
      for j in range(6):
        want = j <= i and segment_ids[b, i] == segment_ids[b, j] and segment_ids[b, i] != 0
        assert got[b, i, j] == want, (b, i, j)


# ----------------------------------------------------------------------------------------------------------------
# The dense LM: packing, causality, dtypes, argument checks.


def test_packed_logits_equal_unpacked_logits():
  model = tiny_lm()
  rng = np.random.default_rng(7)
  len_a, len_b, time = 5, 6, 12
  seq_a = rng.integers(1, 64, size=len_a)
  seq_b = rng.integers(1, 64, size=len_b)
  pad = time - len_a - len_b

  packed_tokens = np.concatenate([seq_a, seq_b, np.zeros(pad, int)])[None]
  packed_segments = np.array([[1] * len_a + [2] * len_b + [0] * pad])
  packed_positions = np.array([list(range(len_a)) + list(range(len_b)) + [0] * pad])

  def alone(seq):
    tokens = np.zeros(time, int)
    tokens[:len(seq)] = seq
    return tokens, (np.arange(time) < len(seq)).astype(int), np.arange(time)

  alone_a, alone_b = alone(seq_a), alone(seq_b)
  unpacked = [np.stack(x) for x in zip(alone_a, alone_b)]  # tokens, segments, positions: [2, time]

  packed_logits = np.asarray(model(*(jnp.asarray(x, jnp.int32) for x in
                                     (packed_tokens, packed_segments, packed_positions))))
  unpacked_logits = np.asarray(model(*(jnp.asarray(x, jnp.int32) for x in unpacked)))
  assert packed_logits.shape == (1, time, 64) and packed_logits.dtype == np.float32
  np.testing.assert_allclose(packed_logits[0, :len_a], unpacked_logits[0, :len_a], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed_logits[0, len_a:len_a + len_b], unpacked_logits[1, :len_b], atol=1e-5,
                             rtol=1e-5)
  # Guard against a vacuous pass: without the segment boundary, B attends to A and its logits change.
  merged = np.asarray(model(jnp.asarray(packed_tokens, jnp.int32), jnp.asarray(packed_segments > 0, jnp.int32),
                            jnp.asarray(packed_positions, jnp.int32)))
  assert np.abs(merged[0, len_a:len_a + len_b] - unpacked_logits[1, :len_b]).max() > 1e-3


@pytest.mark.parametrize("seed,changed", [(0, 9), (1, 4), (2, 15)])
def test_future_tokens_do_not_change_earlier_logits(seed, changed):
  model = tiny_lm()
  rng = np.random.default_rng(seed)
  time = 16
  tokens = rng.integers(1, 64, size=(2, time))
  edited = tokens.copy()
  edited[:, changed] = (tokens[:, changed] % 63) + 1  # a different non-padding token
  segments = jnp.ones((2, time), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (2, time))
  before = np.asarray(model(jnp.asarray(tokens, jnp.int32), segments, positions))
  after = np.asarray(model(jnp.asarray(edited, jnp.int32), segments, positions))
  np.testing.assert_allclose(after[:, :changed], before[:, :changed], atol=1e-6, rtol=0)
  assert np.abs(after[:, changed] - before[:, changed]).max() > 1e-3  # the edit itself is visible


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("bad", [0, -3])
def test_transformer_lm_rejects_non_positive_sizes(name, bad):
  with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b.*{bad}"):
    tiny_lm(**{name: bad})


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model32 = tiny_lm()
  model16 = tiny_lm(dtype="bfloat16")
  params16 = jax.tree.leaves(nnx.state(model16, nnx.Param))
  assert len(params16) == len(jax.tree.leaves(nnx.state(model32, nnx.Param)))
  assert all(p.dtype == jnp.float32 for p in params16)  # as built, before any update
  nnx.update(model16, nnx.state(model32, nnx.Param))  # same parameters, different compute dtype

  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(1, 64, size=(2, 12)), jnp.int32)
  segments = jnp.ones((2, 12), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  logits32 = np.asarray(model32(tokens, segments, positions))
  logits16 = model16(tokens, segments, positions)
  assert logits16.dtype == jnp.float32
  logits16 = np.asarray(logits16)
  rel = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert rel < 0.05, rel
  assert np.abs(logits16 - logits32).max() > 0  # bfloat16 really was used for compute
  # Activations inside the model are in the compute dtype.
  x = model16.embedding(tokens)
  assert x.dtype == jnp.bfloat16
  assert model16.layers[0].attention(x, causal_segment_mask(segments), positions)[0].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Loss.


def naive_cross_entropy(logits, targets, weights):
  logits = np.asarray(logits, np.float64)
  loss = correct = 0.0
  for index in np.ndindex(*targets.shape):
    row = logits[index]
    log_probs = row - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
    loss += -log_probs[targets[index]] * weights[index]
    correct += float(np.argmax(row) == targets[index]) * weights[index]
  return loss, float(np.sum(weights)), correct


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_cross_entropy_matches_numpy(seed):
  rng = np.random.default_rng(200 + seed)
  batch, time, vocab = 3, 7, 11
  logits = (rng.standard_normal((batch, time, vocab)) * 3).astype(np.float32)
  targets = rng.integers(0, vocab, size=(batch, time))
  # Make some predictions right so correct_sum is non-trivial.
  targets[0, :4] = np.argmax(logits[0, :4], axis=-1)
  weights = rng.uniform(0.5, 2.0, size=(batch, time)).astype(np.float32)
  weights[rng.random((batch, time)) < 0.3] = 0.0
  weights[1, -2:] = 0.0
  targets[1, -2:] = 0  # padding
  sums = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets, jnp.int32), jnp.asarray(weights))
  want_loss, want_weight, want_correct = naive_cross_entropy(logits, targets, weights)
  assert all(v.dtype == jnp.float32 and v.shape == () for v in sums.values())
  np.testing.assert_allclose(float(sums["loss_sum"]), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(sums["weight_sum"]), want_weight, rtol=1e-6)
  np.testing.assert_allclose(float(sums["correct_sum"]), want_correct, rtol=1e-6)
  assert want_correct > 0


def test_weighted_cross_entropy_bfloat16_logits_are_reduced_in_float32():
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.standard_normal((2, 64, 50)) * 4, jnp.bfloat16)
  targets = rng.integers(0, 50, size=(2, 64))
  weights = (rng.random((2, 64)) < 0.8).astype(np.float32)
  sums = weighted_cross_entropy(logits, jnp.asarray(targets, jnp.int32), jnp.asarray(weights))
  want_loss, _, _ = naive_cross_entropy(np.asarray(logits.astype(jnp.float32)), targets, weights)
  assert sums["loss_sum"].dtype == jnp.float32
  np.testing.assert_allclose(float(sums["loss_sum"]), want_loss, rtol=1e-5)
