"""Streaming continuation (MemoryStreamer) against re-running the whole sequence at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.decoding.lm_decoding import MemoryStreamer, prepend_bos
from memlm_jax.models.infini_lm import InfiniTransformerLM, streaming_apply_fn
from memlm_jax.models.transformer_lm import DecodingMode, TransformerLM

SEGMENT = 8
EOS = 1


def _model(seed=0, update_rule="delta"):
  with nnx.use_eager_sharding(False):
    return InfiniTransformerLM(vocab_size=40, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                               mlp_dim=48, segment_length=SEGMENT, update_rule=update_rule, gate_init=0.3,
                               rngs=nnx.Rngs(seed))


def _prompts(rng, lengths, width):
  prompts = np.zeros((len(lengths), width), np.int32)
  for i, length in enumerate(lengths):
    prompts[i, :length] = rng.integers(2, 40, length)
  return prompts


WIDTH = 48  # one padded shape for the reference: padding never changes earlier logits


def _full_logits_fn(model):
  graphdef, params = nnx.split(model)
  apply = jax.jit(lambda p, tokens, n: nnx.merge(graphdef, p)(tokens, mask=jnp.arange(WIDTH)[None] < n)[0])
  return lambda tokens, n: apply(params, tokens, n)


def _naive_continuation(full_logits, prompt, num_tokens, temperature=0.0, rng=None):
  """Re-runs the model over the whole (prompt + generated) sequence for every new token."""
  assert len(prompt) + num_tokens <= WIDTH
  sequence, out = list(prompt), []
  for t in range(num_tokens):
    n = len(sequence)
    tokens = np.zeros((1, WIDTH), np.int32)
    tokens[0, :n] = sequence
    last = full_logits(tokens, n)[:, n - 1]
    if temperature > 0:
      token = int(jax.random.categorical(jax.random.fold_in(rng, t), last / temperature)[0])
    else:
      token = int(jnp.argmax(last[0]))
    out.append(token)
    sequence.append(token)
    if token == EOS:
      break
  return out + [0] * (num_tokens - len(out))


@pytest.mark.parametrize("update_rule", ["linear", "delta"])
def test_greedy_streaming_equals_full_recompute_for_mixed_prompt_lengths(update_rule):
  model = _model(update_rule=update_rule)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(1)
  lengths = np.array([1, 7, 8, 9, 16, 29])  # inside, at and just past segment boundaries
  prompts = _prompts(rng, lengths, 32)
  streamer = MemoryStreamer(streaming_apply_fn(graphdef), SEGMENT, chunk_segments=2)
  state = streamer.prefill(params, model.init_memory(len(lengths)), prompts, lengths)
  generated, out_lengths, _ = streamer.generate(params, state, num_tokens=14, eos_id=EOS)
  full_logits = _full_logits_fn(model)
  for row, length in enumerate(lengths):
    expected = _naive_continuation(full_logits, prompts[row, :length], 14)
    np.testing.assert_array_equal(np.asarray(generated[row]), expected, err_msg=f"row {row}")
    eos_at = [i for i, t in enumerate(expected) if t == EOS]
    assert int(out_lengths[row]) == (eos_at[0] + 1 if eos_at else 14)


def test_sampled_streaming_equals_full_recompute_with_the_same_keys():
  model = _model(seed=3)
  graphdef, params = nnx.split(model)
  prompts = _prompts(np.random.default_rng(2), [13, 21], 24)
  key = jax.random.key(7)
  streamer = MemoryStreamer(streaming_apply_fn(graphdef), SEGMENT)
  state = streamer.prefill(params, model.init_memory(2), prompts, np.array([13, 21]))
  single = MemoryStreamer(streaming_apply_fn(graphdef), SEGMENT)
  full_logits = _full_logits_fn(model)
  for row, length in enumerate([13, 21]):
    one = single.prefill(params, model.init_memory(1), prompts[row:row + 1], np.array([length]))
    sampled, _, _ = single.generate(params, one, num_tokens=10, eos_id=EOS, temperature=1.0, rng=key)
    expected = _naive_continuation(full_logits, prompts[row, :length], 10, temperature=1.0, rng=key)
    np.testing.assert_array_equal(np.asarray(sampled[0]), expected)
  # Different keys give different samples (the sampler is not secretly greedy).
  a, _, _ = streamer.generate(params, state, num_tokens=10, eos_id=-1, temperature=2.0, rng=jax.random.key(1))
  b, _, _ = streamer.generate(params, state, num_tokens=10, eos_id=-1, temperature=2.0, rng=jax.random.key(2))
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_prefill_chunking_does_not_change_the_memory_and_state_size_does_not_grow():
  model = _model(seed=4)
  graphdef, params = nnx.split(model)
  sizes = []
  for length in (40, 400):
    prompts = _prompts(np.random.default_rng(length), [length], length)
    states = [MemoryStreamer(streaming_apply_fn(graphdef), SEGMENT, chunk_segments=c).prefill(
        params, model.init_memory(1), prompts, np.array([length])) for c in (1, 3)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                 states[0], states[1])
    # The streamed memory is the one-shot call's memory over the committed segments.
    committed = (length - 1) // SEGMENT * SEGMENT
    _, one_shot = model(jnp.asarray(prompts[:, :committed]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4),
                 states[0].memory, one_shot)
    sizes.append(sum(x.size for x in jax.tree.leaves(states[0])))
  assert sizes[0] == sizes[1]


def test_generation_keeps_streaming_across_segment_boundaries():
  """Generating 3 segments' worth of tokens in two calls equals generating them in one."""
  model = _model(seed=5)
  graphdef, params = nnx.split(model)
  prompts = _prompts(np.random.default_rng(3), [5], 5)
  streamer = MemoryStreamer(streaming_apply_fn(graphdef), SEGMENT)
  state = streamer.prefill(params, model.init_memory(1), prompts, np.array([5]))
  whole, _, _ = streamer.generate(params, state, num_tokens=24, eos_id=-1)
  first, _, middle = streamer.generate(params, state, num_tokens=11, eos_id=-1)
  second, _, _ = streamer.generate(params, middle, num_tokens=13, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(whole), np.concatenate([first, second], axis=1))


