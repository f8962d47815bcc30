"""Pod-scale experiments (experiments/*/pod_*.gin) shard every parameter the way the rules say.

Each config's mesh is built by its own gin-configured `make_mesh` over placeholder devices (the
pod's chip count, not this machine's 8), and its model abstractly (`train_state.abstract_model`,
jax.eval_shape: no parameter of a ~1B model is allocated), so a 256-chip plan is checked on a CPU
in seconds. The Partitioner replicates a dimension that a mesh axis does not divide
(`partitioning._fits`) and only logs it; on a pod that quietly multiplies the parameter's memory,
so here it is an error naming the parameter. The global batch must split over data x fsdp, per
microbatch, and over the hosts.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Any, Sequence

import gin
import jax
import pytest
from flax import nnx

from memlm_jax.runtime import partitioning
from memlm_jax.runtime import train_state as train_state_lib
from memlm_jax.runtime.optimizers import make_optimizer
from tests import lm_runs

POD_CONFIGS = sorted(os.path.relpath(path, lm_runs.REPO)
                     for path in glob.glob(os.path.join(lm_runs.REPO, "experiments", "*", "pod_*.gin")))
# What the launch commands in those files pass on the command line.
LAUNCH_BINDINGS = ["MODEL_DIR = 'gs://unused/run'", "SPM_MODEL = '/nonexistent/spm.model'"]
CHIPS_PER_HOST = 4  # a TPU VM of a v4 or v5e pod slice drives 4 chips
MB = 1e6
# Bindings that shape the mesh and the batch, never the model (see _abstract_params).
_NOT_THE_MODEL = ("make_mesh.", "BATCH_SIZE", "train.accum_steps")
_ABSTRACT_PARAMS: dict[str, nnx.State] = {}


class _Chip:
  """A stand-in device: a pod's mesh is only shapes here, nothing is placed on it."""

  def __init__(self, index: int):
    self.id = index

  def __repr__(self) -> str:
    return f"chip{self.id}"


@dataclasses.dataclass(frozen=True)
class PodPlan:
  """What a pod config asks of its mesh."""
  mesh_shape: dict[str, int]
  num_params: int
  largest_param_shard_mb: float  # the largest float32 parameter block one chip holds
  state_mb_per_chip: float  # parameters + optimizer state on one chip
  batch_size: int
  accum_steps: int


def _bound(name: str, default: Any = None) -> Any:
  """The value gin binds to `name`, macros and evaluated references (`%X`, `@f()`) resolved."""
  try:
    value = gin.query_parameter(name)
  except ValueError:
    return default
  while isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    value = value.scoped_configurable_fn()
  return value


def _pod_mesh(config: str) -> jax.sharding.Mesh:
  """The config's make_mesh over as many placeholder chips as its (fully stated) shape needs."""
  sizes = {axis: _bound(f"make_mesh.{axis}", -1) for axis in partitioning.MESH_AXES}
  if -1 in sizes.values() or _bound("make_mesh.num_devices") is not None:
    raise AssertionError(f"{config}: a pod config states its mesh, but make_mesh is {sizes}, num_devices="
                         f"{_bound('make_mesh.num_devices')} (-1 / num_devices depend on the machine it lands on).")
  count = math.prod(sizes.values())
  # make_mesh hands a full device list to jax.make_mesh, which needs real devices.
  chips = jax.devices() if count == jax.device_count() else [_Chip(i) for i in range(count)]
  return partitioning.make_mesh(devices=chips)


def _abstract_params() -> nnx.State:
  """The configured model's abstract parameters. Configs that differ only in mesh and batch share one
  build: even abstractly, a 1B model takes seconds to build on this CPU."""
  key = "\n".join(line for line in gin.config_str().splitlines() if not line.startswith(_NOT_THE_MODEL))
  if key not in _ABSTRACT_PARAMS:
    model = _bound("train.model")
    _ABSTRACT_PARAMS[key] = train_state_lib.abstract_model(lambda rngs: model(rngs=rngs))[1]
  return _ABSTRACT_PARAMS[key]


def _dims_not_divided(shape: Sequence[int], spec: jax.sharding.PartitionSpec, mesh_shape: dict[str, int]
                      ) -> list[str]:
  """'dim i (n) over tensor (3)' for each dimension the mesh axes named for it do not divide."""
  out = []
  for i, (dim, axes) in enumerate(zip(shape, spec)):
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    size = math.prod(mesh_shape[a] for a in names)
    if dim % size:
      out.append(f"dim {i} ({dim}) over {' x '.join(names)} ({size})")
  return out


def _padded(spec: jax.sharding.PartitionSpec, rank: int) -> tuple:
  return tuple(spec) + (None,) * (rank - len(spec))


def _shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
  return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize


def pod_plan(config: str, bindings: Sequence[str] = ()) -> PodPlan:
  """Parses runs/train.gin + `config` (+ `bindings`) and checks the plan on the config's own mesh.

  Raises AssertionError listing every parameter whose rule-given PartitionSpec a mesh axis does not
  divide (or that the Partitioner does not use as given), and a batch that does not split.
  """
  lm_runs.parse(["runs/train.gin", config], LAUNCH_BINDINGS + list(bindings))
  mesh = _pod_mesh(config)
  mesh_shape = dict(mesh.shape)
  parts = partitioning.Partitioner(mesh=mesh)
  abstract_params = _abstract_params()
  given = parts.param_shardings(abstract_params)

  problems = []
  for path, variable in nnx.to_flat_state(abstract_params):
    where = "/".join(str(p) for p in path)
    names = variable.get_metadata().get("out_sharding") or ()
    if len(names) != len(variable.shape):
      problems.append(f"{where} {variable.shape}: logical axes {names} do not name each dimension")
      continue
    intended = partitioning.logical_to_mesh_spec(names, parts.rules, f"parameter {where}")
    used = given
    for key in path:
      used = used[key]
    not_divided = _dims_not_divided(variable.shape, intended, mesh_shape)
    if not_divided or _padded(used.spec, len(variable.shape)) != _padded(intended, len(variable.shape)):
      problems.append(f"{where} {variable.shape} {names}: the rules give {intended}, the Partitioner uses "
                      f"{used.spec}" + (f"; not divisible: {', '.join(not_divided)}" if not_divided else ""))

  batch_size = _bound("train/DatasetConfig.batch_size")
  accum_steps = _bound("train.accum_steps", 1)
  hosts = max(1, mesh.size // CHIPS_PER_HOST)
  if batch_size % accum_steps or (batch_size // accum_steps) % parts.batch_shards or batch_size % hosts:
    problems.append(f"BATCH_SIZE={batch_size} with train.accum_steps={accum_steps}: each microbatch of "
                    f"{batch_size / accum_steps:g} must split over data x fsdp = {parts.batch_shards} shards, and the "
                    f"batch over {hosts} hosts")
  if problems:
    raise AssertionError(f"{config} on mesh {mesh_shape}:\n  " + "\n  ".join(problems))

  optimizer = _bound("train.optimizer", make_optimizer)
  abstract_state, _ = parts.train_state_shardings(abstract_params, optimizer(schedule=_bound("train.schedule")))
  params = jax.tree.leaves(abstract_state.params)
  return PodPlan(mesh_shape=mesh_shape, num_params=sum(math.prod(p.shape) for p in params),
                 largest_param_shard_mb=max(_shard_bytes(p) for p in params) / MB,
                 state_mb_per_chip=sum(_shard_bytes(x) for x in jax.tree.leaves(abstract_state)) / MB,
                 batch_size=batch_size, accum_steps=accum_steps)


def test_the_pod_configs_are_found():
  assert {"experiments/infini_lm/pod_v5e_256.gin", "experiments/infini_passkey/pod_v5e_256.gin",
          "experiments/infini_lm/pod_v4_32.gin"} <= set(POD_CONFIGS)


@pytest.mark.parametrize("config", POD_CONFIGS)
def test_every_parameter_shards_as_the_rules_say_and_the_batch_splits(config):
  plan = pod_plan(config)
  print(f"{config}: mesh {plan.mesh_shape}, {plan.num_params / 1e6:.0f}M parameters, largest parameter shard "
        f"{plan.largest_param_shard_mb:.1f} MB, parameters + optimizer state {plan.state_mb_per_chip:.0f} MB a chip, "
        f"batch {plan.batch_size} in {plan.accum_steps} microbatch(es)")
  # Every matrix spreads over fsdp x tensor and its Adam moments follow it: a chip holds that share of
  # the float32 parameters and two moments (12 bytes a parameter), plus the small replicated norms.
  share_mb = 12 * plan.num_params / MB / (plan.mesh_shape["fsdp"] * plan.mesh_shape["tensor"])
  assert plan.state_mb_per_chip < 1.1 * share_mb, (
      f"{config}: {plan.state_mb_per_chip:.0f} MB of parameters + optimizer state a chip, more than their fsdp x "
      f"tensor share ({share_mb:.0f} MB): some large parameter or optimizer state is replicated")


def test_a_mesh_axis_that_does_not_divide_a_parameter_fails_and_names_it():
  with pytest.raises(AssertionError) as failure:
    pod_plan("experiments/infini_lm/pod_v5e_256.gin", ["make_mesh.tensor = 3"])
  message = str(failure.value)
  assert "'tensor': 3" in message  # the mesh it was checked on
  assert "layers/0/attention/query/kernel (1024, 8, 128)" in message and "dim 1 (8) over tensor (3)" in message
  assert "layers/11/mlp/wi_0/kernel" in message and "embedding/embedding" in message
  assert "gate" in message


def test_a_batch_that_does_not_split_over_the_mesh_fails():
  with pytest.raises(AssertionError, match=r"BATCH_SIZE=96 .* data x fsdp = 64 shards"):
    pod_plan("experiments/infini_lm/pod_v5e_256.gin", ["BATCH_SIZE = 96"])
  with pytest.raises(AssertionError, match=r"BATCH_SIZE=64 with train.accum_steps=16: each microbatch of 4"):
    pod_plan("experiments/infini_lm/pod_v4_32.gin", ["train.accum_steps = 16"])


def test_a_mesh_left_to_the_device_count_is_not_a_pod_plan():
  with pytest.raises(AssertionError, match=r"make_mesh is .*'fsdp': -1"):
    pod_plan("experiments/infini_lm/pod_v5e_256.gin", ["make_mesh.fsdp = -1"])
