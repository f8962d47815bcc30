"""ASR front end: log-mel features from padded waveforms, and SpecAugment masking.

`log_mel` is pure `jnp` with static shapes: frames are gathered with a fixed index
matrix, windowed (periodic Hann), turned into an rfft power spectrum, projected on an
HTK-mel triangular filterbank (built once in NumPy) and logged with a floor. A frame is
padded when any of its samples is padded; padded frames' features are exactly 0.
"""

from __future__ import annotations

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  """HTK mel scale: 2595 * log10(1 + hz / 700)."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(num_mel_bins: int, fft_length: int, sample_rate: int, lower_hz: float,
                   upper_hz: float) -> np.ndarray:
  """[fft_length // 2 + 1, num_mel_bins] float32 triangular filters, triangles drawn on the mel axis.

  Filter m rises linearly (in mel) from edge m to its centre edge m + 1 and falls to edge m + 2,
  the num_mel_bins + 2 edges being equally spaced in mel between lower_hz and upper_hz.
  """
  edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_mel_bins + 2)
  bin_mels = hz_to_mel(np.arange(fft_length // 2 + 1) * sample_rate / fft_length)[:, None]
  left, center, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
  rising = (bin_mels - left) / (center - left)
  falling = (right - bin_mels) / (right - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def _frame_paddings(paddings: jax.Array, num_frames: int, frame_length: int, step: int) -> jax.Array:
  """paddings [batch, samples] -> [batch, frames] float32, 1.0 where any sample of the frame is padded."""
  padded = jnp.cumsum((paddings > 0).astype(jnp.int32), axis=1)
  padded = jnp.pad(padded, ((0, 0), (1, 0)))  # padded[:, i] = padded samples before i
  starts = np.arange(num_frames) * step
  count = padded[:, starts + frame_length] - padded[:, starts]
  return (count > 0).astype(jnp.float32)


def _check_log_mel_args(waveforms, paddings, sample_rate, num_mel_bins, frame_length, step, fft_length,
                        lower_hz, upper_hz) -> None:
  if waveforms.ndim != 2:
    raise ValueError(f"log_mel expects waveforms [batch, samples], got shape {waveforms.shape}.")
  if paddings.shape != waveforms.shape:
    raise ValueError(f"paddings shape {paddings.shape} must equal waveforms shape {waveforms.shape}.")
  if num_mel_bins <= 0 or frame_length <= 0 or step <= 0:
    raise ValueError(f"num_mel_bins={num_mel_bins}, frame_length={frame_length} samples and "
                     f"frame_step={step} samples must all be positive.")
  if waveforms.shape[1] < frame_length:
    raise ValueError(f"waveforms have {waveforms.shape[1]} samples, fewer than one frame of {frame_length}.")
  if fft_length < frame_length:
    raise ValueError(f"fft_length={fft_length} must be at least the frame length {frame_length}.")
  if not 0 <= lower_hz < upper_hz <= sample_rate / 2:
    raise ValueError(f"need 0 <= lower_hz < upper_hz <= sample_rate / 2 = {sample_rate / 2}, "
                     f"got lower_hz={lower_hz}, upper_hz={upper_hz}.")


def log_mel(waveforms: jax.Array, paddings: jax.Array, *, sample_rate: int = 16000, num_mel_bins: int = 80,
            frame_length_ms: float = 25.0, frame_step_ms: float = 10.0, fft_length: int | None = None,
            preemphasis: float = 0.97, lower_hz: float = 125.0, upper_hz: float = 7600.0,
            log_floor: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Log-mel filterbank features.

  Args:
    waveforms: [batch, samples] float audio at `sample_rate`.
    paddings: [batch, samples], 1.0 for padded samples.
    fft_length: None means the next power of two >= the frame length.
    preemphasis: y[t] = x[t] - preemphasis * x[t - 1] over the whole signal (x[-1] = 0); 0 turns it off.
  Returns:
    features [batch, frames, num_mel_bins] float32 and frame_paddings [batch, frames] float32, with
    frames = (samples - frame_length) // frame_step + 1; padded frames' features are 0.
  """
  frame_length = int(round(sample_rate * frame_length_ms / 1000))
  step = int(round(sample_rate * frame_step_ms / 1000))
  fft_length = fft_length or 1 << (frame_length - 1).bit_length()
  _check_log_mel_args(waveforms, paddings, sample_rate, num_mel_bins, frame_length, step, fft_length,
                      lower_hz, upper_hz)
  return _log_mel_jit(waveforms, paddings, sample_rate=sample_rate, num_mel_bins=num_mel_bins,
                      frame_length=frame_length, step=step, fft_length=fft_length, preemphasis=preemphasis,
                      lower_hz=float(lower_hz), upper_hz=float(upper_hz), log_floor=log_floor)


@functools.partial(jax.jit, static_argnames=("sample_rate", "num_mel_bins", "frame_length", "step", "fft_length",
                                             "preemphasis", "lower_hz", "upper_hz", "log_floor"))
def _log_mel_jit(waveforms, paddings, *, sample_rate, num_mel_bins, frame_length, step, fft_length, preemphasis,
                 lower_hz, upper_hz, log_floor):
  """`log_mel` after argument checks, with frame sizes in samples."""
  num_frames = (waveforms.shape[1] - frame_length) // step + 1
  x = waveforms.astype(jnp.float32)
  if preemphasis:
    x = x - preemphasis * jnp.pad(x[:, :-1], ((0, 0), (1, 0)))
  frame_index = np.arange(num_frames)[:, None] * step + np.arange(frame_length)[None, :]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / frame_length)  # periodic Hann
  frames = x[:, frame_index] * window.astype(np.float32)  # [batch, frames, frame_length]
  power = jnp.square(jnp.abs(jnp.fft.rfft(frames, n=fft_length, axis=-1)))
  filters = mel_filterbank(num_mel_bins, fft_length, sample_rate, lower_hz, upper_hz)
  mel = jnp.einsum("bfk,km->bfm", power, filters, precision=jax.lax.Precision.HIGHEST)
  features = jnp.log(jnp.maximum(mel, log_floor))

  frame_paddings = _frame_paddings(paddings, num_frames, frame_length, step)
  return jnp.where(frame_paddings[..., None] > 0, 0.0, features), frame_paddings