def test_bad_prompt_lengths_and_temperature_are_refused():
  model = _model()
  graphdef, params = nnx.split(model)
  streamer = MemoryStreamer(streaming_apply_fn(graphdef), SEGMENT)
  with pytest.raises(ValueError, match="prompt lengths"):
    streamer.prefill(params, model.init_memory(1), np.ones((1, 4), np.int32), np.array([0]))
  state = streamer.prefill(params, model.init_memory(1), np.ones((1, 4), np.int32), np.array([4]))
  with pytest.raises(ValueError, match="rng"):
    streamer.generate(params, state, num_tokens=2, eos_id=EOS, temperature=0.5)


def test_prepend_bos_shifts_prompts_like_training_inputs():
  prompts, lengths = prepend_bos(np.array([[5, 6, 0], [7, 0, 0]]), np.array([2, 1]))
  np.testing.assert_array_equal(prompts, [[0, 5, 6, 0], [0, 7, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 2])


def test_each_lm_declares_its_decoding_mode_and_label():
  """What the launchers read instead of probing the model's attributes."""
  with nnx.use_eager_sharding(False):
    dense = TransformerLM(vocab_size=40, embed_dim=32, num_layers=1, num_heads=4, head_dim=8, mlp_dim=48,
                          rngs=nnx.Rngs(0))
  assert dense.decoding_mode is DecodingMode.KV_CACHE and dense.label == "dense"
  for rule in ("linear", "delta"):
    model = _model(update_rule=rule)
    assert model.decoding_mode is DecodingMode.MEMORY_STREAM and model.label == f"Infini ({rule})"
