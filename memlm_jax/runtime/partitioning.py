"""Device mesh, logical-axis rules and the shardings derived from them.

Modules annotate parameters and activations with logical names (`embed`, `mlp`,
`heads`, `kv`, `vocab`, `act_batch`, ...). The rules (set from gin, see
configs/mesh/*.gin) map each logical name to a mesh axis (`data`, `fsdp`,
`tensor`), a tuple of them, or None for replicated.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import gin
import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: LogicalRules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("norm", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, num_devices: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types. One axis may be -1 (fills the rest).

  `num_devices` takes the first N devices (e.g. 1 to run on a single device of a host).
  """
  if devices is None:
    devices = jax.devices()
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"make_mesh.num_devices={num_devices} but {len(devices)} devices are available.")
    devices = devices[:num_devices]
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices cannot be split into data={data}, fsdp={fsdp}, "
                       f"tensor={tensor}.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices) or min(shape) <= 0:
    raise ValueError(f"make_mesh: mesh (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) needs "
                     f"{math.prod(shape)} devices, but {len(devices)} are available.")
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@gin.configurable
def logical_axis_rules(rules: Sequence[Sequence[Any]] = DEFAULT_RULES, overrides: Sequence[Sequence[Any]] = ()
                       ) -> LogicalRules:
  """The logical-to-mesh rules; `overrides` replace the entries of `rules` they name."""
  merged = {name: target for name, target in rules}
  merged.update({name: target for name, target in overrides})
  for name, target in merged.items():
    for axis in (target if isinstance(target, (tuple, list)) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"logical_axis_rules: '{name}' maps to '{axis}', expected one of {MESH_AXES} or None.")
  return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in merged.items())


def logical_to_mesh_spec(logical: Sequence[str | None], rules: LogicalRules, what: str) -> PartitionSpec:
  """Maps a tuple of logical names to a mesh PartitionSpec; unknown names are an error."""
  table = dict(rules)
  mesh_axes = []
  for name in logical:
    if name is None:
      mesh_axes.append(None)
    elif name not in table:
      raise ValueError(f"{what} is annotated with logical axis '{name}', which no rule maps; "
                       f"add it to logical_axis_rules (known: {sorted(table)}).")
    else:
      mesh_axes.append(table[name])
  used = [a for axes in mesh_axes if axes for a in (axes if isinstance(axes, tuple) else (axes,))]
  if len(used) != len(set(used)):
    raise ValueError(f"{what}: logical axes {tuple(logical)} map to mesh axes {tuple(mesh_axes)}, which use one "
                     f"mesh axis twice; annotate one of those dimensions differently (or None).")
  return PartitionSpec(*mesh_axes)


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide the dimension they shard (replicates it instead)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if size and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: LogicalRules) -> dict:
  """NamedShardings (as a pure dict mirroring `state.to_pure_dict()`) from the
  `with_partitioning` annotations of an (abstract) NNX state."""

  shardings: dict = {}
  for path, variable in nnx.to_flat_state(abstract_state):
    names = variable.get_metadata().get("out_sharding") or ()
    where = "parameter " + "/".join(str(p) for p in path)
    spec = logical_to_mesh_spec(names, rules, where)
    fitted = _fits(spec, variable.shape, mesh)
    if fitted != spec:
      logging.warning("%s %s: %s does not divide evenly on mesh %s; replicating those dims.",
                      where, variable.shape, spec, dict(mesh.shape))
    node = shardings
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, fitted)
  return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@gin.configurable
def initialize_distributed(mode: str = "auto") -> None:
  """Calls `jax.distributed.initialize()` on a multi-host slice.

  mode: 'auto' (when Cloud TPU / cluster environment variables say there are
  several hosts), 'always' or 'never'.
  """
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"initialize_distributed.mode must be 'auto', 'always' or 'never', got {mode!r}.")
  multi_host_env = any(os.environ.get(v) for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                                    "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS"))
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if mode == "auto" and not (multi_host_env and ("," in hostnames or not hostnames)):
    return
  if mode == "never":
    return
  jax.distributed.initialize()
  logging.info("jax.distributed initialised: process %d of %d.", jax.process_index(), jax.process_count())
