"""The Conformer transducer end to end: sizes, padding invariance, training on 1 device vs a
2x4 mesh, the ASR eval launcher, and decoding through the model's own functions."""

import importlib.util
import json
import math
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.decoding.transducer_beam import TransducerFns, beam_search
from memlm_jax.launch import asr_lib, eval_lib, train_lib
from memlm_jax.models.transducer import Transducer
from memlm_jax.runtime.summaries import read_jsonl
from scripts import make_synthetic_speech as synth
from scripts import train_spm
from tests import lm_runs
from tests.test_ctc_loss import _brute_force_nll

# Gulati et al. 2020, Table 1 (encoder + single-LSTM decoder, ~1k word-piece vocabulary).
PAPER_PARAMS_M = {"s": 10.3, "m": 30.7, "l": 118.8}

TINY = ["ConformerEncoder.model_dim = 16", "ConformerEncoder.num_heads = 2", "ConformerEncoder.num_layers = 1",
        "ConformerEncoder.conv_kernel = 5", "ConformerEncoder.dropout_rate = 0.0", "LstmPredictor.embed_dim = 8",
        "LstmPredictor.hidden_dim = 8", "JointNetwork.joint_dim = 8", "SpecAugment.num_time_masks = 1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("speech"))
  synth.make_corpus(out, num_utterances=10, seed=3, workers=1, dev_fraction=0.2, test_fraction=0.2)
  train_spm.train_spm(os.path.join(out, "train.jsonl"), os.path.join(out, "spm"), vocab_size=48)
  return out



def _result_base(model_dir: str, prefix: str, step: int) -> str:
  """MODEL_DIR/eval/<prefix><settings hash>_step<step> (without .json / .jsonl): exactly one."""
  names = [n for n in os.listdir(os.path.join(model_dir, "eval"))
           if n.startswith(prefix) and n.endswith(f"_step{step}.json") and n[len(prefix):].count("_") == 1]
  assert len(names) == 1, names
  return os.path.join(model_dir, "eval", names[0][:-len(".json")])

def _bindings(corpus, model_dir, **extra):
  values = {"TRAIN_MANIFEST": f"'{corpus}/train.jsonl'", "DEV_MANIFEST": f"'{corpus}/dev.jsonl'",
            "TEST_MANIFEST": f"'{corpus}/test.jsonl'", "SPM_MODEL": f"'{corpus}/spm.model'", "VOCAB_SIZE": 48,
            "MODEL_DIR": f"'{model_dir}'", "BATCH_SIZE": 8, "EVAL_BATCH_SIZE": 8, "TRAIN_STEPS": 3,
            "train.log_every_steps": 1, "warmup_cosine_schedule.warmup_steps": 1,
            "Checkpointer.save_interval_steps": 3}
  values.update(extra)
  return TINY + [f"{k} = {v}" for k, v in values.items()]


@pytest.mark.slow  # 10-20 s of tracing per size: CI time
@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_conformer_sizes_match_the_paper(size):
  lm_runs.parse([f"models/conformer_{size}.gin"], ["VOCAB_SIZE = 1024"])
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transducer(rngs=nnx.Rngs(0)))
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert abs(params / 1e6 / PAPER_PARAMS_M[size] - 1) < 0.05, params


def _tiny_model(predictor="@LstmPredictor"):
  lm_runs.parse(["models/transducer.gin"], TINY + ["VOCAB_SIZE = 11", f"Transducer.predictor = {predictor}"])
  with nnx.use_eager_sharding(False):
    return Transducer(rngs=nnx.Rngs(0))


