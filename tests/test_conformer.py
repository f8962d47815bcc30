"""Conformer encoder: masks, subsampling lengths, depthwise conv, context hooks, against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.layers.conformer import (ConformerBlock, ConformerEncoder, ConvSubsampling, DepthwiseConv1D,
                                        SelfAttention, encoder_num_params)

TINY = dict(input_dim=16, model_dim=16, num_layers=2, num_heads=2, ff_mult=2, conv_kernel=5)


def build(cls, *args, seed: int = 0, **kwargs):
  with nnx.use_eager_sharding(False):
    return cls(*args, **kwargs, rngs=nnx.Rngs(seed))


def tiny_encoder(seed: int = 0, **overrides) -> ConformerEncoder:
  return build(ConformerEncoder, seed=seed, **{**TINY, **overrides})


@nnx.jit(static_argnames=("deterministic",))
def forward(module, *args, **kwargs):
  """module(*args, **kwargs) compiled (op-by-op dispatch is slow on CPU)."""
  return module(*args, **kwargs)


def paddings_for(lengths, frames: int) -> np.ndarray:
  return (np.arange(frames)[None, :] >= np.asarray(lengths)[:, None]).astype(np.float32)


def num_valid(paddings) -> int:
  return int(np.sum(1.0 - np.asarray(paddings)))


# ----------------------------------------------------------------------------------------------------------------
# Depthwise convolution.


def naive_depthwise(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """out[b, t, c] = sum_k x[b, t + k - half, c] * kernel[k, c], zero outside the sequence."""
  batch, frames, channels = x.shape
  size = kernel.shape[0]
  half = (size - 1) // 2
  out = np.zeros((batch, frames, channels), np.float64)
  for b in range(batch):
    for t in range(frames):
      for c in range(channels):
        for k in range(size):
          s = t + k - half
          if 0 <= s < frames:
            out[b, t, c] += x[b, s, c] * kernel[k, c]
  return out


@pytest.mark.parametrize("seed,kernel_size,frames", [(0, 5, 9), (1, 3, 4), (2, 7, 5)])
def test_depthwise_conv_matches_numpy_loop(seed, kernel_size, frames):
  conv = build(DepthwiseConv1D, 3, kernel_size, seed=seed)
  x = np.random.default_rng(seed).standard_normal((2, frames, 3)).astype(np.float32)
  got = conv(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), naive_depthwise(x, np.asarray(conv.kernel[...])), atol=1e-5)


def test_depthwise_conv_rejects_even_kernel():
  with pytest.raises(ValueError, match="kernel_size must be odd"):
    build(DepthwiseConv1D, 3, 4)


# ----------------------------------------------------------------------------------------------------------------
# Convolutional subsampling.


@pytest.mark.parametrize("factor", [4, 8])
def test_subsampling_lengths_match_the_conv_on_each_unpadded_utterance(factor):
  sub = build(ConvSubsampling, 16, 16, factor=factor)
  rng = np.random.default_rng(factor)
  lengths = [0, 2, 7, 8, 15, 16, 30]
  frames = max(lengths)
  features = rng.standard_normal((len(lengths), frames, 16)).astype(np.float32)
  x, paddings = forward(sub, jnp.asarray(features), jnp.asarray(paddings_for(lengths, frames)))
  for row, length in enumerate(lengths):
    try:
      alone, alone_paddings = forward(sub, jnp.asarray(features[row:row + 1, :length]), jnp.zeros((1, length)))
    except ValueError:  # too short to leave any frame
      expected = 0
    else:
      expected = alone.shape[1]
      assert num_valid(alone_paddings) == expected
      np.testing.assert_allclose(np.asarray(x[row, :expected]), np.asarray(alone[0]), atol=1e-5)
    assert num_valid(paddings[row]) == expected, (length, np.asarray(paddings[row]))
    np.testing.assert_array_equal(np.asarray(paddings[row]), paddings_for([expected], x.shape[1])[0])
    assert not np.any(np.asarray(x[row, expected:]))


def test_subsampling_rejects_bad_factor_and_too_few_frames():
  with pytest.raises(ValueError, match="factor must be 2, 4 or 8"):
    build(ConvSubsampling, 16, 8, factor=6)
  with pytest.raises(ValueError, match="input_dim=8 is too small"):
    build(ConvSubsampling, 8, 8, factor=8)
  sub = build(ConvSubsampling, 16, 16, factor=4)
  with pytest.raises(ValueError, match="6 input frames leave no output frame"):
    sub(jnp.zeros((1, 6, 16)), jnp.zeros((1, 6)))


# ----------------------------------------------------------------------------------------------------------------
# Masks and padding invariance.


@pytest.mark.parametrize("subsampling", [4, 8])
def test_utterance_alone_equals_utterance_padded_in_a_batch(subsampling):
  encoder = tiny_encoder(seed=subsampling, subsampling=subsampling)
  rng = np.random.default_rng(subsampling)
  short, long = 37, 64
  features = rng.standard_normal((2, long, 16)).astype(np.float32)
  features[0, short:] = rng.standard_normal((long - short, 16)) * 50.0  # garbage in the padding
  batch_out, batch_paddings = forward(encoder, jnp.asarray(features), jnp.asarray(paddings_for([short, long], long)))
  alone_out, alone_paddings = forward(encoder, jnp.asarray(features[:1, :short]), jnp.zeros((1, short)))
  valid = alone_out.shape[1]
  assert num_valid(alone_paddings) == valid and num_valid(batch_paddings[0]) == valid
  np.testing.assert_allclose(np.asarray(batch_out[0, :valid]), np.asarray(alone_out[0]), atol=1e-5, rtol=1e-5)


def test_block_valid_outputs_ignore_padded_frames():
  """Attention keys and depthwise-conv taps on padded frames must not reach valid frames."""
  block = build(ConformerBlock, 16, 2, ff_mult=2, conv_kernel=5)
  rng = np.random.default_rng(0)
  lengths, frames = [5, 11], 11
  paddings = jnp.asarray(paddings_for(lengths, frames))
  x = rng.standard_normal((2, frames, 16)).astype(np.float32)
  changed = x.copy()
  changed[0, 5:] = rng.standard_normal((frames - 5, 16)) * 100.0
  a, b = forward(block, jnp.asarray(x), paddings), forward(block, jnp.asarray(changed), paddings)
  np.testing.assert_allclose(np.asarray(a[0, :5]), np.asarray(b[0, :5]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  assert not np.allclose(np.asarray(a[0, 5:]), np.asarray(b[0, 5:]))  # the change did reach the padded frames


def test_self_attention_is_bidirectional_and_masks_keys():
  attention = build(SelfAttention, 16, 2, dropout_rate=0.0, dtype=jnp.float32)
  rng = np.random.default_rng(1)
  frames = 8
  paddings = jnp.asarray(paddings_for([6], frames))
  x = rng.standard_normal((1, frames, 16)).astype(np.float32)
  base = forward(attention, jnp.asarray(x), paddings, deterministic=True, rngs=None)
  later = x.copy()
  later[0, 5] = rng.standard_normal(16)  # last valid frame
  moved = forward(attention, jnp.asarray(later), paddings, deterministic=True, rngs=None)
  assert np.max(np.abs(np.asarray(moved[0, 0] - base[0, 0]))) > 1e-4  # frame 0 sees the future
  padded = x.copy()
  padded[0, 6:] = 1e4
  same = forward(attention, jnp.asarray(padded), paddings, deterministic=True, rngs=None)
  np.testing.assert_allclose(np.asarray(same[0, :6]), np.asarray(base[0, :6]), atol=1e-5)
  assert not np.any(np.asarray(base[0, 6:]))  # padded query rows attend to nothing


def np_rope(x: np.ndarray, max_wavelength: float = 10_000.0) -> np.ndarray:
  """Half-split RoPE of x [batch, time, heads, dim] at positions 0..time-1: pair (j, j + half) turns by
  t * max_wavelength**(-j / half)."""
  time, half = x.shape[1], x.shape[-1] // 2
  theta = np.arange(time)[:, None] * max_wavelength ** (-np.arange(half) / half)  # [time, half]
  c, s = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]
  a, e = x[..., :half], x[..., half:]
  return np.concatenate([a * c - e * s, e * c + a * s], axis=-1)


@pytest.mark.parametrize("attention_context", [None, (2, 1), (-1, 0), (1, -1), (0, 0)])
def test_self_attention_matches_a_softmax_reference(attention_context):
  """SelfAttention (LayerNorm, then MultiHeadAttention under a key padding mask and an optional window of
  (left, right) frames) == softmax attention over the valid frames in the window, written out in NumPy from
  the layer's own weights with a loop over frame pairs; padded query rows are zero."""
  attention = build(SelfAttention, 16, 2, dropout_rate=0.0, dtype=jnp.float32, seed=4,
                    attention_context=attention_context)
  rng = np.random.default_rng(4)
  frames = 7
  paddings = paddings_for([7, 4], frames)
  x = rng.standard_normal((2, frames, 16)).astype(np.float32)
  got = np.asarray(forward(attention, jnp.asarray(x), jnp.asarray(paddings), deterministic=True, rngs=None))
  h = np.asarray(attention.norm(jnp.asarray(x)), np.float64)
  mha = attention.attention
  q, k, v = (np.einsum("bte,ehd->bthd", h, np.asarray(proj.kernel[...], np.float64))
             for proj in (mha.query, mha.key, mha.value))
  scores = np.einsum("bqhd,bkhd->bhqk", np_rope(q), np_rope(k)) / np.sqrt(q.shape[-1])
  valid = paddings == 0
  left, right = attention_context or (-1, -1)
  in_window = np.array([[(left < 0 or k >= q - left) and (right < 0 or k <= q + right) for k in range(frames)]
                        for q in range(frames)])
  scores = np.where(valid[:, None, None, :] & in_window[None, None], scores, -np.inf)
  weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  want = np.einsum("bhqk,bkhd,hde->bqe", weights, v, np.asarray(mha.out.kernel[...], np.float64))
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)
  assert not np.any(got[~valid])


