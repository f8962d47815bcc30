"""The Infini-Transformer through the runtime: 1 vs 8 devices, gate parameter group, launchers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.launch import eval_lib, infer_lib
from memlm_jax.launch import train_lib as train
from memlm_jax.models.infini_lm import InfiniTransformerLM
from memlm_jax.runtime import optimizers, partitioning
from memlm_jax.runtime.summaries import read_jsonl
from tests import lm_runs

FILES = ["runs/train.gin", "tiny/infini_lm_demo.gin"]
# 64-token examples in 4 segments of 16, so memory carries information inside every example.
SHAPE = {"SEQUENCE_LENGTH": 64, "InfiniTransformerLM.segment_length": 16}


def test_one_device_and_2x4_mesh_train_the_infini_lm_identically(tmp_path):
  runs = lm_runs.losses_on_meshes(tmp_path, FILES, steps=12, **SHAPE)
  (single_loss, single_grad), (mesh_loss, mesh_grad) = runs["one"], runs["mesh"]
  assert single_loss[-1] < single_loss[0] - 0.5  # it actually trains
  np.testing.assert_allclose(mesh_loss, single_loss, rtol=5e-5)
  np.testing.assert_allclose(mesh_grad, single_grad, rtol=5e-4)


def test_gates_get_their_own_learning_rate_and_no_weight_decay():
  """With the Infini config's parameter groups, an equal gradient moves beta 10x as far as a
  kernel entry (Adam steps are ~lr per unit-sign gradient), and zero gradient leaves beta alone
  while weight decay shrinks the kernel."""
  lm_runs.parse(FILES, ["make_optimizer.weight_decay = 0.5", "warmup_cosine_schedule.warmup_steps = 0",
                        "warmup_cosine_schedule.decay_steps = 100", "warmup_cosine_schedule.peak_value = 1e-2",
                        "TRAIN_STEPS = 100"])
  tx = optimizers.make_optimizer(schedule=optimizers.warmup_cosine_schedule(), clip_grad_norm=None)
  params = {"layers": {"0": {"attention": {"gate": jnp.zeros((4,)), "query": {"kernel": jnp.ones((2, 4))}}}}}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  gate_step = float(-updates["layers"]["0"]["attention"]["gate"][0])
  kernel_step = float(-updates["layers"]["0"]["attention"]["query"]["kernel"][0, 0])
  decay = 1e-2 * 0.5 * 1.0  # lr * weight_decay * param
  np.testing.assert_allclose(gate_step, 10 * (kernel_step - decay), rtol=1e-3)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["layers"]["0"]["attention"]["gate"]).max()) == 0.0
  assert float(updates["layers"]["0"]["attention"]["query"]["kernel"][0, 0]) < 0


def test_the_gate_regex_finds_every_layers_gate():
  with nnx.use_eager_sharding(False):
    model = InfiniTransformerLM(vocab_size=16, embed_dim=8, num_layers=2, num_heads=2, head_dim=4, mlp_dim=8,
                                segment_length=4, rngs=nnx.Rngs(0))
  paths = jax.tree.leaves(optimizers.param_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  assert [p for p in paths if p.endswith("gate")] == ["layers/0/attention/gate", "layers/1/attention/gate"]


@pytest.mark.slow  # CI time; the passkey launcher smoke test trains and stream-evaluates an Infini LM, test_launchers runs infer
def test_train_eval_infer_with_the_infini_lm(tmp_path):
  data = lm_runs.corpus(str(tmp_path / "data"))
  model_dir = str(tmp_path / "run")
  bindings = lm_runs.tiny_bindings(data, model_dir, TRAIN_STEPS=30, **SHAPE,
                                   **{"Checkpointer.save_interval_steps": 30, "train.log_every_steps": 10})
  lm_runs.parse(FILES, bindings)
  train.train(model_dir)
  rows = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  assert rows[30]["loss"] < rows[10]["loss"]
  assert "InfiniTransformerLM.update_rule = 'delta'" in open(os.path.join(model_dir, "operative_config.gin")).read()
  params = eval_lib.restore_for_inference(model_dir, InfiniTransformerLM,
                                         lm_runs.partitioner(partitioning.make_mesh(num_devices=1)), None).params
  gates = np.stack([np.asarray(params["layers"][i]["attention"]["gate"]) for i in range(2)])
  assert np.abs(gates).min() > 1e-3  # every beta left its initial 0

  lm_runs.parse(["runs/eval.gin", "tiny/infini_lm_demo.gin"], bindings)
  metrics = eval_lib.evaluate(model_dir)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] < rows[10]["loss"]

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the bird is\n" + "count: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21\n")
  lm_runs.parse(["runs/infer.gin", "tiny/infini_lm_demo.gin"],
                bindings + [f"INPUT_FILE = '{prompts}'", "infer.max_decode_length = 12"])
  path = infer_lib.infer(model_dir)
  outputs = [json.loads(line) for line in open(path)]
  assert [o["prompt"] for o in outputs] == ["the bird is", "count: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 "
                                            "20 21"]
  assert all(0 < len(o["tokens"]) <= 12 for o in outputs)


def test_a_batch_the_mesh_cannot_split_is_one_clear_error(tmp_path):
  lm_runs.corpus(str(tmp_path / "data"))
  model_dir = str(tmp_path / "run")
  lm_runs.parse(FILES, lm_runs.tiny_bindings(str(tmp_path / "data"), model_dir, BATCH_SIZE=3, **SHAPE))
  with pytest.raises(ValueError, match="cannot be split over the mesh's data x fsdp = 8 shards"):
    train.train(model_dir)