@pytest.mark.parametrize("predictor", ["@LstmPredictor", "@StatelessPredictor"])
def test_an_utterance_scores_the_same_alone_and_padded_in_a_batch(predictor):
  model = _tiny_model(predictor)
  rng = np.random.default_rng(0)
  audio = rng.normal(scale=0.1, size=(2, 4000)).astype(np.float32)
  audio_paddings = np.zeros_like(audio)
  audio_paddings[1, 2500:] = 1.0
  audio[1, 2500:] = rng.normal(size=1500)  # garbage where padded
  targets = np.array([[3, 4, 5, 6], [7, 2, 0, 0]], np.int32)
  target_paddings = (targets == 0).astype(np.float32)
  batch = dict(audio=audio, audio_paddings=audio_paddings, targets=targets, target_paddings=target_paddings)
  per_example_nll = nnx.jit(lambda m, b: m.per_example_nll(b))
  both = per_example_nll(model, {k: jnp.asarray(v) for k, v in batch.items()})
  alone = per_example_nll(model, {"audio": jnp.asarray(audio[1:, :2500]), "audio_paddings": jnp.zeros((1, 2500)),
                                  "targets": jnp.asarray(targets[1:, :2]), "target_paddings": jnp.zeros((1, 2))})
  assert np.all(np.isfinite(both)) and both[0] > 0
  np.testing.assert_allclose(both[1], alone[0], rtol=2e-5)
  sums = nnx.jit(lambda m, b: m.loss(b))(model, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(sums["weight_sum"]) == 6 and "correct_sum" not in sums
  np.testing.assert_allclose(sums["loss_sum"], both.sum(), rtol=1e-6)


def test_the_ctc_head_adds_its_weighted_loss_and_leaves_the_rnnt_term_alone():
  plain = _tiny_model()
  lm_runs.parse(["models/transducer.gin"], TINY + ["VOCAB_SIZE = 11", "Transducer.ctc_weight = 0.5"])
  with nnx.use_eager_sharding(False):
    hybrid = Transducer(rngs=nnx.Rngs(0))
  assert plain.ctc_head is None and hybrid.ctc_head is not None
  rng = np.random.default_rng(5)
  batch = {"audio": jnp.asarray(rng.normal(scale=0.1, size=(3, 4000)).astype(np.float32)),  # 5 encoder frames
           "audio_paddings": jnp.zeros((3, 4000)).at[1:, 2000:].set(1.0),  # 2 frames
           "targets": jnp.asarray([[3, 3, 5], [6, 0, 0], [4, 4, 0]], jnp.int32),  # the last needs 3 frames
           "target_paddings": jnp.asarray([[0, 0, 0], [0, 1, 1], [0, 0, 1]], jnp.float32)}
  sums = hybrid.loss(batch)
  assert set(plain.loss(batch)) == {"loss_sum", "weight_sum"}
  # The encoder, predictor and joint draw the same initial values: the RNN-T term is the plain model's.
  np.testing.assert_allclose(sums["rnnt_loss_sum"], plain.loss(batch)["loss_sum"], rtol=1e-6)
  np.testing.assert_allclose(sums["loss_sum"], sums["rnnt_loss_sum"] + 0.5 * sums["ctc_loss_sum"], rtol=1e-6)
  encoded, paddings = hybrid.encode(batch["audio"], batch["audio_paddings"])
  logits = np.asarray(hybrid.ctc_head(encoded))
  frames = (paddings <= 0).sum(axis=1)
  assert list(frames) == [5, 2, 2]
  expected = sum(_brute_force_nll(logits[i], int(frames[i]), labels) for i, labels in enumerate([[3, 3, 5], [6]]))
  np.testing.assert_allclose(sums["ctc_loss_sum"], expected, rtol=1e-4)
  grads = nnx.grad(lambda m: m.loss(batch)["loss_sum"])(hybrid)
  assert np.any(np.asarray(grads["ctc_head"]["kernel"].get_value()) != 0)
  lm_runs.parse(["models/transducer.gin"], TINY + ["VOCAB_SIZE = 11", "Transducer.ctc_weight = -0.1"])
  with pytest.raises(ValueError, match="ctc_weight must be >= 0"):
    Transducer(rngs=nnx.Rngs(0))


def test_internal_lm_nll_equals_stepping_the_predictor_with_a_zero_encoder_frame():
  model = _tiny_model()
  rng = np.random.default_rng(int(np.random.default_rng().integers(1000)))
  labels = rng.integers(1, 11, size=(3, 5)).astype(np.int32)
  lengths = np.array([5, 3, 1])
  paddings = (np.arange(5)[None] >= lengths[:, None]).astype(np.float32)
  got = model.internal_lm_nll(jnp.asarray(labels), jnp.asarray(paddings))
  for row in range(3):  # the decoder's own step functions, one label at a time, blank as the start symbol
    state = model.init_decoder_state(1)
    previous, expected = 0, 0.0
    for u in range(lengths[row]):
      out, state = model.decoder_step(state, jnp.asarray([previous], jnp.int32))
      logits = np.asarray(model.joint_logits(jnp.zeros((1, 16)), out))[0].astype(np.float64)
      non_blank = logits[1:] - np.log(np.sum(np.exp(logits[1:])))
      expected -= non_blank[labels[row, u] - 1]
      previous = labels[row, u]
    np.testing.assert_allclose(got[row], expected, rtol=1e-5)


def test_training_agrees_on_one_device_and_a_2x4_mesh_and_the_asr_eval_writes_wer(corpus, tmp_path):
  losses = {}
  for name, mesh in (("one", lm_runs.ONE_DEVICE), ("mesh", lm_runs.FSDP2_TENSOR4)):
    model_dir = str(tmp_path / name)
    lm_runs.parse(["runs/train.gin", "tiny/transducer_synthetic.gin"], _bindings(corpus, model_dir) + mesh)
    train_lib.train(model_dir)
    rows = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
    losses[name] = np.array([rows[s]["loss"] for s in (1, 2, 3)])
    assert "accuracy" not in rows[1] and rows[1]["tokens"] > 0
  assert np.all(np.isfinite(losses["one"]))
  np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=2e-4)

  model_dir = str(tmp_path / "mesh")
  lm_runs.parse(["runs/asr_eval.gin", "tiny/transducer_synthetic.gin"],
                _bindings(corpus, model_dir) + ["asr_eval.beam_size = 2", "asr_eval.max_output_length = 12"])
  payload = eval_lib.run_eval(model_dir)
  base = _result_base(model_dir, "asr_test_beam2_", 3)
  written = json.load(open(base + ".json"))
  assert written == json.loads(json.dumps(payload))
  lines = [json.loads(line) for line in open(base + ".jsonl")]
  references = [json.loads(line)["text"] for line in open(os.path.join(corpus, "test.jsonl"))]
  assert sorted(r["reference"] for r in lines) == sorted(references) == sorted(set(references))
  words = sum(len(r.split()) for r in references)
  assert written["reference_words"] == words and written["utterances"] == len(references)
  errors = written["substitutions"] + written["deletions"] + written["insertions"]
  assert written["wer"] == pytest.approx(errors / words)
  assert 0 <= written["b_wer"] and 0 <= written["u_wer"]