def test_encoder_valid_outputs_ignore_padded_inputs_and_padded_outputs_are_zero():
  encoder = tiny_encoder(seed=3)
  rng = np.random.default_rng(3)
  lengths, frames = [20, 33, 12], 33
  paddings = jnp.asarray(paddings_for(lengths, frames))
  features = rng.standard_normal((3, frames, 16)).astype(np.float32)
  changed = features.copy()
  changed[0, 20:] = 1e6
  changed[2, 12:] = np.nan
  out, out_paddings = forward(encoder, jnp.asarray(features), paddings)
  out2, _ = forward(encoder, jnp.asarray(changed), paddings)
  valid = np.asarray(out_paddings) == 0
  np.testing.assert_allclose(np.asarray(out2)[valid], np.asarray(out)[valid], atol=1e-5)
  for o in (np.asarray(out), np.asarray(out2)):
    assert np.all(o[~valid] == 0) and np.all(np.isfinite(o)) and np.all(np.abs(o[valid]).sum(-1) > 0)
  # frames' = (((33 - 3) // 2 + 1) - 3) // 2 + 1 = 7; valid counts follow the same formula per row.
  assert out.shape == (3, 7, 16)
  assert [num_valid(p) for p in out_paddings] == [4, 7, 2]


def test_encoder_attention_context_bounds_the_lookahead():
  """With a right context of r frames and pointwise convolutions, a valid output frame t of an L-block
  encoder cannot depend on subsampled frames after t + L * r: changing the input features there leaves
  frames <= t unchanged, while the unlimited encoder's first frame moves."""
  rng = np.random.default_rng(5)
  features = rng.standard_normal((1, 64, 16)).astype(np.float32)
  paddings = jnp.zeros((1, 64), jnp.float32)
  changed = features.copy()
  changed[0, 48:] = rng.standard_normal((16, 16))  # subsampled frames 11.. (frame j reads inputs 4j .. 4j + 6)
  for attention_context, should_move in [((-1, 1), False), (None, True)]:
    encoder = tiny_encoder(seed=5, conv_kernel=1, attention_context=attention_context)
    out, _ = forward(encoder, jnp.asarray(features), paddings)
    moved, _ = forward(encoder, jnp.asarray(changed), paddings)
    # frames <= 8 see subsampled frames <= 8 + 2 * 1 = 10, whose inputs end at feature frame 46.
    delta = np.max(np.abs(np.asarray(moved)[0, :9] - np.asarray(out)[0, :9]))
    assert (delta > 1e-4) == should_move, (attention_context, delta)


