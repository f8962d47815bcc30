"""Chunked KV-cache forward of the dense TransformerLM against its one-shot causal forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.decoding import kv_cache
from memlm_jax.models.transformer_lm import TransformerLM, extend_apply_fn

LENGTH = 40
VOCAB = 50


def _model(num_kv_heads=None, seed=0):
  with nnx.use_eager_sharding(False):
    return TransformerLM(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads,
                         head_dim=8, mlp_dim=48, rngs=nnx.Rngs(seed))


def _tokens(seed=1, length=LENGTH):
  """[2, length] int32 numpy (slicing numpy, not jax, arrays compiles nothing)."""
  return np.random.default_rng(seed).integers(1, VOCAB, (2, length), dtype=np.int32)


def _full_logits(model, tokens):
  """The model's own forward over the whole sequence: one segment, positions 0..T-1."""
  graphdef, params = nnx.split(model)

  def forward(p, t):
    positions = jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape)
    return nnx.merge(graphdef, p)(t, jnp.ones_like(t), positions)
  return np.asarray(jax.jit(forward)(params, tokens))


def _chunked_logits(runner, params, cache, tokens, chunk):
  pieces, offset = [], 0
  while offset < tokens.shape[1]:
    piece = tokens[:, offset:offset + chunk]
    logits, cache = runner.forward(params, piece, cache, offset)
    pieces.append(logits)
    offset += piece.shape[1]
  return np.concatenate([np.asarray(x) for x in pieces], axis=1), cache


@pytest.mark.parametrize("num_kv_heads, key_block, chunks", [
    (None, None, (7,)),  # 7 leaves a ragged last chunk
    (2, None, (LENGTH,)),  # the whole sequence as one chunk
    (2, 8, (1, 12)),  # chunks of 12 straddle key blocks of 8
    (1, 8, (7,)),
])
def test_chunked_cached_forward_equals_one_shot_forward(num_kv_heads, key_block, chunks):
  model = _model(num_kv_heads)
  tokens = _tokens()
  expected = _full_logits(model, tokens)
  graphdef, params = nnx.split(model)
  runner = kv_cache.CachedLM(extend_apply_fn(graphdef))
  for chunk in chunks:
    cache = model.init_cache(2, 48, key_block=key_block)  # longer than the sequence: the unused tail is masked
    logits, _ = _chunked_logits(runner, params, cache, tokens, chunk)
    assert logits.shape == (2, LENGTH, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=2e-5, err_msg=f"chunk={chunk}")


@pytest.mark.parametrize("key_block", [None, 8])
def test_extend_called_chunk_by_chunk_equals_the_full_forward(key_block):
  """TransformerLM.extend itself (no CachedLM, no jit): chunks of 16, the last one ragged."""
  model = _model(num_kv_heads=2)
  tokens = _tokens()
  cache = model.init_cache(2, 48, key_block=key_block)
  pieces = []
  for offset in range(0, LENGTH, 16):
    logits, cache = model.extend(jnp.asarray(tokens[:, offset:offset + 16]), cache, offset)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), _full_logits(model, tokens), atol=2e-5, rtol=2e-5)


def test_cache_holds_rotated_keys_and_values_in_the_compute_dtype():
  model = _model(num_kv_heads=2)
  cache = model.init_cache(3, 24)
  assert len(cache) == 2
  for layer_cache in cache:
    assert layer_cache.k.shape == layer_cache.v.shape == (3, 24, 2, 8)
    assert layer_cache.k.dtype == model.dtype
  assert model.cache_bytes(3, 24) == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_stale_cache_entries_past_the_position_are_ignored():
  """Restarting at offset 0 over a used cache gives the same logits as over a fresh one."""
  model = _model()
  graphdef, params = nnx.split(model)
  runner = kv_cache.CachedLM(extend_apply_fn(graphdef))
  _, used = _chunked_logits(runner, params, model.init_cache(2, 48, key_block=8), _tokens(seed=5), 8)
  other = _tokens(seed=6)
  again, _ = _chunked_logits(runner, params, used, other, 8)
  np.testing.assert_allclose(again, _full_logits(model, other), atol=2e-5, rtol=2e-5)


def test_compiles_once_per_chunk_shape_and_advance_matches_forward():
  model = _model()
  graphdef, params = nnx.split(model)
  runner = kv_cache.CachedLM(extend_apply_fn(graphdef))
  tokens = _tokens(length=32)
  cache = model.init_cache(2, 32, key_block=8)
  for offset in range(0, 32, 8):
    cache = runner.advance(params, tokens[:, offset:offset + 8], cache, offset)
  assert runner.num_traces == 1
  _, reference_cache = _chunked_logits(runner, params, model.init_cache(2, 32, key_block=8), tokens, 8)
  assert runner.num_traces == 2  # forward is the second jitted function
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(reference_cache)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_overflow_raises():
  model = _model()
  graphdef, params = nnx.split(model)
  runner = kv_cache.CachedLM(extend_apply_fn(graphdef))
  cache = model.init_cache(2, 16)
  tokens = _tokens(length=8)
  cache = runner.advance(params, tokens, cache, 8)  # positions 8..15 fill it exactly
  with pytest.raises(ValueError, match="overflow.*offset 9.*max_length=16"):
    runner.forward(params, tokens, cache, 9)
  with pytest.raises(ValueError, match="overflow"):
    model.extend(tokens, cache, 12)
  with pytest.raises(ValueError, match="overflow"):
    runner.advance(params, tokens, cache, -1)


def test_key_block_must_divide_the_cache_length():
  model = _model()
  with pytest.raises(ValueError, match="key_block"):
    model.init_cache(2, 20, key_block=8)


def test_bfloat16_cache_and_logits_close_to_the_one_shot_forward():
  with nnx.use_eager_sharding(False):
    model = TransformerLM(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=48, dtype="bfloat16", rngs=nnx.Rngs(0))
  tokens = _tokens()
  graphdef, params = nnx.split(model)
  cache = model.init_cache(2, 48, key_block=8)
  assert cache[0].k.dtype == jnp.bfloat16
  logits, _ = _chunked_logits(kv_cache.CachedLM(extend_apply_fn(graphdef)), params, cache, tokens, 8)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _full_logits(model, tokens), atol=0.1)  # bf16 rounding only


def test_attention_with_a_cache_takes_no_mask():
  """With a cache, visibility follows the positions; an explicit mask as well is refused."""
  model = _model()
  positions = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4))
  with pytest.raises(ValueError, match="mask must be None"):
    model.layers[0].attention(jnp.zeros((2, 4, 32)), jnp.ones((1, 1, 4, 16), bool), positions,
                              model.init_cache(2, 16)[0])
