"""Conformer encoder (Gulati et al. 2020) over padded log-mel features.

  features [batch, frames, bins] --ConvSubsampling--> [batch, frames', model_dim]
  each ConformerBlock:  x = x + 0.5 * FFN(x)
                        x = x + MHSA(x)         bidirectional (or a window of frames), RoPE, key padding mask
                        x = x + Conv(x)         padded frames zeroed before the depthwise conv
                        x = x + 0.5 * FFN(x)
                        x = LayerNorm(x)
  padded output frames are zeroed.

Paddings follow the lingvo / optax convention: [batch, frames] floats, 1.0 at padded
frames and 0.0 at valid ones, and the valid frames of an example form a prefix. Valid
outputs depend only on valid inputs, so an utterance gives the same encoding alone or
padded in a batch.

The convolution module normalises with LayerNorm, not BatchNorm: batch statistics
would make an utterance's encoding depend on its batch-mates and the model stateful.

Parameter logical axes: `embed`, `mlp`, `heads`, `kv`, `norm`, or None (replicated
conv-subsampling inputs, kernel taps).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.attention import MultiHeadAttention
from memlm_jax.layers.checks import check_positive_sizes
from memlm_jax.layers.sharding_names import EMBED_ACTIVATIONS, MLP_ACTIVATIONS, constrain

# Builds the module applied after a block: factory(model_dim, dtype=..., rngs=...) -> module, and
# module(x [batch, frames, model_dim], paddings [batch, frames], context) -> new x.
ContextModuleFactory = Callable[..., nnx.Module]


def _init(names: tuple[str | None, ...], base: Callable = nnx.initializers.lecun_normal()) -> Callable:
  return nnx.with_partitioning(base, names)


def layer_norm(dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis; scale and bias in float32, replicated (`norm`)."""
  return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=_init(("norm",), nnx.initializers.ones_init()),
                       bias_init=_init(("norm",), nnx.initializers.zeros_init()), rngs=rngs)


def dense(in_dim: int, out_dim: int, names: tuple[str | None, str | None], *, dtype: jnp.dtype,
          rngs: nnx.Rngs) -> nnx.Linear:
  """Linear layer with bias; kernel annotated `names`, bias annotated like the output axis."""
  return nnx.Linear(in_dim, out_dim, dtype=dtype, param_dtype=jnp.float32, kernel_init=_init(names),
                    bias_init=_init((names[1],), nnx.initializers.zeros_init()), rngs=rngs)


def zero_padded_frames(x: jax.Array, paddings: jax.Array) -> jax.Array:
  """x: [batch, frames, ...]; paddings: [batch, frames] -> x with padded frames set to 0.

  Uses a select, not a multiply, so non-finite values in padded frames cannot leak.
  """
  valid = (paddings <= 0).reshape(paddings.shape + (1,) * (x.ndim - 2))
  return jnp.where(valid, x, jnp.zeros((), x.dtype))


def valid_lengths(paddings: jax.Array) -> jax.Array:
  """paddings: [batch, frames] -> number of valid frames [batch] int32."""
  return jnp.round(jnp.sum(1.0 - paddings.astype(jnp.float32), axis=1)).astype(jnp.int32)


def paddings_from_lengths(lengths: jax.Array, frames: int, dtype: jnp.dtype) -> jax.Array:
  """lengths: [batch] ints -> paddings [batch, frames] (1 where frame index >= length)."""
  return (jnp.arange(frames)[None, :] >= lengths[:, None]).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Convolutional subsampling.

_SUBSAMPLING_KERNEL = 3
_SUBSAMPLING_STRIDE = 2


def subsampled_length(length: int | jax.Array) -> int | jax.Array:
  """Frames left after one 3x3 stride-2 'VALID' conv over `length` frames (0 when length < 3)."""
  out = (length - _SUBSAMPLING_KERNEL) // _SUBSAMPLING_STRIDE + 1
  return max(out, 0) if isinstance(out, int) else jnp.maximum(out, 0)


