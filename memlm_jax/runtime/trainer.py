"""One jitted train step (and eval step) with explicit in/out shardings.

The model contract: `model.loss(batch, deterministic=..., rngs=...)` returns float32
sums `loss_sum`, `weight_sum` and, for models with a token accuracy, `correct_sum`
(a transducer has none; `accuracy` is then not reported). Losses are normalised by the total
weight of the whole global batch (all microbatches), so gradient accumulation and
any mesh give the same update as one big batch on one device.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memlm_jax.runtime import partitioning
from memlm_jax.runtime.train_state import TrainState

Batch = Mapping[str, jax.Array]


class Trainer:
  """Holds the compiled train and eval steps for one model, optimizer and mesh."""

  def __init__(self, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation | None,
               schedule: optax.Schedule | None, mesh: Mesh, rules: partitioning.LogicalRules, shardings: TrainState,
               *, accum_steps: int = 1, dropout_seed: int = 0):
    """optimizer/schedule may be None for evaluation only (then shardings.opt_state is unused)."""
    if accum_steps < 1:
      raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")
    self.graphdef = graphdef
    self.optimizer = optimizer
    self.schedule = schedule
    self.mesh = mesh
    self.rules = rules
    self.accum_steps = accum_steps
    self.dropout_seed = dropout_seed
    self.batch_sharding = partitioning.batch_sharding(mesh)
    replicated = partitioning.replicated(mesh)
    if optimizer is not None:
      self._train_step = jax.jit(self._step, in_shardings=(shardings, self.batch_sharding),
                                 out_shardings=(shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval_sums, in_shardings=(shardings.params, self.batch_sharding),
                              out_shardings=replicated)

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical rules active while tracing/running the steps."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules), nnx.use_eager_sharding(False):
      yield

  def _loss_sums(self, params: Any, batch: Batch, rng: jax.Array | None) -> dict[str, jax.Array]:
    model = nnx.merge(self.graphdef, params)
    rngs = nnx.Rngs(dropout=rng) if rng is not None else None
    return model.loss(batch, deterministic=rng is None, rngs=rngs)

  def _grads_and_sums(self, params: Any, batch: Batch, rng: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    def loss_fn(p):
      sums = self._loss_sums(p, batch, rng)
      return sums["loss_sum"], sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(params)
    return grads, sums

  def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(jax.random.key(self.dropout_seed), state.step)
    if self.accum_steps == 1:
      grads, sums = self._grads_and_sums(state.params, batch, rng)
    else:
      micro = jax.tree.map(self._split_microbatches, batch)

      def body(carry, xs):
        index, microbatch = xs
        grads, sums = self._grads_and_sums(state.params, microbatch, jax.random.fold_in(rng, index))
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
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _split_microbatches(self, x: jax.Array) -> jax.Array:
    """[batch, ...] -> [accum, batch / accum, ...], microbatch i = rows i, i+accum, ... so
    every microbatch stays spread over all batch shards."""
    batch = x.shape[0]
    if batch % self.accum_steps:
      raise ValueError(f"global batch size {batch} is not divisible by accum_steps={self.accum_steps}.")
    x = x.reshape(batch // self.accum_steps, self.accum_steps, *x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, partitioning.BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    return self._loss_sums(params, batch, None)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    with self.context():
      return self._train_step(state, batch)

  def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    with self.context():
      return self._eval_step(params, batch)

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy arrays [local_batch, ...] -> global arrays sharded over (data, fsdp)."""
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    rows = {len(v) for v in local_batch.values()}
    if any((r * jax.process_count()) % shards for r in rows):
      raise ValueError(f"a global batch of {sorted(rows)[0] * jax.process_count()} rows cannot be split over the "
                       f"mesh's data x fsdp = {shards} shards; make the batch size a multiple of {shards}.")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def eval_totals(self, params: Any, batches: Iterator[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Sums of loss, weight and correct tokens over host-local batches (every host must
    pass the same number of batches)."""
    totals: dict[str, float] = {}
    for local_batch in batches:
      sums = jax.device_get(self.eval_sums(params, self.global_batch(local_batch)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return totals
