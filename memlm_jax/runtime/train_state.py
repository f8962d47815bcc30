"""The train state (step, params, optimizer state) and its shardings.

Parameters live in a plain nested dict (`nnx.State.to_pure_dict()`), the model's
structure in an NNX GraphDef; `nnx.merge(graphdef, params)` rebuilds the module
inside jitted functions. Placement comes from jit out_shardings, so NNX eager
sharding is switched off while modules are built.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memlm_jax.runtime import partitioning

ModelFn = Callable[..., nnx.Module]  # model_fn(rngs=nnx.Rngs) -> module


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: Any
  opt_state: Any


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


def opt_state_shardings(abstract_opt_state: Any, abstract_params: dict, param_shardings: dict,
                        mesh: Mesh) -> Any:
  """Each optimizer-state leaf that mirrors a parameter (same key path suffix and shape) is
  sharded like it; everything else (counts, factored second moments) is replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree.leaves(param_shardings)):
    by_path[path_keys(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    keys = path_keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(graphdef_and_params: tuple[nnx.GraphDef, nnx.State], optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: partitioning.LogicalRules) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs with shardings, TrainState of NamedShardings)."""
  _, abstract_params_state = graphdef_and_params
  p_shardings = partitioning.param_shardings(abstract_params_state, mesh, rules)
  abstract_params = abstract_params_state.to_pure_dict()
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  shardings = TrainState(step=NamedSharding(mesh, PartitionSpec()), params=p_shardings,
                         opt_state=opt_state_shardings(abstract_opt, abstract_params, p_shardings, mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def init_train_state(model_fn: ModelFn, optimizer: optax.GradientTransformation, shardings: TrainState,
                     seed: int) -> TrainState:
  """Initialises parameters and optimizer state directly in their shardings."""

  def init() -> TrainState:
    with nnx.use_eager_sharding(False):
      params = nnx.state(model_fn(rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  return jax.jit(init, out_shardings=shardings)()