@pytest.mark.parametrize("bad", [(1,), (1, 2, 3), (-2, 0), (0.5, 1), "ab"])
def test_attention_context_rejects_bad_windows(bad):
  with pytest.raises(ValueError, match="attention_context"):
    tiny_encoder(attention_context=bad)


# ----------------------------------------------------------------------------------------------------------------
# Context hook.


class AddScaledContext(nnx.Module):
  """x + scale * context[:, None, :] on valid frames; reports its index to `on_call` when run."""

  def __init__(self, dim: int, index: int, on_call, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(jax.random.normal(rngs.params(), (dim,)))
    self.index = index
    self.on_call = on_call

  def __call__(self, x, paddings, context):
    self.on_call(self.index)
    return x + (1.0 - paddings)[..., None] * self.scale[...] * context[:, None, :]


def counting_factory(calls: list):
  """A context_module_factory whose i-th module (in build order) appends i to `calls` when run."""
  built = []

  def factory(dim, dtype, rngs):
    del dtype
    built.append(len(built))
    return AddScaledContext(dim, built[-1], calls.append, rngs=rngs)
  return factory


def test_context_hook_runs_after_the_configured_blocks_only():
  calls = []
  factory = counting_factory(calls)
  layers = (2, 0)
  encoder = tiny_encoder(seed=5, num_layers=3, context_layers=layers, context_module_factory=factory)
  plain = tiny_encoder(seed=5, num_layers=3)
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.standard_normal((2, 30, 16)).astype(np.float32))
  paddings = jnp.asarray(paddings_for([30, 19], 30))
  context = jnp.asarray(rng.standard_normal((2, 16)).astype(np.float32))

  out, out_paddings = forward(encoder, features, paddings, context=context)
  assert calls == [0, 1]  # one call per hook; the module for block 0 first

  @nnx.jit
  def manual_composition(encoder, features, paddings, context):
    """The encoder's own pieces, with the known hook function written out after blocks 0 and 2."""
    x, p = encoder.subsampling(features, paddings)
    scales = {0: encoder.context_modules[0].scale[...], 2: encoder.context_modules[1].scale[...]}
    for i, block in enumerate(encoder.blocks):
      x = block(x, p)
      if i in scales:
        x = x + (1.0 - p)[..., None] * scales[i] * context[:, None, :]
    return jnp.where(p[..., None] > 0, 0.0, x), p

  x, p = manual_composition(encoder, features, paddings, context)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out_paddings), np.asarray(p))

  calls.clear()
  without, _ = forward(encoder, features, paddings)
  assert calls == []
  np.testing.assert_allclose(np.asarray(without), np.asarray(forward(plain, features, paddings)[0]), atol=1e-6)
  assert np.max(np.abs(np.asarray(without - out))) > 1e-3


