"""The train state (step, params, optimizer state) and the inference state (params, step).

Parameters live in a plain nested dict (`nnx.State.to_pure_dict()`), the model's
structure in an NNX GraphDef; `nnx.merge(graphdef, params)` rebuilds the module
inside jitted functions. Placement comes from jit out_shardings, so NNX eager
sharding is switched off while modules are built. Shardings come from
runtime/partitioning.Partitioner.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:  # partitioning imports this module
  from memlm_jax.runtime.partitioning import Partitioner

ModelFn = Callable[..., nnx.Module]  # model_fn(rngs=nnx.Rngs) -> module


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class InferenceState:
  """A restored model for evaluation and decoding: structure, parameters (placed by `partitioner`),
  the checkpoint step they come from, and the partitioner whose `context()` runs the model."""
  graphdef: nnx.GraphDef
  params: Any
  step: int
  partitioner: Partitioner

  def model(self) -> nnx.Module:
    """The module with its restored parameters (eager use; inside jit merge graphdef and params)."""
    return nnx.merge(self.graphdef, self.params)


def abstract_model(model_fn: ModelFn, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract Param state) without allocating parameters."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"{type(model).__name__} has non-parameter state {sorted(rest.to_pure_dict())}; the "
                     "trainer supports models whose only variables are nnx.Param.")
  return graphdef, params


def path_keys(path) -> tuple:
  """The plain keys (dict keys, list indices) of a jax tree path."""
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def init_train_state(model_fn: ModelFn, optimizer: optax.GradientTransformation, shardings: TrainState,
                     seed: int) -> TrainState:
  """Initialises parameters and optimizer state directly in their shardings."""

  def init() -> TrainState:
    with nnx.use_eager_sharding(False):
      params = nnx.state(model_fn(rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  return jax.jit(init, out_shardings=shardings)()
