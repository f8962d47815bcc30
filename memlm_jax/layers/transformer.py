"""Pre-norm decoder block: RMSNorm -> attention -> RMSNorm -> gated MLP, with residuals."""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from memlm_jax.layers.sharding_names import EMBED_ACTIVATIONS, MLP_ACTIVATIONS, constrain


def rms_norm(dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """RMSNorm over the last axis, scale in float32 and sharded like `embed`."""
  return nnx.RMSNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)), rngs=rngs)


@gin.configurable
class GatedMlp(nnx.Module):
  """SwiGLU feed-forward: wo(silu(x wi_0) * (x wi_1))."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    up_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    down_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "embed"))
    kwargs = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.wi_0 = nnx.Linear(embed_dim, mlp_dim, kernel_init=up_init, **kwargs)
    self.wi_1 = nnx.Linear(embed_dim, mlp_dim, kernel_init=up_init, **kwargs)
    self.wo = nnx.Linear(mlp_dim, embed_dim, kernel_init=down_init, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, time, embed] -> [batch, time, embed]."""
    hidden = jax.nn.silu(self.wi_0(x)) * self.wi_1(x)
    return self.wo(constrain(hidden, MLP_ACTIVATIONS))


class DecoderBlock(nnx.Module):
  """One pre-norm Transformer decoder layer. `attention` is a MultiHeadAttention or a subclass
  with its call signature, (x, mask, positions, state) -> (out, state): the Infini-attention
  layer plugs in here with its memory as the state."""

  def __init__(self, embed_dim: int, mlp_dim: int, attention: nnx.Module, *, dropout_rate: float = 0.0,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.attention_norm = rms_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.attention = attention
    self.mlp_norm = rms_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.mlp = GatedMlp(embed_dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array, state: Any = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               **attention_kwargs: jax.Array | None) -> tuple[jax.Array, Any]:
    """x: [batch, time, embed]; mask, positions, state and attention_kwargs go to the attention
    (see MultiHeadAttention.attend) -> ([batch, time, embed], the attention's new state)."""
    attended, state = self.attention(self.attention_norm(x), mask, positions, state, **attention_kwargs)
    x = x + self.dropout(attended, deterministic=deterministic, rngs=rngs)
    h = self.mlp(self.mlp_norm(x))
    x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
    return constrain(x, EMBED_ACTIVATIONS), state
