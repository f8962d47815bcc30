"""The absl/gin launchers end to end, and their one-line config errors."""

import glob
import json
import os

import numpy as np
import pytest
from flax import nnx

from memlm_jax import gin_utils
from memlm_jax.runtime.summaries import read_jsonl
from tests import lm_runs

FILES = ["runs/train.gin", "tiny/lm_demo.gin"]


def test_rewrite_gin_args():
  argv = ["prog", "--gin.TRAIN_STEPS=5", "--gin.MODEL_DIR", "'x'", "--gin_file=a.gin"]
  assert gin_utils.rewrite_gin_args(argv) == ["prog", "--gin_bindings=TRAIN_STEPS = 5",
                                              "--gin_bindings=MODEL_DIR = 'x'", "--gin_file=a.gin"]


def test_misspelled_binding_is_one_line_naming_it():
  with pytest.raises(gin_utils.GinConfigError) as error:
    lm_runs.parse(FILES, ["TransformerLM.num_layerz = 3"])
  message = str(error.value)
  assert "\n" not in message and "num_layerz" in message and "TransformerLM" in message


def test_missing_gin_file_is_one_line_naming_it():
  with pytest.raises(gin_utils.GinConfigError, match="'runs/nope.gin' not found"):
    lm_runs.parse(["runs/nope.gin"], [])


@pytest.mark.slow  # CI time budget; run by make test-all
def test_launcher_config_errors_exit_with_one_line(tmp_path):
  for files, binding, name in ((FILES, "TransformerLM.num_layerz = 3", "num_layerz"),
                               (FILES, "trian.train_steps = 3", "trian"),
                               (["runs/nope.gin"], "TRAIN_STEPS = 3", "nope.gin")):
    result = lm_runs.run(lm_runs.launcher("train", files, [binding, f"MODEL_DIR = '{tmp_path}/x'"]), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(f"{tmp_path}/x/checkpoints")  # failed before anything ran


def test_train_eval_infer_end_to_end(tmp_path):
  data = lm_runs.corpus(str(tmp_path / "data"))
  model_dir = str(tmp_path / "run")
  bindings = lm_runs.tiny_bindings(data, model_dir, TRAIN_STEPS=60, **{"Checkpointer.save_interval_steps": 30,
                                                                       "train.log_every_steps": 10})
  result = lm_runs.run(lm_runs.launcher("train", FILES, bindings) + ["--quiet"])
  assert result.returncode == 0, result.stderr[-3000:]
  _check_quiet_output(result.stdout, model_dir, "run", 60)
  rows = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  assert sorted(rows) == [10, 20, 30, 40, 50, 60]
  assert rows[60]["loss"] < rows[10]["loss"] - 1.0
  assert rows[60]["tokens_per_sec"] > 0 and rows[60]["learning_rate"] > 0
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["30", "60"]
  assert "TransformerLM.num_layers = 2" in open(os.path.join(model_dir, "operative_config.gin")).read()
  assert os.path.exists(os.path.join(model_dir, "config.gin"))
  assert glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))

  result = lm_runs.run(lm_runs.launcher("eval", ["runs/eval.gin", "tiny/lm_demo.gin"], bindings))
  assert result.returncode == 0, result.stderr[-3000:]
  [name] = [n for n in os.listdir(os.path.join(model_dir, "eval")) if n.startswith("synthetic_text_validation_")]
  assert name.endswith("_step60.json"), name
  report = json.load(open(os.path.join(model_dir, "eval", name)))
  assert report["settings"]["split"] == "validation"
  assert report["step"] == 60
  assert report["loss"] == pytest.approx(_naive_validation_loss(model_dir, data), rel=1e-4)
  assert report["perplexity"] == pytest.approx(np.exp(report["loss"]), rel=1e-6)
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed and all(report[k] == v for k, v in printed.items())

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("count: 3 4 5\nthe red is\n")
  result = lm_runs.run(lm_runs.launcher("infer", ["runs/infer.gin", "tiny/lm_demo.gin"],
                                        bindings + [f"INPUT_FILE = '{prompts}'", "infer.max_decode_length = 8"]))
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = [json.loads(line) for line in open(os.path.join(model_dir, "infer", "prompts_step60.jsonl"))]
  assert [o["prompt"] for o in outputs] == ["count: 3 4 5", "the red is"]
  assert all(0 < len(o["tokens"]) <= 8 for o in outputs)


def _naive_validation_loss(model_dir, data):
  """Token-averaged next-token loss over validation.txt, one document at a time, no
  seqio/Trainer/sharding: the restored parameters applied to each line directly."""
  import jax
  import jax.numpy as jnp
  import seqio
  from memlm_jax.models.transformer_lm import TransformerLM
  from memlm_jax.runtime.checkpoints import Checkpointer
  with nnx.use_eager_sharding(False):
    model = TransformerLM(vocab_size=384, embed_dim=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=192,
                          rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.to_pure_dict())
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  params, _ = ckpt.restore_params(60, abstract)
  ckpt.close()
  model = nnx.merge(graphdef, params)
  vocab = seqio.ByteVocabulary()
  total, count = 0.0, 0
  for line in open(os.path.join(data, "validation.txt")):
    ids = vocab.encode(line.rstrip("\n")) + [vocab.eos_id]
    for start in range(0, len(ids), 32):  # the task splits long documents into 32-token chunks
      chunk = np.array(ids[start:start + 32])
      inputs = np.concatenate([[0], chunk[:-1]])[None]
      logits = model(jnp.asarray(inputs), jnp.ones_like(inputs), jnp.arange(len(chunk))[None])[0]
      log_probs = jax.nn.log_softmax(logits)
      total -= float(jnp.sum(log_probs[jnp.arange(len(chunk)), chunk]))
      count += len(chunk)
  return total / count


def _check_quiet_output(stdout: str, model_dir: str, run_name: str, steps: int) -> None:
  """--quiet: the terminal shows only the progress line(s); the absl log is in MODEL_DIR/logs."""
  lines = [line for line in stdout.splitlines() if line.strip()]
  assert lines and lines[-1].startswith(f"train {run_name}: step {steps}/{steps}  loss "), stdout
  assert all(line.startswith(f"train {run_name}: step ") for line in lines), stdout  # progress lines only
  assert not any("logging_writer" in line or "train_lib.py" in line for line in stdout.splitlines())
  logs = glob.glob(os.path.join(model_dir, "logs", "*INFO*"))
  assert logs and f"Saving checkpoint for step {steps}" in open(logs[0]).read()