@functools.partial(jax.jit, static_argnames="epsilon")
def normalize_per_utterance(features: jax.Array, paddings: jax.Array, epsilon: float = 1e-5) -> jax.Array:
  """Per-utterance, per-bin mean/variance normalisation over valid frames.

  features: [batch, frames, bins]; paddings: [batch, frames] (1.0 = padded). Padded frames become 0.
  """
  valid = (paddings <= 0)[..., None]
  count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(jnp.float32)
  x = jnp.where(valid, features.astype(jnp.float32), 0.0)
  mean = jnp.sum(x, axis=1, keepdims=True) / count
  var = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0), axis=1, keepdims=True) / count
  return jnp.where(valid, (x - mean) * jax.lax.rsqrt(var + epsilon), 0.0)


@gin.configurable
class LogMelFrontend(nnx.Module):
  """Waveforms -> log-mel features (no parameters); precomputed features pass through.

  Inputs of shape [batch, samples] go through `log_mel`; inputs [batch, frames, bins] are taken
  as features already. `normalize=True` then applies `normalize_per_utterance`.
  """

  def __init__(self, *, sample_rate: int = 16000, num_mel_bins: int = 80, frame_length_ms: float = 25.0,
               frame_step_ms: float = 10.0, fft_length: int | None = None, preemphasis: float = 0.97,
               lower_hz: float = 125.0, upper_hz: float = 7600.0, log_floor: float = 1e-6,
               normalize: bool = False):
    self.log_mel_kwargs = dict(sample_rate=sample_rate, num_mel_bins=num_mel_bins,
                               frame_length_ms=frame_length_ms, frame_step_ms=frame_step_ms,
                               fft_length=fft_length, preemphasis=preemphasis, lower_hz=lower_hz,
                               upper_hz=upper_hz, log_floor=log_floor)
    self.num_mel_bins = num_mel_bins
    self.normalize = normalize

  def __call__(self, inputs: jax.Array, paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
    """inputs: [batch, samples] audio or [batch, frames, bins] features; paddings: [batch, samples or frames].

    Returns features [batch, frames, bins] float32 and paddings [batch, frames].
    """
    if inputs.ndim == 2:
      features, paddings = log_mel(inputs, paddings, **self.log_mel_kwargs)
    elif inputs.ndim == 3:
      if paddings.shape != inputs.shape[:2]:
        raise ValueError(f"feature paddings shape {paddings.shape} must be [batch, frames] = {inputs.shape[:2]}.")
      features = inputs.astype(jnp.float32)
    else:
      raise ValueError(f"LogMelFrontend expects [batch, samples] or [batch, frames, bins], got {inputs.shape}.")
    if self.normalize:
      features = normalize_per_utterance(features, paddings)
    return features, paddings


def _band_mask(key: jax.Array, size: int, max_width: jax.Array, limit: jax.Array, num_masks: int) -> jax.Array:
  """[size] bool: union of `num_masks` bands, each of width uniform in [0, max_width] and lying in [0, limit)."""
  width_draw, start_draw = jax.random.uniform(key, (2, num_masks))
  widths = jnp.minimum(jnp.floor(width_draw * (max_width + 1)).astype(jnp.int32), max_width)
  widths = jnp.minimum(widths, limit)
  starts = jnp.minimum(jnp.floor(start_draw * (limit - widths + 1)).astype(jnp.int32), limit - widths)
  iota = jnp.arange(size)[None, :]
  return jnp.any((iota >= starts[:, None]) & (iota < (starts + widths)[:, None]), axis=0)


@gin.configurable
class SpecAugment(nnx.Module):
  """SpecAugment (Park et al. 2019) frequency and time masking; no parameters.

  Per utterance: `num_freq_masks` bands of width in [0, max_freq_mask] bins and `num_time_masks`
  bands of width in [0, floor(max_time_mask_ratio * valid_frames)] frames, placed inside the
  valid frames. Masked entries are set to `mask_value`; padded frames are never touched. Random
  numbers come from the `rng_stream` stream of `rngs` (the trainer provides `dropout`).
  """

  def __init__(self, *, num_freq_masks: int = 2, max_freq_mask: int = 27, num_time_masks: int = 10,
               max_time_mask_ratio: float = 0.05, mask_value: float = 0.0, rng_stream: str = "dropout"):
    if min(num_freq_masks, max_freq_mask, num_time_masks) < 0 or not 0 <= max_time_mask_ratio <= 1:
      raise ValueError(f"SpecAugment needs non-negative mask counts/widths and 0 <= max_time_mask_ratio <= 1, "
                       f"got num_freq_masks={num_freq_masks}, max_freq_mask={max_freq_mask}, "
                       f"num_time_masks={num_time_masks}, max_time_mask_ratio={max_time_mask_ratio}.")
    self.num_freq_masks = num_freq_masks
    self.max_freq_mask = max_freq_mask
    self.num_time_masks = num_time_masks
    self.max_time_mask_ratio = max_time_mask_ratio
    self.mask_value = mask_value
    self.rng_stream = rng_stream

  def masks(self, key: jax.Array, paddings: jax.Array, num_bins: int) -> jax.Array:
    """key: one PRNG key; paddings: [batch, frames] -> [batch, frames, bins] bool, True = masked."""
    return _spec_augment_masks(key, paddings, num_bins=num_bins, num_freq_masks=self.num_freq_masks,
                               max_freq_mask=self.max_freq_mask, num_time_masks=self.num_time_masks,
                               max_time_mask_ratio=self.max_time_mask_ratio)

  def __call__(self, features: jax.Array, paddings: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """features: [batch, frames, bins]; paddings: [batch, frames] (1.0 = padded) -> [batch, frames, bins]."""
    if deterministic:
      return features
    if rngs is None:
      raise ValueError("SpecAugment with deterministic=False needs rngs.")
    if features.ndim != 3 or paddings.shape != features.shape[:2]:
      raise ValueError(f"SpecAugment expects features [batch, frames, bins] and paddings [batch, frames], "
                       f"got {features.shape} and {paddings.shape}.")
    mask = self.masks(getattr(rngs, self.rng_stream)(), paddings, features.shape[2])
    return jnp.where(mask, jnp.asarray(self.mask_value, features.dtype), features)


@functools.partial(jax.jit, static_argnames=("num_bins", "num_freq_masks", "max_freq_mask", "num_time_masks",
                                             "max_time_mask_ratio"))
def _spec_augment_masks(key, paddings, *, num_bins, num_freq_masks, max_freq_mask, num_time_masks,
                        max_time_mask_ratio):
  """See `SpecAugment.masks`; masks are sampled independently per utterance."""
  num_frames = paddings.shape[1]

  def one_utterance(utt_key, utt_paddings):
    valid_frames = jnp.sum(utt_paddings <= 0).astype(jnp.int32)
    max_time = jnp.floor(max_time_mask_ratio * valid_frames).astype(jnp.int32)
    freq_key, time_key = jax.random.split(utt_key)
    freq = _band_mask(freq_key, num_bins, jnp.int32(max_freq_mask), jnp.int32(num_bins), num_freq_masks)
    time = _band_mask(time_key, num_frames, max_time, valid_frames, num_time_masks)
    return (freq[None, :] | time[:, None]) & (utt_paddings <= 0)[:, None]

  return jax.vmap(one_utterance)(jax.random.split(key, paddings.shape[0]), paddings)
