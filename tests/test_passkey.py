"""Passkey task format, determinism, seqio task, eval scoring with stub models, a training smoke test."""

import dataclasses
import json
import os

import numpy as np
import pytest

from memlm_jax.data import pipeline, passkey
from memlm_jax.data.vocabularies import byte_vocabulary
from memlm_jax.evaluation.passkey import bucket_depths, evaluate_passkey
from memlm_jax.launch import eval_lib
from memlm_jax.launch import train_lib as train
from memlm_jax.runtime.summaries import read_jsonl
from tests import lm_runs

VOCAB = byte_vocabulary()


def _text(tokens):
  return VOCAB.decode([int(t) for t in tokens])


@pytest.mark.parametrize("length,depth", [(300, 0.0), (777, 0.5), (2048, 0.9), (4096, 1.0)])
def test_prompt_has_the_exact_length_the_papers_text_and_the_needle_at_its_depth(length, depth):
  builder = passkey.PasskeyBuilder(VOCAB)
  example = builder.build(length, depth, key=48213)
  assert len(example.inputs) == length
  text = _text(example.inputs)
  assert text.startswith(passkey.INSTRUCTION + " The grass is green.") or depth == 0.0
  assert text.endswith(" What is the pass key? The pass key is")
  needle = " The pass key is 48213. Remember it. 48213 is the pass key."
  assert text.count(needle) == 1 and text.count("48213") == 2
  assert _text(example.targets) == " 48213"
  # The needle starts where the depth says, up to one filler sentence, on a sentence boundary.
  filler_length = length - len(builder.instruction) - len(builder.needle(48213)) - len(builder.question)
  at = example.needle_start - len(builder.instruction)
  assert abs(at - depth * filler_length) <= max(len(" " + s) for s in passkey.FILLER_SENTENCES)
  assert _text(example.inputs[example.needle_start:]).startswith(needle)
  before = text[:text.index(needle)]
  assert before.endswith(".") or before == passkey.INSTRUCTION
  # Everything else is the instruction and whole-sentence filler (cut only at the very end).
  haystack = (text[len(passkey.INSTRUCTION):text.index(" What is the pass key?")]).replace(needle, "")
  cycle = "".join(" " + s for s in passkey.FILLER_SENTENCES)
  assert (cycle * (len(haystack) // len(cycle) + 1)).startswith(haystack)


def test_examples_are_deterministic_and_splits_draw_different_keys():
  builder = passkey.PasskeyBuilder(VOCAB, key_min=100, key_max=999)
  a = builder.sample(600, seed=3, index=5)
  b = builder.sample(600, seed=3, index=5)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert 100 <= a.key <= 999 and _text(a.targets) == f" {a.key}"
  train_keys = [builder.sample(400, passkey.SPLIT_SEEDS["train"], i).key for i in range(50)]
  eval_keys = [builder.sample(400, passkey.EVAL_SEED, i).key for i in range(50)]
  assert train_keys != eval_keys


def test_a_million_token_prompt_is_built_fast():
  import time
  builder = passkey.PasskeyBuilder(VOCAB)
  start = time.perf_counter()
  example = builder.build(1 << 20, 0.37, 12345)
  assert time.perf_counter() - start < 1.0
  assert len(example.inputs) == 1 << 20 and example.inputs.dtype == np.int32


def test_bad_lengths_depths_and_keys_are_refused():
  builder = passkey.PasskeyBuilder(VOCAB)
  with pytest.raises(ValueError, match="shorter than the prompt without filler"):
    builder.build(100, 0.5, 12345)
  with pytest.raises(ValueError, match="depth must be in"):
    builder.build(1000, 1.5, 12345)
  with pytest.raises(ValueError, match="outside the configured range"):
    builder.build(1000, 0.5, 7)
  with pytest.raises(ValueError, match="shorter than the shortest prompt"):
    passkey.passkey_task(name="too_short", lengths=[50])


def test_seqio_task_trains_on_the_answer_only():
  name = passkey.passkey_task(name="passkey_test", lengths=[300, 400])
  config = pipeline.DatasetConfig(mixture_or_task_name=name, sequence_length=512, batch_size=4, pack=False,
                                    feature_converter="prefix_lm", targets_length=8, shuffle=False)
  batch = next(iter(pipeline.get_dataset(config).as_numpy_iterator()))
  for row in range(4):
    targets, weights = batch["decoder_target_tokens"][row], batch["decoder_loss_weights"][row]
    prompt_length = int((targets != 0).sum()) - 6
    assert prompt_length in (300, 400)
    text = _text(targets[:prompt_length])
    assert _text(targets[weights > 0]) == " " + text.split("The pass key is ")[1][:5]
    np.testing.assert_array_equal(batch["decoder_input_tokens"][row, 1:], targets[:-1])
  everywhere = dataclasses.replace(config, loss_on_targets_only=False)
  batch = next(iter(pipeline.get_dataset(everywhere).as_numpy_iterator()))
  np.testing.assert_array_equal(batch["decoder_loss_weights"] > 0, batch["decoder_target_tokens"] != 0)


def _stub(builder, wrong_digits=0):
  """A 'model' that reads the key out of the prompt text (optionally corrupting digits)."""
  def continue_fn(prompts, num_tokens):
    out = np.zeros((len(prompts), num_tokens), np.int32)
    for i, prompt in enumerate(prompts):
      key = _text(prompt).split("The pass key is ")[1][:5]
      key = key[:5 - wrong_digits] + "0" * wrong_digits
      answer = builder.answer(int(key)) if wrong_digits == 0 else np.asarray(VOCAB.encode(" " + key))
      out[i, :len(answer)] = answer
    return out
  return continue_fn


def test_eval_scores_a_right_stub_100_a_wrong_stub_0_and_reports_lengths_it_cannot_hold():
  builder = passkey.PasskeyBuilder(VOCAB)
  right = evaluate_passkey(_stub(builder), builder, [400, 700], examples_per_bucket=2, seed=9)
  assert [s["exact_match"] for s in right["summary"]] == [1.0] * 6
  assert {r["bucket"] for r in right["results"]} == {"start", "middle", "end"}
  wrong = evaluate_passkey(_stub(builder, wrong_digits=2), builder, [400, 5000], examples_per_bucket=1, seed=9,
                           max_context=1000)
  ok = [s for s in wrong["summary"] if s["status"] == "ok"]
  assert [s["exact_match"] for s in ok] == [0.0] * 3
  for s in ok:  # 3 of 5 digits right (unless the key already ended in zeros)
    assert 0.6 <= s["token_accuracy"] < 1.0
  assert [s["status"] for s in wrong["summary"] if s["length"] == 5000] == ["exceeds_context"] * 3


def test_bucket_depths_fall_in_their_buckets():
  depths = bucket_depths(3)
  assert [passkey.depth_bucket(d) for d in depths] == ["start"] * 3 + ["middle"] * 3 + ["end"] * 3


@pytest.mark.parametrize("recipe", ["tiny/infini_passkey.gin",
                                    pytest.param("tiny/dense_passkey.gin", marks=pytest.mark.slow)])
def test_training_smoke_and_the_eval_launcher_at_a_small_length(tmp_path, recipe):
  model_dir = str(tmp_path / "run")
  bindings = [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 4", "BATCH_SIZE = 2", "SEQUENCE_LENGTH = 512",
              "make_mesh.num_devices = 2",
              "passkey_task.lengths = [300, 500]", "InfiniTransformerLM.segment_length = 32",
              "passkey_task.key_min = 10000", "passkey_task.key_max = 99999",
              "train/DatasetConfig.targets_length = 8",
              "Checkpointer.save_interval_steps = 4", "train.log_every_steps = 1",
              "warmup_cosine_schedule.warmup_steps = 1"]
  lm_runs.parse(["runs/train.gin", recipe], bindings)
  train.train(model_dir)
  rows = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows.values())
  assert rows[1]["tokens"] == 2 * 6  # the loss is on the answer (" NNNNN") only
  lm_runs.parse(["runs/passkey_eval.gin", recipe],
                bindings + ["PASSKEY_LENGTHS = [400, 1100]", "passkey_eval.examples_per_bucket = 1",
                            "passkey_eval.max_context = 1000"])
  payload = eval_lib.run_eval(model_dir)
  [name] = [n for n in os.listdir(os.path.join(model_dir, "eval")) if n.startswith("passkey_")]
  assert name.endswith("_step4.json"), name
  written = json.load(open(os.path.join(model_dir, "eval", name)))
  assert written == json.loads(json.dumps(payload))
  assert written["complete"] and written["settings"]["lengths"] == [400, 1100]
  assert [s["status"] for s in written["summary"]] == ["ok"] * 3 + ["exceeds_context"] * 3
  assert "up to 1000 tokens" in written["summary"][-1]["reason"]
  assert written["model"] == ("dense" if "dense" in recipe else "Infini (delta)")
  assert len(written["results"]) == 3 and all(len(r["predicted"]) > 0 for r in written["results"])


def test_the_papers_1b_passkey_config_parses():
  import gin
  lm_runs.parse(["runs/train.gin", "experiments/infini_passkey/paper_1b_finetune.gin"],
                ["SPM_MODEL = '/nonexistent/spm.model'", "MODEL_DIR = '/tmp/unused'"])
  assert gin.query_parameter("InfiniTransformerLM.segment_length") == 2048
  assert gin.query_parameter("passkey_task.lengths") == [5112]
  assert gin.query_parameter("warmup_cosine_schedule.peak_value") == 1e-4
  assert str(gin.query_parameter("train.init_from")) == "%INIT_FROM"  # the warm start is wired


def test_a_prompt_longer_than_the_sequence_allows_is_an_error_not_a_silent_cut():
  import tensorflow as tf
  name = passkey.passkey_task(name="passkey_too_long", lengths=[600])
  config = pipeline.DatasetConfig(mixture_or_task_name=name, sequence_length=512, batch_size=2, pack=False,
                                    feature_converter="prefix_lm", targets_length=8, shuffle=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match="inputs"):
    next(iter(pipeline.get_dataset(config).as_numpy_iterator()))


# ----------------------------------------------------------------------------------------------------------------
# The recipe's vocabulary and the long-haystack write weights.


def test_the_shipped_passkey_vocabulary_is_what_train_spm_builds_and_reads_keys_digit_by_digit(tmp_path):
  import sentencepiece
  from memlm_jax.data.vocabularies import PASSKEY_BPE_MODEL, passkey_vocabulary
  from scripts import train_spm
  rebuilt = train_spm.train_spm(None, str(tmp_path / "passkey_bpe"), 160, "bpe", lowercase=False, split_digits=True,
                                passkey_count=2000)
  pieces = lambda path: [p.piece for p in _model_proto(path).pieces]  # noqa: E731
  assert pieces(rebuilt) == pieces(PASSKEY_BPE_MODEL)
  vocab = passkey_vocabulary()
  builder = passkey.PasskeyBuilder(vocab)
  assert [vocab.decode([t]) for t in builder.answer(55757)][-5:] == list("55757")
  example = builder.build(2048, 0.3, 48213)
  assert len(example.inputs) == 2048 and "The pass key is 48213. Remember it." in vocab.decode(example.inputs.tolist())
  assert max(example.inputs) < 160 and sentencepiece.__version__


def _model_proto(path):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def test_haystack_write_weights_by_hand():
  """Segments of 4 in the decoder layout [BOS, inputs..., targets[:-1]]: only all-filler ones get r."""
  example = passkey.PasskeyExample(inputs=np.arange(1, 15, dtype=np.int32), targets=np.array([7, 8, 9], np.int32),
                                   key=0, depth=0.0, needle_start=8, needle_length=2, filler_start=2, filler_end=12)
  # input index:  0 1 | 2..7 filler | 8 9 needle | 10 11 filler | 12 13 question; targets 3 -> 2 positions
  # decoder pos:  BOS=0, input i at i+1: filler at positions 3..8 and 11..12
  weights = passkey.haystack_write_weights(example, 50.0, segment_length=4)
  assert weights.shape == (17,) and weights.dtype == np.float32
  want = np.ones(17, np.float32)
  want[4:8] = 50.0  # positions 4..7 = inputs 3..6, all filler; [0, 4) holds BOS and the instruction
  np.testing.assert_array_equal(weights, want)
  np.testing.assert_array_equal(passkey.haystack_write_weights(example, 50.0, segment_length=2)[[2, 3, 4, 5, 6, 7]],
                                [1, 1, 50, 50, 50, 50])  # [2, 4) starts with the instruction; [8, 10) the needle


def test_the_long_haystack_task_weights_only_filler_segments_in_the_models_batch():
  vocab = byte_vocabulary()
  name = passkey.passkey_task(name="passkey_weighted", lengths=[300, 480], long_haystack_probability=0.5,
                              long_haystack_weights=(2.0, 1e4), segment_length=32)
  config = pipeline.DatasetConfig(mixture_or_task_name=name, sequence_length=512, batch_size=8, pack=False,
                                    feature_converter="prefix_lm", targets_length=8, shuffle=False,
                                    passthrough_features=("memory_write_weights",))
  batches = pipeline.get_dataset(config).as_numpy_iterator()
  drawn = []
  for _ in range(6):
    batch = next(batches)
    weights, inputs = batch["memory_write_weights"], batch["decoder_input_tokens"]
    assert weights.shape == inputs.shape and weights.dtype == np.float32
    for row in range(8):
      real = batch["decoder_target_tokens"][row] != 0
      np.testing.assert_array_equal(weights[row][~real], 0.0)  # padding carries no weight
      heavy = weights[row] != 1.0
      heavy &= real
      drawn.append(float(weights[row][heavy][0]) if heavy.any() else 1.0)
      for start in np.flatnonzero(heavy)[::32]:
        assert start % 32 == 0 and heavy[start:start + 32].all()
        text = vocab.decode(inputs[row, start:start + 32].tolist())
        assert "pass key" not in text and "important" not in text and "What" not in text, text
  assert any(w != 1.0 for w in drawn)
  # The draw itself, on a prompt long enough to always hold filler-only segments:
  augmentation = passkey.LongHaystack(probability=0.5, weight_min=2.0, weight_max=1e4, segment_length=32)
  example = passkey.PasskeyBuilder(vocab).build(2048, 0.5, 12345)
  weights = [float(augmentation.weights(example, seed=3, index=i).max()) for i in range(400)]
  weighted = [w for w in weights if w != 1.0]
  assert 0.4 < len(weighted) / len(weights) < 0.6 and all(2.0 <= w <= 1e4 for w in weighted)
  logs = np.log10(weighted)  # log-uniform over [log10 2, 4]: each half of that range gets about half
  assert 0.35 < np.mean(logs < (np.log10(2.0) + 4) / 2) < 0.65


def test_long_haystack_and_passthrough_settings_are_checked_before_reading_data():
  with pytest.raises(ValueError, match="segment_length must be a positive int"):
    passkey.passkey_task(name="passkey_no_segment", lengths=[300], long_haystack_probability=0.5)
  with pytest.raises(ValueError, match=r"long_haystack_probability must be in \[0, 1\]"):
    passkey.passkey_task(name="passkey_bad_p", lengths=[300], long_haystack_probability=2.0, segment_length=32)
  name = passkey.passkey_task(name="passkey_plain", lengths=[300])
  config = pipeline.DatasetConfig(mixture_or_task_name=name, sequence_length=512, batch_size=2, pack=False,
                                    feature_converter="prefix_lm", passthrough_features=("memory_write_weights",))
  with pytest.raises(ValueError, match="has no feature 'memory_write_weights'"):
    pipeline.get_dataset(config)
  with pytest.raises(ValueError, match="needs pack=False"):
    pipeline.get_dataset(dataclasses.replace(config, pack=True))


@pytest.mark.slow  # three short trainings and two evals
def test_the_experiment_script_trains_both_stages_shares_stage_1_and_prints_the_table(tmp_path):
  import subprocess
  import sys
  out = str(tmp_path / "exp")
  argv = [sys.executable, "experiments/infini_passkey/run.py", "--variants=recipe,no_augmentation", "--seeds=0",
          "--lengths=400", "--examples_per_bucket=1", f"--output_dir={out}", "--binding=TRAIN_STEPS = 2",
          "--binding=warmup_cosine_schedule.warmup_steps = 1"]
  result = subprocess.run(argv, cwd=lm_runs.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(os.path.join(out, "recipe_seed0", "stage1"))
  assert not os.path.exists(os.path.join(out, "no_augmentation_seed0", "stage1"))  # shares the recipe's
  for variant in ("recipe", "no_augmentation"):
    assert os.path.isdir(os.path.join(out, f"{variant}_seed0", "stage2", "checkpoints", "2"))
    assert json.load(open(os.path.join(out, f"{variant}_seed0", "passkey.json")))["lengths"] == [400]
  rows = [line.split("|")[1:-1] for line in open(os.path.join(out, "table.md")) if line.startswith("|")]
  cells = {row[0].strip(): [c.strip() for c in row[1:]] for row in rows}
  assert cells["Variant"] == ["Seed", "400"] and cells["recipe"][0] == cells["no_augmentation"][0] == "0"
  assert all(0 <= int(cells[v][1]) <= 100 for v in ("recipe", "no_augmentation"))
