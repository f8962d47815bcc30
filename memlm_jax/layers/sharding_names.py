"""Logical axis names of activations, spelled once, and the constraint that applies them.

configs/mesh/logical_axis_rules.gin maps each `act_*` name to mesh axes (the Partitioner,
runtime/partitioning.py, applies the rules); a module names an activation's axes with one of
the tuples below.
"""

from __future__ import annotations

import jax
from flax import linen

EMBED_ACTIVATIONS = ("act_batch", "act_length", "act_embed")  # [batch, time, embed]
MLP_ACTIVATIONS = ("act_batch", "act_length", "act_mlp")  # [batch, time, mlp]
HEAD_ACTIVATIONS = ("act_batch", "act_length", "act_heads", "act_kv")  # [batch, time, heads, head_dim]
LOGIT_ACTIVATIONS = ("act_batch", "act_length", "act_vocab")  # [batch, time, vocab]


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  """Constrains x's sharding by the logical names of its axes (one name per axis of x)."""
  return linen.with_logical_constraint(x, names)
