"""train.init_from: a run starts from another run's parameters (the paper's continual
pre-training of an Infini-Transformer from a dense LM)."""

from __future__ import annotations

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.launch import train_lib
from memlm_jax.models.infini_lm import InfiniTransformerLM
from memlm_jax.models.transformer_lm import TransformerLM
from memlm_jax.runtime.checkpoints import Checkpointer, warm_start_params

import lm_runs

SIZES = dict(vocab_size=384, embed_dim=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=192)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A tiny dense LM trained for 3 steps; (model_dir, its params)."""
  tmp_path = tmp_path_factory.mktemp("dense")
  lm_runs.corpus(str(tmp_path / "data"))
  model_dir = str(tmp_path / "dense")
  lm_runs.parse(["runs/train.gin", "tiny/lm_demo.gin"],
                lm_runs.tiny_bindings(str(tmp_path / "data"), model_dir, TRAIN_STEPS=3) + lm_runs.ONE_DEVICE)
  train_lib.train(model_dir)
  gin.clear_config()
  with nnx.use_eager_sharding(False):
    abstract = jax.eval_shape(lambda: _params(TransformerLM(**SIZES, rngs=nnx.Rngs(0))))
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    params, step = ckpt.restore_params(None, abstract)
  finally:
    ckpt.close()
  assert step == 3
  return model_dir, params


def _params(model: nnx.Module) -> dict:
  return nnx.state(model, nnx.Param).to_pure_dict()


def _infini(**overrides) -> InfiniTransformerLM:
  with nnx.use_eager_sharding(False):
    return InfiniTransformerLM(**{**SIZES, **overrides}, segment_length=32, rngs=nnx.Rngs(7))


def test_a_dense_checkpoint_warm_starts_an_infini_lm_whose_memory_off_forward_is_the_dense_one(dense_run):
  model_dir, dense_params = dense_run
  fresh = _params(_infini())
  params, left_at_init = warm_start_params(model_dir, fresh)
  assert left_at_init == ["layers/0/attention/gate", "layers/1/attention/gate"]
  for i in range(2):  # the gates keep their init; everything else is the dense model's
    np.testing.assert_array_equal(params["layers"][i]["attention"]["gate"], fresh["layers"][i]["attention"]["gate"])
  np.testing.assert_array_equal(params["embedding"]["embedding"], dense_params["embedding"]["embedding"])

  memory_off = _infini(use_memory=False)
  without_gates = jax.tree.map(lambda x: x, params)  # a copy to delete the gates from
  for layer in without_gates["layers"].values():
    del layer["attention"]["gate"]
  nnx.update(memory_off, without_gates)
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 3, 384)
  infini_logits, _ = memory_off(tokens)
  with nnx.use_eager_sharding(False):
    dense = TransformerLM(**SIZES, rngs=nnx.Rngs(1))
  nnx.update(dense, dense_params)
  positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
  dense_logits = dense(tokens, jnp.ones((2, 32), jnp.int32), positions)
  np.testing.assert_allclose(infini_logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_a_shape_mismatch_is_one_error_naming_the_parameter_and_both_shapes(dense_run):
  model_dir, _ = dense_run
  with pytest.raises(ValueError, match=r"'embedding/embedding' has shape \(384, 64\) in the checkpoint but \(512, 64\)"):
    warm_start_params(model_dir, _params(_infini(vocab_size=512)))


def test_a_checkpoint_parameter_the_model_lacks_is_an_error(dense_run):
  model_dir, _ = dense_run
  with pytest.raises(ValueError, match=r"'layers/1/.*' .* of the checkpoint is not in the configured model"):
    warm_start_params(model_dir, _params(_infini(num_layers=1)))


def test_init_from_a_missing_directory_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="init_from"):
    warm_start_params(str(tmp_path / "nothing"), _params(_infini()))


def test_the_train_launcher_warm_starts_only_a_run_without_its_own_checkpoint(tmp_path, dense_run):
  """With a zero learning rate, step 3 of the warm-started run holds exactly the dense params;
  a relaunch resumes the run's own checkpoint instead of warm-starting again."""
  dense_dir, dense_params = dense_run
  lm_runs.corpus(str(tmp_path / "data"))
  model_dir = str(tmp_path / "infini")
  bindings = lm_runs.tiny_bindings(str(tmp_path / "data"), model_dir, TRAIN_STEPS=3) + lm_runs.ONE_DEVICE + [
      f"train.init_from = {dense_dir!r}", "warmup_cosine_schedule.peak_value = 0.0"]
  lm_runs.parse(["runs/train.gin", "tiny/infini_lm_demo.gin"], bindings)
  train_lib.train(model_dir)
  abstract = jax.eval_shape(lambda: _params(_infini()))
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    params, _ = ckpt.restore_params(3, abstract)
  finally:
    ckpt.close()
  np.testing.assert_array_equal(params["layers"][1]["mlp"]["wo"]["kernel"], dense_params["layers"][1]["mlp"]["wo"]["kernel"])
  lm_runs.parse(["runs/train.gin", "tiny/infini_lm_demo.gin"], bindings[:-2] + [
      f"train.init_from = {str(tmp_path / 'nothing')!r}", "TRAIN_STEPS = 4"])
  train_lib.train(model_dir)  # resumes its own step 3; a bad init_from is never read
