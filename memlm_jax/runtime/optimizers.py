"""Optimizers and learning-rate schedules from gin, built from optax parts.

Parameter groups are selected by regular expressions over '/'-joined parameter
paths (e.g. 'layers/0/attention/query/kernel').
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import optax


def param_paths(params: Any) -> Any:
  """A tree like `params` whose leaves are the '/'-joined key paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params)


def path_mask(patterns: Sequence[str], invert: bool = False):
  """A callable params -> bool tree: True where the path matches any pattern (or none, if invert)."""
  compiled = [re.compile(p) for p in patterns]

  def mask(params):
    return jax.tree.map(lambda path: invert != any(c.search(path) for c in compiled), param_paths(params))

  return mask


@gin.configurable
def warmup_cosine_schedule(peak_value: float = 1e-3, warmup_steps: int = 100, decay_steps: int = 10_000,
                           end_value_ratio: float = 0.1, init_value: float = 0.0) -> optax.Schedule:
  """Linear warm-up to `peak_value`, cosine decay to `peak_value * end_value_ratio` at `decay_steps`."""
  if warmup_steps < 0 or decay_steps <= warmup_steps:
    raise ValueError(f"warmup_cosine_schedule needs 0 <= warmup_steps < decay_steps, got warmup_steps="
                     f"{warmup_steps}, decay_steps={decay_steps}.")
  return optax.warmup_cosine_decay_schedule(init_value=init_value, peak_value=peak_value,
                                            warmup_steps=warmup_steps, decay_steps=decay_steps,
                                            end_value=peak_value * end_value_ratio)


@gin.configurable
def constant_schedule(value: float = 1e-3) -> optax.Schedule:
  return optax.constant_schedule(value)


@gin.configurable
def make_optimizer(name: str = "adamw", schedule: optax.Schedule | None = None, *, weight_decay: float = 0.0,
                   no_weight_decay: Sequence[str] = ("scale$", "bias$"), clip_grad_norm: float | None = 1.0,
                   lr_multipliers: Mapping[str, float] | None = None, frozen: Sequence[str] = (), b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8) -> optax.GradientTransformation:
  """Gradient clipping -> adamw / adafactor (decoupled weight decay, masked) -> per-group LR multipliers.

  Args:
    name: 'adamw' or 'adafactor'.
    schedule: learning-rate schedule (default: warmup_cosine_schedule()).
    no_weight_decay: path regexes excluded from weight decay (norm scales, biases, gates, ...).
    lr_multipliers: {path regex: factor}; matching updates are scaled by factor (first match wins
      per regex, factors of several matching regexes multiply).
    frozen: path regexes of parameters that never change (e.g. a warm-started base model under a
      new biaser: `['^(frontend|encoder/(subsampling|blocks)|predictor|joint)/']`): their updates
      are exactly zero, they hold no optimizer state, and their gradients count neither in the
      clipping norm nor in weight decay.
  """
  schedule = schedule if schedule is not None else warmup_cosine_schedule()
  decay_mask = path_mask(no_weight_decay, invert=True)
  if name == "adamw":
    base = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == "adafactor":
    # optax adds adafactor's decay after the LR scaling; scale it by the schedule so
    # weight_decay means the same (decoupled, lr * wd * p) as for adamw.
    decay = (lambda count: weight_decay * schedule(count)) if weight_decay else None
    base = optax.adafactor(schedule, weight_decay_rate=decay, weight_decay_mask=decay_mask,
                           multiply_by_parameter_scale=False)
  else:
    raise ValueError(f"make_optimizer.name must be 'adamw' or 'adafactor', got {name!r}.")
  parts = []
  if clip_grad_norm is not None:
    if clip_grad_norm <= 0:
      raise ValueError(f"make_optimizer.clip_grad_norm must be positive or None, got {clip_grad_norm}.")
    parts.append(optax.clip_by_global_norm(clip_grad_norm))
  parts.append(base)
  for pattern, factor in (lr_multipliers or {}).items():
    parts.append(optax.masked(optax.scale(factor), path_mask([pattern])))
  if isinstance(frozen, str):
    raise ValueError(f"make_optimizer.frozen must be a list of path regexes, got the string {frozen!r}.")
  for pattern in frozen:
    try:
      re.compile(pattern)
    except re.error as error:
      raise ValueError(f"make_optimizer.frozen: {pattern!r} is not a regular expression ({error}).") from None
  if not frozen:
    return optax.chain(*parts)
  frozen_mask = checked_path_mask(frozen, "make_optimizer.frozen")
  labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained", frozen_mask(params))
  tx = optax.multi_transform({"trained": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels)
  return FreezingTransformation(tx.init, tx.update, frozen_mask)


@dataclasses.dataclass(frozen=True)
class FreezingTransformation:
  """An optax GradientTransformation (init, update) that also names the parameters it never changes:
  frozen_mask(params) -> bool tree (True = frozen), static, so the Trainer can drop their gradients
  (XLA then never computes them) and leave them out of the reported gradient norm."""
  init: Callable[..., Any]
  update: Callable[..., Any]
  frozen_mask: Callable[[Any], Any]


def checked_path_mask(patterns: Sequence[str], owner: str) -> Callable[[Any], Any]:
  """path_mask(patterns) that raises ValueError (naming `owner`) when a pattern matches no parameter
  or every parameter matches (a typo would otherwise silently train, or freeze, everything)."""
  mask = path_mask(patterns)

  def checked(params):
    paths = jax.tree.leaves(param_paths(params))
    for pattern in patterns:
      if not any(re.search(pattern, path) for path in paths):
        raise ValueError(f"{owner}: {pattern!r} matches no parameter (paths look like {paths[0]!r}).")
    result = mask(params)
    if all(jax.tree.leaves(result)):
      raise ValueError(f"{owner}={list(patterns)} matches every parameter: nothing would train.")
    return result

  return checked
