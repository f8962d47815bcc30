"""Checkpoints: a small wrapper over orbax's CheckpointManager (async, Composite args).

Each step directory holds `state` (the TrainState pytree, restorable onto any mesh)
and `data` (each host's input-pipeline position, so a resumed run reads the same
batches). The data iterator is duck-typed: an object with `save(path)` and
`restore(path)`. Only this file talks to orbax.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any, Protocol

import gin
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from memlm_jax.runtime import files
from memlm_jax.runtime.train_state import path_keys


class SavableIterator(Protocol):
  def save(self, path: str) -> None: ...

  def restore(self, path: str) -> None: ...

  def fast_forward(self, batches: int) -> None: ...


def _process_file(directory: epath.Path) -> str:
  return os.fspath(directory / f"process_{jax.process_index()}-of-{jax.process_count()}")


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves / restores each host's data iterator in its own file under the item directory."""

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(_process_file(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
    path = _process_file(directory)
    if not any(directory.glob(os.path.basename(path) + "*")):
      raise FileNotFoundError(f"no data-iterator state for this host at {path} (was the checkpoint written by a "
                              "different number of hosts?)")
    args.iterator.restore(path)
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
class DataIteratorSave(ocp.args.CheckpointArgs):
  def __init__(self, iterator: SavableIterator):
    self.iterator = iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
class DataIteratorRestore(ocp.args.CheckpointArgs):
  def __init__(self, iterator: SavableIterator):
    self.iterator = iterator


def _path_name(path) -> str:
  return "/".join(str(k) for k in path_keys(path))


def _flatten(tree: Any) -> dict[str, tuple[Any, Any]]:
  """{'layers/0/attention/gate': (path, leaf)} of a nested params dict."""
  return {_path_name(path): (path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/layers/0/attention/gate': shape} of any pytree of arrays or ShapeDtypeStructs."""
  return {name: tuple(leaf.shape) for name, (_, leaf) in _flatten(tree).items()}


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose parameter tree or shapes differ from the configured model's:
  a config change, not damage. Nothing is moved; the launcher stops."""


class DataFastForwardError(RuntimeError):
  """The input pipeline could not be advanced to a checkpoint's step (a data problem; the
  checkpoint is left where it is)."""


def first_mismatch(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
  """One line naming the first path (in sorted order) where a checkpoint's {path: shape} and the
  configured model's differ; None when they are the same."""
  for name in sorted(set(saved) | set(expected)):
    if name not in saved:
      return f"{name!r} {expected[name]} of the configured model is not in the checkpoint"
    if name not in expected:
      return f"{name!r} {saved[name]} of the checkpoint is not in the configured model"
    if saved[name] != expected[name]:
      return f"{name!r} has shape {saved[name]} in the checkpoint but {expected[name]} in the configured model"
  return None


@gin.configurable
class Checkpointer:
  """Save every `save_interval_steps`, keep the last `max_to_keep` plus every `keep_period`-th."""

  def __init__(self, directory: str, *, save_interval_steps: int = 1000, max_to_keep: int = 3,
               keep_period: int | None = None, async_save: bool = True, data_on_topology_change: str = "error"):
    """data_on_topology_change: what a restore does when the checkpoint's input-pipeline positions
    were written by another number of processes (hosts), which cannot be mapped onto this run's
    shards: 'error' (default) stops; 'fast_forward' restores the model and optimizer and advances
    this run's fresh input pipeline by as many batches as the checkpoint's step (so the run
    continues as a run of the new topology would from that step; it replays those batches)."""
    if save_interval_steps < 1:
      raise ValueError(f"Checkpointer.save_interval_steps must be >= 1, got {save_interval_steps}.")
    if data_on_topology_change not in ("error", "fast_forward"):
      raise ValueError(f"Checkpointer.data_on_topology_change must be 'error' or 'fast_forward', got "
                       f"{data_on_topology_change!r}.")
    self.data_on_topology_change = data_on_topology_change
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self.save_interval_steps = save_interval_steps
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, create=True)
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.save_interval_steps == 0

  def save(self, step: int, state: Any, iterator: SavableIterator | None = None, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and the iterator position at `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = DataIteratorSave(iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s.", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, iterator: SavableIterator | None = None) -> Any:
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    saved_processes = None if iterator is None else self._data_process_counts(step)
    fast_forward = bool(saved_processes) and jax.process_count() not in saved_processes
    if fast_forward and self.data_on_topology_change == "error":
      raise CheckpointMismatchError(
          f"the input-pipeline positions in {self.directory / str(step) / 'data'} were written by "
          f"{' or '.join(map(str, sorted(saved_processes)))} processes, this run has {jax.process_count()}; each "
          "process reads its own shard, so they cannot be mapped. Relaunch with the same number of processes, or "
          "set --gin.Checkpointer.data_on_topology_change=\"'fast_forward'\" to restore the model and optimizer and "
          f"advance this run's input pipeline by {step} batches.")
    if iterator is not None and not saved_processes:
      logging.warning("Checkpoint %s holds no input-pipeline position: the pipeline starts from its beginning.",
                      self.directory / str(step))
    if iterator is not None and saved_processes and not fast_forward:
      items["data"] = DataIteratorRestore(iterator)
    state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
    if fast_forward:
      logging.warning("Checkpoint %s: input pipeline written by %s processes, now %d: advancing it by %d batches.",
                      self.directory / str(step), sorted(saved_processes), jax.process_count(), step)
      try:
        iterator.fast_forward(step)
      except Exception as error:  # the data, not the checkpoint: never quarantine for this
        raise DataFastForwardError(f"advancing the input pipeline by {step} batches to resume from "
                                   f"{self.directory / str(step)} failed ({type(error).__name__}: {error}); "
                                   "the dataset may have fewer batches than that.") from error
    return state

  def _data_process_counts(self, step: int) -> set[int]:
    """The process counts that wrote the input-pipeline positions of `step` (empty if none were saved)."""
    directory = self.directory / str(step) / "data"
    if not directory.exists():
      return set()
    return {int(found.group(1)) for path in directory.iterdir()
            if (found := re.match(r"process_\d+-of-(\d+)", path.name))}

  def restore_params(self, step: int | None, abstract_params: Any, *, exact: bool = True) -> tuple[Any, int]:
    """Restores only `state.params` (no optimizer state) of `step` (None: the latest).

    With `exact` the saved parameter tree and shapes must equal `abstract_params`'
    (CheckpointMismatchError otherwise, before anything is read); without it `abstract_params`
    may be a subset of the saved parameters (warm start).
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} (CHECKPOINT_STEP) in {self.directory}; the steps "
                              f"that exist: {self.all_steps()}.")
    if exact:
      problem = first_mismatch(self.param_shapes(step), tree_shapes(abstract_params))
      if problem:
        raise CheckpointMismatchError(f"the checkpoint {self.directory / str(step)} does not match the configured "
                                      f"model: parameter {problem}.")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"], step

  def _saved_tree(self, step: int) -> Any:
    """The saved state's tree of array metadata; OSError when the metadata cannot be read (orbax
    returns None for a truncated or garbled metadata file): the checkpoint is damaged."""
    metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
      raise OSError(f"the metadata of {self.directory / str(step) / 'state'} is unreadable or has no parameters")
    return tree

  def param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'layers/0/attention/gate': shape} of the parameters saved at `step` (reads metadata only)."""
    return tree_shapes(self._saved_tree(step)["params"])

  def state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{'params/layers/0/attention/gate': shape, 'opt_state/...': ...} of the whole saved state."""
    return tree_shapes(self._saved_tree(step))

  def restore_latest(self, abstract_state: Any, iterator: SavableIterator | None = None) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back completely.

    A damaged checkpoint (unreadable metadata, truncated or corrupted files) is moved to
    `<dir>/corrupted/<step>-<time>` with a warning naming it, and the previous one is
    tried. A readable checkpoint whose tree or shapes differ from `abstract_state` (the
    configuration changed) raises CheckpointMismatchError before anything is read or moved,
    and so does an input pipeline whose batches changed shape (the iterator's restore raises
    it). Returns (state, step), or None when no checkpoint exists.
    """
    expected = tree_shapes(abstract_state)
    for step in reversed(self.all_steps()):
      try:
        saved = self.state_shapes(step)
      except Exception as error:  # unreadable metadata: the checkpoint is damaged
        self._fall_back(step, error)
        continue
      params = lambda shapes: {k: v for k, v in shapes.items() if k.startswith("params/")}  # noqa: E731
      problem = first_mismatch(params(saved), params(expected)) or first_mismatch(saved, expected)
      if problem:
        raise CheckpointMismatchError(f"the checkpoint {self.directory / str(step)} does not match the configured "
                                      f"model and optimizer: {problem}.")
      try:
        return self.restore(step, abstract_state, iterator), step
      except (CheckpointMismatchError, DataFastForwardError):
        raise
      except ValueError as error:
        if "tree structures do not match" in str(error):  # the same arrays in another tree: a code change, not damage
          raise CheckpointMismatchError(
              f"the checkpoint {self.directory / str(step)} holds the configured arrays in another tree structure "
              f"(orbax: {str(error).splitlines()[0][:200]}); nothing was moved.") from error
        self._fall_back(step, error)
      except Exception as error:  # orbax/tensorstore raise many types for damaged files
        self._fall_back(step, error)
    return None

  def _fall_back(self, step: int, error: Exception) -> None:
    logging.warning("Checkpoint %s (step %d) could not be restored (%s: %s); falling back to the previous "
                    "checkpoint.", self.directory / str(step), step, type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else "")
    self._quarantine(step)

  def _quarantine(self, step: int) -> None:
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      target = self.directory / "corrupted" / f"{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(os.fspath(self.directory / str(step)), os.fspath(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine_checkpoint_{step}")
    self._manager.close()
    self._manager = self._new_manager()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once the cluster has signalled preemption (multi-host TPU)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def warm_start_params(init_from: str, params: Any, step: int | None = None) -> tuple[Any, list[str]]:
  """Params of another run's checkpoint mapped into `params` (a model's freshly initialised,
  sharded params); returns (params, names of the parameters left at their initial values).

  `init_from` is a MODEL_DIR (its checkpoints/ is read) or a checkpoints directory; `step`
  None takes its newest step. Every saved parameter must exist in the model with the same
  shape (one ValueError names the first that does not); parameters the checkpoint lacks
  (e.g. Infini-attention gates when warm-starting from a dense LM) keep their init values.
  Only the parameters are read: the optimizer state and the data position start fresh.
  """
  directory = os.path.join(init_from, "checkpoints") if files.isdir(os.path.join(init_from, "checkpoints")) \
      else init_from
  if not files.isdir(directory):
    raise FileNotFoundError(f"train.init_from {init_from!r} is not a model directory or a checkpoints directory.")
  source = Checkpointer(directory)
  try:
    step = source.latest_step() if step is None else step
    if step is None or step not in source.all_steps():
      raise FileNotFoundError(f"train.init_from: no checkpoint for step {step} in {directory} "
                              f"(have {source.all_steps()}).")
    saved = source.param_shapes(step)
    target = _flatten(params)
    # Every saved parameter must exist with its shape; the model's extra ones stay at init.
    problem = first_mismatch(saved, {name: shape for name, shape in tree_shapes(params).items() if name in saved})
    if problem:
      raise CheckpointMismatchError(f"train.init_from: {directory} (step {step}) does not fit the configured "
                                    f"model: parameter {problem}.")
    subset: dict = {}
    for name in saved:
      path, leaf = target[name]
      *parents, last = path_keys(path)
      node = subset
      for key in parents:
        node = node.setdefault(key, {})
      node[last] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    restored, _ = source.restore_params(step, subset, exact=False)
  finally:
    source.close()
  restored_by_name = {name: leaf for name, (_, leaf) in _flatten(restored).items()}
  left_at_init = sorted(set(target) - set(restored_by_name))
  merged = jax.tree_util.tree_map_with_path(lambda path, leaf: restored_by_name.get(_path_name(path), leaf), params)
  return merged, left_at_init