def test_context_hook_configuration_errors():
  factory = counting_factory([])
  with pytest.raises(ValueError, match=r"context_layers must be distinct block indices in \[0, 2\)"):
    tiny_encoder(context_layers=(2,), context_module_factory=factory)
  with pytest.raises(ValueError, match="needs a context_module_factory"):
    tiny_encoder(context_layers=(0,))
  with pytest.raises(ValueError, match="no context_layers"):
    tiny_encoder()(jnp.zeros((1, 12, 16)), jnp.zeros((1, 12)), context=jnp.zeros((1, 16)))


# ----------------------------------------------------------------------------------------------------------------
# Compilation, gradients, dtypes, sizes.


def test_jit_and_grad_are_finite_with_dropout():
  encoder = tiny_encoder(seed=7, dropout_rate=0.1)
  rng = np.random.default_rng(7)
  features = jnp.asarray(rng.standard_normal((2, 24, 16)).astype(np.float32))
  paddings = jnp.asarray(paddings_for([24, 13], 24))

  target = jnp.asarray(rng.standard_normal((2, 5, 16)).astype(np.float32))

  @nnx.jit
  def loss_and_grad(model, features, paddings, rngs):
    def loss_fn(model, rngs):  # not sum(out**2): the final LayerNorm makes that nearly constant
      out, out_paddings = model(features, paddings, deterministic=False, rngs=rngs)
      return jnp.sum((out - target) ** 2 * (1.0 - out_paddings)[..., None])
    return nnx.value_and_grad(loss_fn)(model, rngs)

  loss, grads = loss_and_grad(encoder, features, paddings, nnx.Rngs(dropout=0))
  leaves = jax.tree.leaves(grads)
  assert np.isfinite(float(loss)) and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)  # every parameter gets a gradient
  other_loss, _ = loss_and_grad(encoder, features, paddings, nnx.Rngs(dropout=1))
  assert abs(float(other_loss) - float(loss)) > 1e-3 * abs(float(loss))  # dropout is active


