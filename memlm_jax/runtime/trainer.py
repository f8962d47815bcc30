"""The compiled steps: one jitted train step and one jitted eval step, with explicit shardings.

The model contract: `model.loss(batch, deterministic=..., rngs=...)` returns float32
sums `loss_sum`, `weight_sum` and, for models with a token accuracy, `correct_sum`
(a transducer has none; `accuracy` is then not reported); any other `<name>_sum` (the terms of a
composite loss, e.g. a biased transducer's `rnnt_loss_sum`) is reported as `<name>`, per weight. Losses are normalised by the total
weight of the whole global batch (all microbatches), so gradient accumulation and
any mesh give the same update as one big batch on one device. Shardings, the mesh and host
batches belong to the Partitioner (runtime/partitioning.py).

A model trained over long documents also has `init_carry(batch_size)` and
`carried_loss(batch, carry, deterministic=..., rngs=..., per_row=False) -> (sums, carry)`: the
Trainer keeps the carry in `CarryingTrainState.carry` and hands each step's result to the next (no
gradient flows through it), and the Evaluator's `carried_row_sums` gives each batch row's sums.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memlm_jax.runtime.partitioning import Partitioner
from memlm_jax.runtime.train_state import TrainState, carry_of, make_train_state

Batch = Mapping[str, jax.Array]


def _loss_sums(graphdef: nnx.GraphDef, params: Any, batch: Batch, rng: jax.Array | None,
               carry: Any = None) -> tuple[dict[str, jax.Array], Any]:
  """(the model's loss sums, the carry after this batch: None for a model that carries nothing)."""
  model = nnx.merge(graphdef, params)
  rngs = nnx.Rngs(dropout=rng) if rng is not None else None
  if carry is None:
    return model.loss(batch, deterministic=rng is None, rngs=rngs), None
  return model.carried_loss(batch, carry, deterministic=rng is None, rngs=rngs)


class Evaluator:
  """The compiled eval step: loss sums of a model over batches, parameters in `param_shardings`."""

  def __init__(self, graphdef: nnx.GraphDef, partitioner: Partitioner, param_shardings: Any):
    self.graphdef = graphdef
    self.partitioner = partitioner
    self._eval_step = jax.jit(lambda params, batch: _loss_sums(graphdef, params, batch, None)[0],
                              in_shardings=(param_shardings, partitioner.batch_sharding),
                              out_shardings=partitioner.replicated)
    rows = partitioner.batch_sharding

    def carried_rows(params, batch, carry):
      return nnx.merge(graphdef, params).carried_loss(batch, carry, per_row=True)

    self._carried_step = jax.jit(carried_rows, in_shardings=(param_shardings, rows, rows),
                                 out_shardings=(rows, rows))

  def init_carry(self, params: Any, batch_size: int) -> Any:
    """The model's initial carry for a global batch of `batch_size` rows, split over the batch like the data."""
    with self.partitioner.context():
      return jax.jit(lambda p: nnx.merge(self.graphdef, p).init_carry(batch_size),
                     out_shardings=self.partitioner.batch_sharding)(params)

  def carried_row_sums(self, params: Any, batch: Batch, carry: Any) -> tuple[dict[str, jax.Array], Any]:
    """Each row's loss sums ([batch] arrays) of a long-document batch, and the carry after it."""
    with self.partitioner.context():
      return self._carried_step(params, batch, carry)

  def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    with self.partitioner.context():
      return self._eval_step(params, batch)

  def eval_totals(self, params: Any, batches: Iterator[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Sums of loss, weight and correct tokens over host-local batches (every host must
    pass the same number of batches)."""
    totals: dict[str, float] = {}
    for local_batch in batches:
      sums = jax.device_get(self.eval_sums(params, self.partitioner.global_batch(local_batch)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return totals


class Trainer:
  """The compiled train step for one model, optimizer and partitioner (and its Evaluator for
  validation during training)."""

  def __init__(self, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               partitioner: Partitioner, shardings: TrainState, *, accum_steps: int = 1, dropout_seed: int = 0):
    if accum_steps < 1:
      raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")
    if accum_steps > 1 and carry_of(shardings) is not None:
      raise ValueError(f"accum_steps={accum_steps}: a model that carries its memory between steps (long-document "
                       "training) takes the whole batch in one step; use accum_steps=1 or a smaller batch.")
    self.graphdef = graphdef
    self.optimizer = optimizer
    self.schedule = schedule
    self.partitioner = partitioner
    self.accum_steps = accum_steps
    self.dropout_seed = dropout_seed
    # optimizers.FreezingTransformation: parameters that never change get no gradient at all.
    self.frozen_mask = getattr(optimizer, "frozen_mask", None)
    self.evaluator = Evaluator(graphdef, partitioner, shardings.params)
    self._train_step = jax.jit(self._step, in_shardings=(shardings, partitioner.batch_sharding),
                               out_shardings=(shardings, partitioner.replicated), donate_argnums=(0,))

  def _grads_and_sums(self, params: Any, batch: Batch, rng: jax.Array,
                      carry: Any = None) -> tuple[Any, dict[str, jax.Array], Any]:
    def loss_fn(p):
      sums, new_carry = _loss_sums(self.graphdef, p, batch, rng, carry)
      return sums["loss_sum"], (sums, new_carry)

    grads, (sums, carry) = jax.grad(loss_fn, has_aux=True)(params)
    if self.frozen_mask is not None:  # unused, so XLA never computes the frozen parameters' gradients
      grads = jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g, grads, self.frozen_mask(params))
    return grads, sums, carry

  def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(jax.random.key(self.dropout_seed), state.step)
    carry = carry_of(state)
    if self.accum_steps == 1:
      grads, sums, carry = self._grads_and_sums(state.params, batch, rng, carry)
    else:
      micro = jax.tree.map(lambda x: self.partitioner.split_microbatches(x, self.accum_steps), batch)

      def body(carry, xs):
        index, microbatch = xs
        grads, sums, _ = self._grads_and_sums(state.params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      first = jax.tree.map(lambda x: x[0], micro)
      keys = jax.eval_shape(lambda: self._grads_and_sums(state.params, first, rng)[1]).keys()
      zeros = (jax.tree.map(jnp.zeros_like, state.params), {k: jnp.zeros((), jnp.float32) for k in keys})
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(self.accum_steps), micro))
    weight = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": sums["loss_sum"] / weight,
        "tokens": sums["weight_sum"],
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
    }
    if "correct_sum" in sums:
      metrics["accuracy"] = sums["correct_sum"] / weight
    for key in sums.keys() - {"loss_sum", "weight_sum", "correct_sum"}:  # a model's loss terms, e.g. rnnt_loss_sum
      metrics[key.removesuffix("_sum")] = sums[key] / weight
    return make_train_state(state.step + 1, params, opt_state, carry), metrics

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    with self.partitioner.context():
      return self._train_step(state, batch)