@gin.configurable
class ConvSubsampling(nnx.Module):
  """Stride-2 3x3 Conv2D + ReLU layers over [batch, frames, bins, 1], then a linear map to model_dim.

  `factor` = 2 ** (number of conv layers): 2, 4 or 8. The convs use 'VALID' padding in
  both axes, so output frame t sees input frames [2t, 2t + 2] of the layer below and every
  valid output frame sees only valid input frames: after each layer a length L becomes
  max((L - 3) // 2 + 1, 0), which is exactly the number of frames the conv produces on
  the unpadded utterance. ('SAME' would pad differently depending on the padded batch
  length, breaking padding invariance.)
  """

  def __init__(self, input_dim: int, model_dim: int, *, factor: int = 4, channels: int | None = None,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    channels = model_dim if channels is None else channels
    check_positive_sizes("ConvSubsampling", input_dim=input_dim, model_dim=model_dim, channels=channels)
    if factor not in (2, 4, 8):
      raise ValueError(f"ConvSubsampling.factor must be 2, 4 or 8, got {factor!r}.")
    num_convs = factor.bit_length() - 1
    bins = input_dim
    for _ in range(num_convs):
      bins = subsampled_length(bins)
    if bins < 1:
      raise ValueError(f"ConvSubsampling: input_dim={input_dim} is too small for factor={factor} "
                       f"(each 3x3 stride-2 'VALID' conv needs at least 3 bins).")
    self.factor = factor
    self.dtype = dtype
    self.convs = nnx.List([
        nnx.Conv(1 if i == 0 else channels, channels, (_SUBSAMPLING_KERNEL,) * 2, (_SUBSAMPLING_STRIDE,) * 2,
                 padding="VALID", dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=_init((None, None, None, "embed")),
                 bias_init=_init(("embed",), nnx.initializers.zeros_init()), rngs=rngs)
        for i in range(num_convs)
    ])
    self.output = dense(bins * channels, model_dim, (None, "embed"), dtype=dtype, rngs=rngs)

  def output_lengths(self, lengths: jax.Array) -> jax.Array:
    """Valid input frame counts [batch] -> valid output frame counts [batch]."""
    for _ in self.convs:
      lengths = subsampled_length(lengths)
    return lengths

  def __call__(self, features: jax.Array, paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
    """features: [batch, frames, input_dim]; paddings: [batch, frames] ->
    (x [batch, frames', model_dim] with padded frames zeroed, paddings [batch, frames'])."""
    frames = features.shape[1]
    for _ in self.convs:
      frames = subsampled_length(frames)
    if frames < 1:
      raise ValueError(f"ConvSubsampling: {features.shape[1]} input frames leave no output frame after "
                       f"{self.factor}x subsampling.")
    x = zero_padded_frames(features, paddings)[..., None]  # [batch, frames, bins, 1]
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    batch, frames, bins, channels = x.shape
    x = self.output(x.reshape(batch, frames, bins * channels))
    out_paddings = paddings_from_lengths(self.output_lengths(valid_lengths(paddings)), frames, paddings.dtype)
    return zero_padded_frames(x, out_paddings), out_paddings


# ----------------------------------------------------------------------------------------------------------------
# Conformer block pieces.


class DepthwiseConv1D(nnx.Module):
  """Per-channel 1-D convolution over time, centred ('SAME' with an odd kernel), no bias.

  out[b, t, c] = sum_k x[b, t + k - (K - 1) / 2, c] * kernel[k, c], zeros outside [0, frames).
  """

  def __init__(self, channels: int, kernel_size: int, *, channel_axis: str | None = "mlp",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    check_positive_sizes("DepthwiseConv1D", channels=channels, kernel_size=kernel_size)
    if kernel_size % 2 == 0:
      raise ValueError(f"DepthwiseConv1D.kernel_size must be odd (a centred kernel), got {kernel_size}.")
    self.kernel_size = kernel_size
    self.dtype = dtype
    # fan_in of a depthwise tap set is kernel_size, hence in_axis=0.
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=1)
    self.kernel = nnx.Param(_init((None, channel_axis), init)(rngs.params(), (kernel_size, channels), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, frames, channels] -> [batch, frames, channels]."""
    half = (self.kernel_size - 1) // 2
    kernel = self.kernel[...].astype(self.dtype)[:, None, :]  # [K, 1, channels]: one input channel per group
    return jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, window_strides=(1,), padding=[(half, half)],
                                        dimension_numbers=("NWC", "WIO", "NWC"),
                                        feature_group_count=x.shape[-1])


class FeedForward(nnx.Module):
  """Pre-norm FFN: LayerNorm -> Linear(dim, ff_mult * dim) -> swish -> dropout -> Linear -> dropout."""

  def __init__(self, dim: int, ff_mult: int, *, dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.up = dense(dim, ff_mult * dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.down = dense(ff_mult * dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """x: [batch, frames, dim] -> [batch, frames, dim]."""
    hidden = jax.nn.silu(self.up(self.norm(x)))
    hidden = self.dropout(constrain(hidden, MLP_ACTIVATIONS), deterministic=deterministic, rngs=rngs)
    return self.dropout(self.down(hidden), deterministic=deterministic, rngs=rngs)


def check_attention_context(owner: str, attention_context: Sequence[int] | None) -> tuple[int, int] | None:
  """(left, right) frames each query may attend to around itself, -1 for unlimited; None: all frames."""
  if attention_context is None:
    return None
  context = tuple(attention_context)
  if len(context) != 2 or any(not isinstance(n, int) or isinstance(n, bool) or n < -1 for n in context):
    raise ValueError(f"{owner}.attention_context must be None or (left, right) frames, each an int >= 0 or -1 "
                     f"(unlimited), got {attention_context!r}.")
  return context


def attention_window_mask(frames: int, attention_context: tuple[int, int] | None) -> jax.Array | None:
  """[frames, frames] bool: query q may see key k when q - left <= k <= q + right (-1: no bound)."""
  if attention_context is None or attention_context == (-1, -1):
    return None
  left, right = attention_context
  offset = jnp.arange(frames)[None, :] - jnp.arange(frames)[:, None]  # key - query
  allowed = jnp.ones((frames, frames), bool)
  if left >= 0:
    allowed &= offset >= -left
  if right >= 0:
    allowed &= offset <= right
  return allowed


class SelfAttention(nnx.Module):
  """Pre-norm multi-head self-attention with RoPE over the valid frames.

  Bidirectional over the whole utterance by default; `attention_context = (left, right)` limits each
  frame to the `left` frames before it and the `right` frames after it (-1: unlimited), as NeMo's
  `att_context_size`. A limited right context keeps the transducer's emissions near the sound they
  transcribe instead of letting every frame read the whole utterance.
  """

  def __init__(self, dim: int, num_heads: int, *, dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs,
               attention_context: Sequence[int] | None = None):
    if dim % num_heads or (dim // num_heads) % 2:
      raise ValueError(f"SelfAttention: model_dim={dim} must split into num_heads={num_heads} heads of even "
                       f"size (RoPE), got head_dim={dim / num_heads:g}.")
    self.attention_context = check_attention_context("SelfAttention", attention_context)
    self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attention = MultiHeadAttention(dim, num_heads, dim // num_heads, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, paddings: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    """x: [batch, frames, dim]; paddings: [batch, frames] -> [batch, frames, dim] (padded query rows are 0)."""
    valid = paddings <= 0
    mask = valid[:, :, None] & valid[:, None, :]  # [batch, q, k]
    window = attention_window_mask(x.shape[1], self.attention_context)
    if window is not None:
      mask &= window[None]
    mask = mask[:, None]  # [batch, 1, q, k]
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), paddings.shape)
    out, _ = self.attention(self.norm(x), mask, positions)
    return self.dropout(out, deterministic=deterministic, rngs=rngs)


class ConvModule(nnx.Module):
  """LayerNorm -> pointwise conv + GLU -> depthwise conv -> LayerNorm -> swish -> pointwise conv -> dropout.

  The GLU's value and gate halves are two [dim, dim] projections (the same as one [dim, 2 dim]
  pointwise conv split in two), so a tensor-parallel split of `mlp` needs no resharding.
  Padded frames are zeroed right before the depthwise conv so they never reach valid frames.
  """

  def __init__(self, dim: int, kernel_size: int, *, dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.glu_value = dense(dim, dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.glu_gate = dense(dim, dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.depthwise = DepthwiseConv1D(dim, kernel_size, dtype=dtype, rngs=rngs)
    self.conv_norm = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.pointwise = dense(dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, paddings: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    """x: [batch, frames, dim]; paddings: [batch, frames] -> [batch, frames, dim]."""
    h = self.norm(x)
    h = self.glu_value(h) * jax.nn.sigmoid(self.glu_gate(h))
    h = self.depthwise(zero_padded_frames(h, paddings))
    h = self.pointwise(jax.nn.silu(self.conv_norm(h)))
    return self.dropout(h, deterministic=deterministic, rngs=rngs)


@gin.configurable
class ConformerBlock(nnx.Module):
  """Half-step FFN, self-attention, convolution module, half-step FFN, LayerNorm (macaron style)."""

  def __init__(self, model_dim: int, num_heads: int, *, ff_mult: int = 4, conv_kernel: int = 31,
               dropout_rate: float = 0.0, attention_context: Sequence[int] | None = None,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    check_positive_sizes("ConformerBlock", model_dim=model_dim, num_heads=num_heads, ff_mult=ff_mult,
                         conv_kernel=conv_kernel)
    kwargs = dict(dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
    self.ffn_in = FeedForward(model_dim, ff_mult, **kwargs)
    self.attention = SelfAttention(model_dim, num_heads, attention_context=attention_context, **kwargs)
    self.conv = ConvModule(model_dim, conv_kernel, **kwargs)
    self.ffn_out = FeedForward(model_dim, ff_mult, **kwargs)
    self.final_norm = layer_norm(model_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, paddings: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """x: [batch, frames, model_dim]; paddings: [batch, frames] -> [batch, frames, model_dim].

    Valid frames do not depend on padded frames; padded frames hold unspecified finite values.
    """
    kwargs = dict(deterministic=deterministic, rngs=rngs)
    x = x + 0.5 * self.ffn_in(x, **kwargs)
    x = x + self.attention(x, paddings, **kwargs)
    x = x + self.conv(x, paddings, **kwargs)
    x = x + 0.5 * self.ffn_out(x, **kwargs)
    return constrain(self.final_norm(x), EMBED_ACTIVATIONS)


# ----------------------------------------------------------------------------------------------------------------
# Encoder.


@gin.configurable
class ConformerEncoder(nnx.Module):
  """ConvSubsampling + `num_layers` ConformerBlocks, with optional context-injection hooks.

  `attention_context = (left, right)` (subsampled frames, -1 unlimited) limits every block's
  self-attention to a window around each frame; None attends over the whole utterance. The
  convolution still looks (conv_kernel - 1) / 2 frames ahead per block.

  Context hook (for NAM / Deferred-NAM biasing): `context_module_factory(model_dim, dtype=, rngs=)`
  is called once per index in `context_layers` (block indices, 0-based, AFTER which the module
  runs). When `context` is given, after block i the encoder sets
      x = module_i(x, paddings, context)
  with x [batch, frames', model_dim] and paddings [batch, frames'] at the subsampled rate; the
  module returns the new x (it owns its residual connection) and `context` is passed through
  untouched (any pytree). `context` may instead be a callable `context(x, paddings) -> pytree`,
  called once with the stream just before the first context module runs (a biaser that picks its
  phrases from the audio encoded so far: models/nam.py); every module then gets its result.
  When `context` is None the hooks are skipped entirely and the output is the plain encoder's.
  """

  def __init__(self, input_dim: int = gin.REQUIRED, model_dim: int = gin.REQUIRED, num_layers: int = gin.REQUIRED,
               num_heads: int = gin.REQUIRED, *, ff_mult: int = 4, conv_kernel: int = 31, subsampling: int = 4,
               dropout_rate: float = 0.0, attention_context: Sequence[int] | None = None,
               context_layers: Sequence[int] = (),
               context_module_factory: ContextModuleFactory | None = None, dtype: str | jnp.dtype = "float32",
               rngs: nnx.Rngs):
    check_positive_sizes("ConformerEncoder", input_dim=input_dim, model_dim=model_dim, num_layers=num_layers,
                         num_heads=num_heads)
    attention_context = check_attention_context("ConformerEncoder", attention_context)
    context_layers = tuple(context_layers)
    if any(not isinstance(i, int) or not 0 <= i < num_layers for i in context_layers) or (
        len(set(context_layers)) != len(context_layers)):
      raise ValueError(f"ConformerEncoder.context_layers must be distinct block indices in [0, {num_layers}), "
                       f"got {context_layers}.")
    if context_layers and context_module_factory is None:
      raise ValueError(f"ConformerEncoder.context_layers={context_layers} needs a context_module_factory.")
    dtype = jnp.dtype(dtype)
    self.model_dim = model_dim
    self.dtype = dtype
    self.subsampling = ConvSubsampling(input_dim, model_dim, factor=subsampling, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.blocks = nnx.List([
        ConformerBlock(model_dim, num_heads, ff_mult=ff_mult, conv_kernel=conv_kernel, dropout_rate=dropout_rate,
                       attention_context=attention_context, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.context_layers = tuple(sorted(context_layers))
    self.context_modules = nnx.List([context_module_factory(model_dim, dtype=dtype, rngs=rngs)
                                     for _ in self.context_layers])

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  def __call__(self, features: jax.Array, paddings: jax.Array, *, context: Any = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """features: [batch, frames, input_dim]; paddings: [batch, frames] (1.0 = padded, valid frames first) ->
    (out [batch, frames', model_dim] with padded frames zero, out_paddings [batch, frames'])."""
    if features.ndim != 3 or paddings.shape != features.shape[:2]:
      raise ValueError(f"ConformerEncoder expects features [batch, frames, input_dim] and paddings "
                       f"[batch, frames], got {features.shape} and {paddings.shape}.")
    if context is not None and not self.context_layers:
      raise ValueError("ConformerEncoder got a context but was built with no context_layers.")
    x, paddings = self.subsampling(features.astype(self.dtype), paddings)
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    hooks = dict(zip(self.context_layers, self.context_modules)) if context is not None else {}
    for index, block in enumerate(self.blocks):
      x = block(x, paddings, deterministic=deterministic, rngs=rngs)
      if index in hooks:
        if callable(context):
          context = context(x, paddings)
        x = hooks[index](x, paddings, context)
    return zero_padded_frames(x, paddings), paddings


def encoder_num_params(**encoder_kwargs: Any) -> int:
  """Parameter count of ConformerEncoder(**encoder_kwargs), computed from shapes only (no allocation)."""
  with nnx.use_eager_sharding(False):
    encoder = nnx.eval_shape(lambda: ConformerEncoder(**encoder_kwargs, rngs=nnx.Rngs(0)))
  return encoder.num_params()