@pytest.mark.slow  # CI time budget; run by make test-all
def test_the_memory_lean_loss_gives_the_plain_loss_and_gradients():
  plain = _tiny_model()
  lm_runs.parse(["models/transducer.gin"], TINY + ["VOCAB_SIZE = 11", "Transducer.loss_frame_chunk = 3"])
  with nnx.use_eager_sharding(False):
    lean = Transducer(rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  audio = rng.normal(scale=0.1, size=(2, 3000)).astype(np.float32)
  batch = {"audio": jnp.asarray(audio), "audio_paddings": jnp.zeros((2, 3000)).at[1, 2000:].set(1.0),
           "targets": jnp.asarray([[3, 4, 5], [6, 0, 0]], jnp.int32),
           "target_paddings": jnp.asarray([[0, 0, 0], [0, 1, 1]], jnp.float32)}
  grad = lambda m: nnx.grad(lambda net: net.loss(batch)["loss_sum"])(m)  # noqa: E731
  np.testing.assert_allclose(lean.per_example_nll(batch), plain.per_example_nll(batch), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grad(lean)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.slow  # CI time budget; run by make test-all
def test_greedy_decoder_is_beam_one():
  model = _tiny_model()
  graphdef, params = nnx.split(model)
  audio = jnp.asarray(np.random.default_rng(1).normal(scale=0.1, size=(3, 6000)), jnp.float32)
  paddings = jnp.zeros_like(audio).at[2, 3000:].set(1.0)
  greedy = asr_lib.make_decoder(graphdef, beam_size=1, max_symbols_per_frame=3, max_output_length=10)
  tokens, lengths = greedy(params, audio, paddings)
  encoder_out, encoder_paddings = model.encode(audio, paddings)
  best = beam_search(TransducerFns.from_model(model), encoder_out, encoder_paddings, beam_size=1,
                     max_symbols_per_frame=3, max_output_length=10, method="one_pass")
  np.testing.assert_array_equal(tokens, best.tokens[:, 0])
  np.testing.assert_array_equal(lengths, best.lengths[:, 0])
  with pytest.raises(ValueError, match="beam_size must be >= 1"):
    asr_lib.make_decoder(graphdef, beam_size=0, max_symbols_per_frame=3, max_output_length=10)


@pytest.mark.slow  # trains 3 steps and decodes twice (about a minute on 2 CPU cores)
def test_the_transducer_experiment_script_trains_evaluates_and_prints_the_wer_table(corpus, tmp_path):
  spec = importlib.util.spec_from_file_location(
      "transducer_run", os.path.join(lm_runs.REPO, "experiments/transducer_synthetic/run.py"))
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  model_dir = str(tmp_path / "model")
  table = experiment.run(corpus, model_dir, [1, 2], _bindings(corpus, model_dir) + ["asr_eval.max_output_length = 12"])
  results = [json.load(open(_result_base(model_dir, f"asr_test_beam{k}_", 3) + ".json")) for k in (1, 2)]
  assert table == experiment.wer_table(results)
  assert open(os.path.join(model_dir, "eval", "wer_table_test.md")).read() == table + "\n"
  lines = table.splitlines()
  assert lines[4].startswith("| greedy ") and lines[5].startswith("| beam 2 (tsd) ")
  assert f"{100 * results[0]['wer']:.1f}%" in lines[4]
