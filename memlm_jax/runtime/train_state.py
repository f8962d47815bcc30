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


@flax.struct.dataclass
class CarryingTrainState(TrainState):
  """The train state of a model that carries state from one step to the next (the Infini LM's memory over
  long documents, leaves [batch, ...]), saved with the checkpoint so a resumed run continues identically.
  Its own class, so the checkpoints of every other run keep TrainState's tree."""
  carry: Any


def carry_of(state: TrainState) -> Any:
  """The state's carry, or None for a plain TrainState."""
  return getattr(state, "carry", None)


def make_train_state(step: Any, params: Any, opt_state: Any, carry: Any = None) -> TrainState:
  """A TrainState, or a CarryingTrainState when there is a carry."""
  if carry is None:
    return TrainState(step=step, params=params, opt_state=opt_state)
  return CarryingTrainState(step=step, params=params, opt_state=opt_state, carry=carry)


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


def abstract_carry(model_fn: ModelFn, batch_size: int) -> Any:
  """ShapeDtypeStructs of the model's `init_carry(batch_size)`; None for a model that carries nothing."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0)))
  if not hasattr(model, "init_carry"):
    return None
  return jax.eval_shape(lambda: model.init_carry(batch_size))  # sizes only: the abstract module will do


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
                     seed: int, carry_batch_size: int | None = None) -> TrainState:
  """Initialises parameters and optimizer state directly in their shardings; with `carry_batch_size`,
  also the model's carry (`init_carry`) for a global batch of that many rows."""

  def init() -> TrainState:
    with nnx.use_eager_sharding(False):
      model = model_fn(rngs=nnx.Rngs(seed))
      params = nnx.state(model, nnx.Param).to_pure_dict()
      carry = None if carry_batch_size is None else model.init_carry(carry_batch_size)
    return make_train_state(jnp.zeros((), jnp.int32), params, optimizer.init(params), carry)

  return jax.jit(init, out_shardings=shardings)()
