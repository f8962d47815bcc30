"""Per-row selection between two pytrees of decoder state (hypotheses that moved on keep the new
state, the others the old one)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def select_rows(take_new: jax.Array, new: Any, old: Any) -> Any:
  """`new` where take_new else `old`, per row.

  Args:
    take_new: bool of the leading shape S of every leaf ([batch] or [batch, beam]).
    new, old: pytrees of the same structure, every leaf S + [...].
  Returns:
    The pytree whose leaf rows come from `new` where take_new and from `old` elsewhere.
  """
  def select(a, b):
    return jnp.where(take_new.reshape(take_new.shape + (1,) * (a.ndim - take_new.ndim)), a, b)
  return jax.tree.map(select, new, old)