def test_bfloat16_compute_stays_close_to_float32():
  rng = np.random.default_rng(8)
  features = jnp.asarray(rng.standard_normal((2, 28, 16)).astype(np.float32))
  paddings = jnp.asarray(paddings_for([28, 17], 28))
  out32, _ = forward(tiny_encoder(seed=8), features, paddings)
  out16, _ = forward(tiny_encoder(seed=8, dtype="bfloat16"), features, paddings)
  assert out16.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(out16, np.float32) - np.asarray(out32))
  assert np.mean(diff) < 0.03 and np.max(diff) < 0.25, (np.mean(diff), np.max(diff))


def reference_param_count(input_dim, model_dim, num_layers, num_heads, ff_mult=4, conv_kernel=31,
                          subsampling=4) -> int:
  """Counted by hand from the architecture (biases everywhere except attention projections)."""
  d, c, bins = model_dim, model_dim, input_dim
  count = 0
  for i in range(int(np.log2(subsampling))):
    count += 9 * (1 if i == 0 else c) * c + c
    bins = (bins - 3) // 2 + 1
  count += bins * c * d + d
  ffn = 2 * d + (d * ff_mult * d + ff_mult * d) + (ff_mult * d * d + d)
  attention = 2 * d + 4 * d * d
  conv = 2 * d + 2 * (d * d + d) + conv_kernel * d + 2 * d + (d * d + d)
  return count + num_layers * (2 * ffn + attention + conv + 2 * d)


@pytest.mark.parametrize("sizes", [dict(model_dim=144, num_layers=2, num_heads=4),
                                   dict(model_dim=32, num_layers=3, num_heads=4, ff_mult=2, conv_kernel=7,
                                        subsampling=8)])
def test_param_count_matches_hand_count(sizes):
  assert encoder_num_params(input_dim=80, **sizes) == reference_param_count(80, **sizes)
