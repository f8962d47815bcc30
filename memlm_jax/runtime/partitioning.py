"""The Partitioner: the device mesh, the logical-axis rules and every sharding derived from them.

Modules annotate parameters and activations with logical names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `act_batch`, ...). The rules, gin data in configs/mesh/logical_axis_rules.gin (included by
every configs/mesh/*.gin), map each logical name to a mesh axis (`data`, `fsdp`, `tensor`), a tuple
of them, or None for replicated. The Partitioner is the one place that turns names into shardings:
parameters, the whole train state (optimizer state follows its parameter), host batches and
microbatches; `context()` activates the mesh and the rules while steps are traced and run.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from memlm_jax.runtime import multihost
from memlm_jax.runtime.train_state import TrainState, make_train_state, path_keys

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, Any], ...]


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


def merge_rules(rules: Sequence[Sequence[Any]], overrides: Sequence[Sequence[Any]] = ()) -> LogicalRules:
  """The logical-to-mesh rules with `overrides` replacing the entries they name; checks every
  target is a mesh axis (or None)."""
  merged: dict[str, Any] = {}
  for entry in list(rules) + list(overrides):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"logical axis rule {entry!r}: expected a pair (logical_name, mesh_axis or tuple or None).")
    merged[entry[0]] = entry[1]
  for name, target in merged.items():
    for axis in (target if isinstance(target, (tuple, list)) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"logical axis rule '{name}' maps to {axis!r}, expected one of {MESH_AXES} or None.")
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
                       f"add it to Partitioner.logical_axis_rules (known: {sorted(table)}).")
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


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings` (same tree structure)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@gin.configurable
class Partitioner:
  """Owns the device mesh and the logical-axis rules, and derives every sharding from them.

  Args:
    logical_axis_rules: pairs (logical name, mesh axis | tuple of mesh axes | None); gin data in
      configs/mesh/logical_axis_rules.gin.
    rule_overrides: pairs replacing the entries of `logical_axis_rules` they name (e.g.
      `Partitioner.rule_overrides = [('embed', None)]`).
    mesh: a Mesh, or a factory called with no arguments (`make_mesh`, configured by configs/mesh/*.gin).
  """

  def __init__(self, logical_axis_rules: Sequence[Sequence[Any]] = gin.REQUIRED,
               rule_overrides: Sequence[Sequence[Any]] = (), mesh: Mesh | Callable[[], Mesh] = make_mesh):
    self.rules = merge_rules(logical_axis_rules, rule_overrides)
    self.mesh = mesh if isinstance(mesh, Mesh) else mesh()
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
    self._data_shard: tuple[int, int] | None = None
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  @property
  def batch_shards(self) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Mesh and logical rules active while tracing or running sharded computations."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules), nnx.use_eager_sharding(False):
      yield

  def param_shardings(self, abstract_params: nnx.State) -> dict:
    """NamedShardings (a pure dict mirroring `abstract_params.to_pure_dict()`) from the
    `with_partitioning` annotations of an (abstract) NNX parameter state."""
    shardings: dict = {}
    for path, variable in nnx.to_flat_state(abstract_params):
      names = variable.get_metadata().get("out_sharding") or ()
      where = "parameter " + "/".join(str(p) for p in path)
      spec = logical_to_mesh_spec(names, self.rules, where)
      fitted = _fits(spec, variable.shape, self.mesh)
      if fitted != spec:
        logging.warning("%s %s: %s does not divide evenly on mesh %s; replicating those dims.",
                        where, variable.shape, spec, dict(self.mesh.shape))
      node = shardings
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = NamedSharding(self.mesh, fitted)
    return shardings

  def abstract_params(self, abstract_params: nnx.State) -> dict:
    """ShapeDtypeStructs of the parameters with their shardings (a restore target)."""
    return with_shardings(abstract_params.to_pure_dict(), self.param_shardings(abstract_params))

  def opt_state_shardings(self, abstract_opt_state: Any, abstract_params: dict, param_shardings: dict) -> Any:
    """Each optimizer-state leaf that mirrors a parameter (same key-path suffix and shape) is
    sharded like it; everything else (counts, factored second moments) is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(param_shardings)):
      by_path[path_keys(path)] = (leaf.shape, sharding)

    def one(path, leaf):
      keys = path_keys(path)
      for start in range(len(keys)):
        match = by_path.get(keys[start:])
        if match is not None and match[0] == leaf.shape:
          return match[1]
      return self.replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)

  def train_state_shardings(self, abstract_params: nnx.State, optimizer: optax.GradientTransformation,
                            abstract_carry: Any = None) -> tuple[TrainState, TrainState]:
    """(abstract TrainState of ShapeDtypeStructs with shardings, TrainState of NamedShardings).

    `abstract_carry`: ShapeDtypeStructs of the state carried between steps (leaves [batch, ...],
    split over the batch like the data), or None."""
    p_shardings = self.param_shardings(abstract_params)
    pure_params = abstract_params.to_pure_dict()
    abstract_opt = jax.eval_shape(optimizer.init, pure_params)
    carry_shardings = None if abstract_carry is None else jax.tree.map(lambda _: self.batch_sharding, abstract_carry)
    shardings = make_train_state(self.replicated, p_shardings,
                                 self.opt_state_shardings(abstract_opt, pure_params, p_shardings), carry_shardings)
    abstract = make_train_state(jax.ShapeDtypeStruct((), jnp.int32), pure_params, abstract_opt, abstract_carry)
    return with_shardings(abstract, shardings), shardings

  @property
  def data_shard(self) -> tuple[int, int]:
    """(index, count) of the input shard this process reads (see `data_shard_of`)."""
    if self._data_shard is None:
      self._data_shard = data_shard_of(self.mesh.devices, jax.process_index())
    return self._data_shard

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy arrays [local_batch, ...] (this process's input shard) -> global arrays
    sharded over (data, fsdp)."""
    rows = {len(v) for v in local_batch.values()}
    shards = self.data_shard[1]
    if any((r * shards) % self.batch_shards for r in rows):
      raise ValueError(f"a global batch of {sorted(rows)[0] * shards} rows cannot be split over the "
                       f"mesh's data x fsdp = {self.batch_shards} shards; make the batch size a multiple of "
                       f"{self.batch_shards}.")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def host_rows(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a global [batch, ...] result of a step fed by `global_batch` (the
    rows it put in, in its order), as numpy."""
    full = multihost.fetch(x)
    if jax.process_count() == 1:
      return full
    indices = self.batch_sharding.addressable_devices_indices_map(full.shape).values()
    spans = sorted({index[0].indices(full.shape[0])[:2] for index in indices})
    return np.concatenate([full[start:stop] for start, stop in spans])

  def split_microbatches(self, x: jax.Array, accum_steps: int) -> jax.Array:
    """[batch, ...] -> [accum, batch / accum, ...] (inside jit); microbatch i = rows i, i+accum, ...
    so every microbatch stays spread over all batch shards."""
    batch = x.shape[0]
    if batch % accum_steps:
      raise ValueError(f"global batch size {batch} is not divisible by accum_steps={accum_steps}.")
    x = x.reshape(batch // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES)))


def data_shard_of(devices: np.ndarray, process_index: int) -> tuple[int, int]:
  """(index, count) of the input shard that process `process_index` reads, for a mesh whose
  device grid is `devices` [data, fsdp, tensor].

  The batch is split into data x fsdp row blocks; a process feeds the blocks its devices hold.
  Processes holding the same blocks (a tensor axis spanning hosts) read the same shard; the
  blocks of each shard must be contiguous and every shard the same size, or a process's rows
  could not be placed: a ValueError then names the mesh.
  """
  fsdp = devices.shape[1]
  owned: dict[int, set[int]] = {}
  for (data_index, fsdp_index, _), device in np.ndenumerate(devices):
    owned.setdefault(device.process_index, set()).add(data_index * fsdp + fsdp_index)
  shards = sorted({tuple(sorted(blocks)) for blocks in owned.values()})
  size = len(shards[0])
  if any(shard != tuple(range(i * size, (i + 1) * size)) for i, shard in enumerate(shards)):
    raise ValueError(f"the mesh {dict(zip(MESH_AXES, devices.shape))} gives processes batch blocks (data x fsdp) "
                     f"that overlap or are not contiguous ({dict(sorted(owned.items()))}); choose make_mesh sizes "
                     "whose tensor axis fits within one host's devices or spans whole hosts.")
  return shards.index(tuple(sorted(owned[process_index]))), len(shards)


@gin.configurable
def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None, heartbeat_timeout_seconds: int = 100,
                           initialization_timeout_seconds: int = 300) -> None:
  """Joins this process to a multi-process JAX job (`jax.distributed.initialize`).

  mode: 'auto' initialises when cluster environment variables say there are several hosts (Cloud
  TPU pod, GKE, SLURM) or `coordinator_address` is set; 'always' always does (jax then detects
  the cluster itself, as on a TPU VM pod); 'never' never does.
  coordinator_address ('host:port' of process 0), num_processes and process_id name the job
  explicitly (all three together), e.g. several CPU processes on one machine; local_device_ids
  picks this process's devices. A process that stops sending heartbeats for
  heartbeat_timeout_seconds is declared dead and every other process exits with an error naming it.
  Must run before anything touches a device; the launchers call it first.
  """
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"initialize_distributed.mode must be 'auto', 'always' or 'never', got {mode!r}.")
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) != 3:
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f"initialize_distributed: {', '.join(given)} set but not {', '.join(missing)}; set all three "
                     "(or none, to let jax detect the cluster).")
  if given:
    if mode == "never":
      raise ValueError(f"initialize_distributed.mode='never' but coordinator_address={coordinator_address!r} is set.")
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"initialize_distributed.coordinator_address must be 'host:port', got {coordinator_address!r}.")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
      raise ValueError(f"initialize_distributed.num_processes must be an integer >= 1, got {num_processes!r}.")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
      raise ValueError(f"initialize_distributed.process_id must be an integer in 0..{num_processes - 1}, got "
                       f"{process_id!r}.")
  for name, value in (("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                      ("initialization_timeout_seconds", initialization_timeout_seconds)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"initialize_distributed.{name} must be an integer >= 1, got {value!r}.")
  if mode == "never":
    return
  if mode == "auto" and not given and not _multi_host_environment():
    return
  if jax.distributed.is_initialized():
    return  # a second launcher in the same process (e.g. train then eval in a script)
  if _backends_initialized():
    raise RuntimeError("initialize_distributed must run before anything uses a JAX device, but this process "
                       "already has; call it first (the memlm_jax launchers do).")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout_seconds,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  logging.info("jax.distributed initialised: process %d of %d, %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _multi_host_environment() -> bool:
  """Cluster variables that mean several hosts (a single-host TPU VM sets one hostname)."""
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  multi_host_env = any(os.environ.get(v) for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                                    "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS"))
  return multi_host_env and ("," in hostnames or not hostnames)


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()
