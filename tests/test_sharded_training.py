"""The same run on 1 device and on a 2x4 (fsdp x tensor) mesh; checkpoints across meshes."""

import jax
import numpy as np
import optax
import pytest

from memlm_jax.models.transformer_lm import TransformerLM
from memlm_jax.runtime import partitioning
from memlm_jax.runtime import train_state as train_state_lib
from memlm_jax.runtime.checkpoints import Checkpointer
from memlm_jax.runtime.trainer import Trainer
from tests import lm_runs

FILES = ["runs/train.gin", "tiny/lm_demo.gin"]


@pytest.mark.slow  # CI time; test_infini_lm_training's 1-device vs 2x4 run covers the same runtime sharding path
def test_one_device_and_2x4_mesh_give_the_same_losses(tmp_path):
  runs = lm_runs.losses_on_meshes(tmp_path, FILES, steps=20)
  (single_loss, single_grad), (mesh_loss, mesh_grad) = runs["one"], runs["mesh"]
  assert single_loss[-1] < single_loss[0] - 0.5  # it actually trains
  np.testing.assert_allclose(mesh_loss, single_loss, rtol=2e-5)
  np.testing.assert_allclose(mesh_grad, single_grad, rtol=2e-4)


def _tiny_model(rngs):
  return TransformerLM(vocab_size=64, embed_dim=32, num_layers=1, num_heads=4, head_dim=8, mlp_dim=64, rngs=rngs)


def _state_on(mesh, tx, seed=0):
  parts = lm_runs.partitioner(mesh)
  graphdef, abstract_params = train_state_lib.abstract_model(_tiny_model)
  abstract, shardings = parts.train_state_shardings(abstract_params, tx)
  trainer = Trainer(graphdef, tx, optax.constant_schedule(1e-2), parts, shardings)
  with parts.context():
    state = train_state_lib.init_train_state(_tiny_model, tx, shardings, seed)
  return trainer, state, abstract


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("adafactor", marks=pytest.mark.slow)])  # adafactor: CI time
def test_checkpoint_from_8_devices_restores_on_1_and_on_another_mesh(tmp_path, optimizer):
  from memlm_jax.runtime.optimizers import make_optimizer
  tx = make_optimizer(optimizer, optax.constant_schedule(1e-2), weight_decay=0.1)
  trainer, state, _ = _state_on(partitioning.make_mesh(data=1, fsdp=2, tensor=4), tx)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, size=(8, 16)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, axis=1),
           "decoder_loss_weights": np.ones((8, 16), np.float32)}
  state, _ = trainer.train_step(state, trainer.partitioner.global_batch(batch))  # non-trivial optimizer state
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=1)
  ckpt.save(1, state)
  ckpt.close()
  expected = jax.device_get(state)
  for target_mesh in (partitioning.make_mesh(num_devices=1), partitioning.make_mesh(data=2, fsdp=1, tensor=4),
                      partitioning.make_mesh(data=1, fsdp=8, tensor=1)):
    _, _, abstract = _state_on(target_mesh, tx)
    restored_ckpt = Checkpointer(str(tmp_path / "ckpt"))
    restored, step = restored_ckpt.restore_latest(abstract)
    restored_ckpt.close()
    assert step == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected,
                 jax.device_get(restored))
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
      assert leaf.sharding == want.sharding
