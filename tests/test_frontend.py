"""Log-mel front end and SpecAugment against NumPy references written here."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.layers.frontend import LogMelFrontend, SpecAugment, log_mel

RATE, FRAME, STEP = 16000, 400, 160


def ref_mel_filters(num_bins, fft_length, rate, lower_hz, upper_hz):
  """Triangles on the mel axis (mel = 1127 ln(1 + f / 700)), one filter and one FFT bin at a time."""
  to_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
  lo, hi = to_mel(lower_hz), to_mel(upper_hz)
  edges = [lo + i * (hi - lo) / (num_bins + 1) for i in range(num_bins + 2)]
  filters = np.zeros((fft_length // 2 + 1, num_bins))
  for m in range(num_bins):
    left, center, right = edges[m], edges[m + 1], edges[m + 2]
    for k in range(fft_length // 2 + 1):
      mel = to_mel(k * rate / fft_length)
      if left < mel <= center:
        filters[k, m] = (mel - left) / (center - left)
      elif center < mel < right:
        filters[k, m] = (right - mel) / (right - center)
  return filters


def ref_log_mel(wave, num_bins=80, fft_length=512, preemphasis=0.97, lower_hz=125.0, upper_hz=7600.0):
  """One unpadded utterance [samples] -> [frames, num_bins], frame by frame in float64."""
  x = np.asarray(wave, np.float64)
  emphasised = x.copy()
  emphasised[1:] -= preemphasis * x[:-1]
  window = np.hanning(FRAME + 1)[:-1]  # periodic Hann
  filters = ref_mel_filters(num_bins, fft_length, RATE, lower_hz, upper_hz)
  rows = []
  for start in range(0, len(x) - FRAME + 1, STEP):
    spectrum = np.fft.rfft(emphasised[start:start + FRAME] * window, n=fft_length)
    rows.append(np.log(np.maximum(np.abs(spectrum) ** 2 @ filters, 1e-6)))
  return np.stack(rows)


def run_log_mel(waves, lengths, **kwargs):
  paddings = (np.arange(waves.shape[1])[None] >= np.asarray(lengths)[:, None]).astype(np.float32)
  features, frame_paddings = log_mel(jnp.asarray(waves, jnp.float32), jnp.asarray(paddings), **kwargs)
  return np.asarray(features), np.asarray(frame_paddings)


@pytest.mark.parametrize("num_bins,fft_length,preemphasis", [(80, None, 0.97), (128, 1024, 0.0)])
def test_log_mel_matches_numpy_reference(num_bins, fft_length, preemphasis):
  rng = np.random.default_rng(num_bins)
  waves = rng.normal(size=(2, 3200)) * 0.3
  features, frame_paddings = run_log_mel(waves, [3200, 3200], num_mel_bins=num_bins, fft_length=fft_length,
                                         preemphasis=preemphasis)
  assert features.shape == (2, (3200 - FRAME) // STEP + 1, num_bins) and features.dtype == np.float32
  assert not frame_paddings.any()
  for b in range(2):
    expected = ref_log_mel(waves[b], num_bins, fft_length or 512, preemphasis)
    np.testing.assert_allclose(features[b], expected, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("num_bins", [80, 128])
def test_sine_peaks_in_the_nearest_mel_bin(num_bins):
  rng = np.random.default_rng(num_bins + 1)
  to_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
  from_mel = lambda m: 700.0 * (np.exp(m / 1127.0) - 1.0)
  spacing = (to_mel(7600.0) - to_mel(125.0)) / (num_bins + 1)
  centres = from_mel(to_mel(125.0) + spacing * np.arange(1, num_bins + 1))
  for _ in range(3):
    target = rng.choice(np.nonzero(centres > 1500)[0])
    freq = from_mel(to_mel(centres[target]) + rng.uniform(-0.2, 0.2) * spacing)
    assert np.argmin(np.abs(centres - freq)) == target
    wave = 0.5 * np.sin(2 * np.pi * freq * np.arange(4000) / RATE + rng.uniform(0, 2 * np.pi))
    features, _ = run_log_mel(wave[None], [4000], num_mel_bins=num_bins)
    assert np.all(np.argmax(features[0], axis=-1) == target)


def test_padded_utterance_matches_running_it_alone():
  rng = np.random.default_rng(7)
  short, long = int(rng.integers(1000, 2500)), 3600
  waves = rng.normal(size=(2, long)) * 0.3  # samples past `short` in row 0 are noise that must not leak
  features, frame_paddings = run_log_mel(waves, [short, long])
  alone, alone_paddings = run_log_mel(waves[:1, :short], [short])
  valid = alone.shape[1]
  np.testing.assert_allclose(features[0, :valid], alone[0], rtol=1e-5, atol=1e-4)
  expected_paddings = (np.arange(features.shape[1]) * STEP + FRAME > short).astype(np.float32)
  np.testing.assert_array_equal(frame_paddings[0], expected_paddings)
  assert valid == int((1 - expected_paddings).sum()) and not alone_paddings.any()
  assert np.all(features[0, valid:] == 0.0)
  assert not frame_paddings[1].any()


def test_log_mel_rejects_bad_shapes():
  with pytest.raises(ValueError, match="fewer than one frame"):
    log_mel(jnp.zeros((1, 100)), jnp.zeros((1, 100)))
  with pytest.raises(ValueError, match="paddings shape"):
    log_mel(jnp.zeros((1, 1000)), jnp.zeros((2, 1000)))
  with pytest.raises(ValueError, match="upper_hz"):
    log_mel(jnp.zeros((1, 1000)), jnp.zeros((1, 1000)), upper_hz=9000)


def test_frontend_normalizes_valid_frames_and_passes_features_through():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(2, 12, 5)).astype(np.float32) * 3 + 1
  paddings = np.zeros((2, 12), np.float32)
  paddings[0, 7:] = 1.0
  passed, passed_paddings = LogMelFrontend()(jnp.asarray(features), jnp.asarray(paddings))
  np.testing.assert_array_equal(passed, features)
  np.testing.assert_array_equal(passed_paddings, paddings)

  normalized, _ = LogMelFrontend(normalize=True)(jnp.asarray(features), jnp.asarray(paddings))
  for b, valid in enumerate([7, 12]):
    x = features[b, :valid].astype(np.float64)
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(normalized[b, :valid], expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(normalized[b, valid:]) == 0.0)


def test_frontend_computes_log_mel_from_gin_bindings():
  gin.parse_config("LogMelFrontend.num_mel_bins = 128")
  waves = np.random.default_rng(4).normal(size=(1, 2000))
  features, paddings = LogMelFrontend()(jnp.asarray(waves, jnp.float32), jnp.zeros((1, 2000)))
  np.testing.assert_allclose(features[0], ref_log_mel(waves[0], num_bins=128), rtol=1e-4, atol=2e-3)
  assert paddings.shape == (1, features.shape[1])


def augment_inputs(seed, batch=3, frames=60, bins=16):
  rng = np.random.default_rng(seed)
  features = rng.uniform(1.0, 2.0, size=(batch, frames, bins)).astype(np.float32)  # never 0 before masking
  lengths = rng.integers(frames // 2, frames + 1, size=batch)
  lengths[0] = frames
  paddings = (np.arange(frames)[None] >= lengths[:, None]).astype(np.float32)
  return jnp.asarray(features), jnp.asarray(paddings), lengths


def zero_runs(flags):
  """Lengths of the runs of True in a 1-D bool array."""
  runs, current = [], 0
  for flag in list(flags) + [False]:
    if flag:
      current += 1
    elif current:
      runs.append(current)
      current = 0
  return runs


def test_spec_augment_deterministic_is_identity():
  features, paddings, _ = augment_inputs(0)
  out = SpecAugment()(features, paddings, deterministic=True)
  np.testing.assert_array_equal(out, features)


def test_spec_augment_single_masks_respect_width_bounds_and_padding():
  augment = SpecAugment(num_freq_masks=1, max_freq_mask=5, num_time_masks=1, max_time_mask_ratio=0.2)
  features, paddings, lengths = augment_inputs(1)
  for seed in range(5):
    out = np.asarray(augment(features, paddings, deterministic=False, rngs=nnx.Rngs(dropout=seed)))
    for b, valid in enumerate(lengths):
      np.testing.assert_array_equal(out[b, valid:], features[b, valid:])  # padded frames untouched
      zero = out[b, :valid] == 0.0
      changed = out[b, :valid] != np.asarray(features[b, :valid])
      np.testing.assert_array_equal(zero, changed)  # every changed entry is exactly the mask value
      freq_masked = zero.all(axis=0)
      time_masked = zero.all(axis=1)
      np.testing.assert_array_equal(zero, freq_masked[None, :] | time_masked[:, None])
      assert len(zero_runs(freq_masked)) <= 1 and freq_masked.sum() <= 5
      assert len(zero_runs(time_masked)) <= 1 and time_masked.sum() <= int(np.floor(0.2 * valid))


def test_spec_augment_many_masks_stay_within_total_bound():
  augment = SpecAugment(num_freq_masks=2, max_freq_mask=3, num_time_masks=3, max_time_mask_ratio=0.1)
  features, paddings, lengths = augment_inputs(2)
  out = np.asarray(augment(features, paddings, deterministic=False, rngs=nnx.Rngs(dropout=9)))
  for b, valid in enumerate(lengths):
    zero = out[b, :valid] == 0.0
    assert zero.all(axis=0).sum() <= 2 * 3
    assert zero.all(axis=1).sum() <= 3 * int(np.floor(0.1 * valid))
    np.testing.assert_array_equal(out[b, valid:], features[b, valid:])


def test_spec_augment_masks_depend_on_rng_and_utterance():
  augment = SpecAugment(num_freq_masks=2, max_freq_mask=6, num_time_masks=2, max_time_mask_ratio=0.2)
  features = jnp.ones((4, 80, 20))
  paddings = jnp.zeros((4, 80))
  first = np.asarray(augment(features, paddings, deterministic=False, rngs=nnx.Rngs(dropout=0)))
  second = np.asarray(augment(features, paddings, deterministic=False, rngs=nnx.Rngs(dropout=1)))
  assert not np.array_equal(first, second)
  assert any(not np.array_equal(first[0], first[b]) for b in range(1, 4))


def test_spec_augment_under_jit_has_static_shapes_and_matches_eager():
  augment = SpecAugment(num_freq_masks=2, max_freq_mask=4, num_time_masks=2, max_time_mask_ratio=0.1)
  features, paddings, _ = augment_inputs(5)

  @jax.jit
  def run(features, paddings, key):
    return augment(features, paddings, deterministic=False, rngs=nnx.Rngs(dropout=key))

  for seed in range(2):
    key = jax.random.key(seed)
    jitted = run(features, paddings, key)
    assert jitted.shape == features.shape
    eager = augment(features, paddings, deterministic=False, rngs=nnx.Rngs(dropout=key))
    np.testing.assert_array_equal(jitted, eager)
  assert run._cache_size() == 1
