"""A slip in a flag, a setting or an input file stops with one line naming the value, before any
checkpoint is read or any result is written; passkey results are kept per setting and per length."""

import json
import os

import numpy as np
import pytest

from memlm_jax import gin_utils
from memlm_jax.data import passkey
from memlm_jax.data.pipeline import DatasetConfig
from memlm_jax.data.vocabularies import byte_vocabulary
from memlm_jax.evaluation.passkey import evaluate_passkey
from memlm_jax.launch import eval_lib, infer_lib, passkey_lib
from tests import lm_runs


@pytest.mark.parametrize("binding, message", [
    ("TransformerLM.num_layers = [3", "--gin.TransformerLM.num_layers=[3: unbalanced brackets"),
    ("MODEL_DIR = runs/x", """--gin.MODEL_DIR=runs/x: 'runs/x' is not a gin value; a string needs quotes inside the """
                           """shell's: --gin.MODEL_DIR="'runs/x'\""""),
    ("BATCH_SIZE = 8.5.1", "--gin.BATCH_SIZE=8.5.1: Expected newline"),
])
def test_a_gin_flag_slip_is_one_line_naming_the_flag(binding, message):
  with pytest.raises(gin_utils.GinConfigError) as error:
    gin_utils.parse_gin(["runs/train.gin", "tiny/lm_demo.gin"], [binding], lm_runs.SEARCH_PATHS)
  assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("batch_size", [0, 8.5, -2, True])
def test_a_bad_batch_size_names_the_macro(batch_size):
  with pytest.raises(ValueError, match=rf"DatasetConfig.batch_size \(BATCH_SIZE / EVAL_BATCH_SIZE\) must be a positive "
                                       rf"integer, got {batch_size!r}"):
    DatasetConfig(mixture_or_task_name="synthetic_text", sequence_length=32, batch_size=batch_size)


@pytest.mark.parametrize("setting, message", [
    ({"lengths": [1000, 2000, 50]}, r"length 50 is shorter than the prompt without filler"),
    ({"lengths": [1000, 1500.5]}, r"must be an integer number of tokens, got 1500.5"),
    ({"lengths": []}, r"must be a non-empty list"),
    ({"key_max": 10**30}, r"key_max <= 9223372036854775806"),
    ({"key_min": 5.5}, r"key_min must be an integer, got 5.5"),
    ({"examples_per_bucket": 0}, r"examples_per_bucket must be a positive integer, got 0"),
    ({"max_context": 0}, r"max_context must be None or a positive integer"),
])
def test_every_passkey_setting_is_checked_before_the_checkpoint_is_read(tmp_path, setting, message):
  def no_model(**kwargs):
    raise AssertionError("the model was built before the settings were checked")

  kwargs = {"model": no_model, "vocabulary": byte_vocabulary(), "lengths": [1000, 2000], **setting}
  with pytest.raises(ValueError, match=message):  # the directory has no checkpoint: a late check would say so
    passkey_lib.passkey_eval(str(tmp_path / "no_checkpoints"), **kwargs)
  assert not os.path.exists(tmp_path / "no_checkpoints")


def test_passkey_results_are_handed_over_after_every_length():
  builder = passkey.PasskeyBuilder(byte_vocabulary())
  handed = []

  def continue_fn(prompts, num_tokens):
    if prompts.shape[1] == 900:
      raise RuntimeError("killed at the second length")
    return np.zeros((prompts.shape[0], num_tokens), np.int32)

  with pytest.raises(RuntimeError, match="killed"):
    evaluate_passkey(continue_fn, builder, [600, 900], examples_per_bucket=1,
                     on_length=lambda partial: handed.append(json.loads(json.dumps(partial))))
  assert len(handed) == 1 and {s["length"] for s in handed[0]["summary"]} == {600}
  assert len(handed[0]["results"]) == 3


def test_result_names_differ_by_setting_and_directories_are_checked_for_writing(tmp_path):
  one = eval_lib.settings_name("passkey", {"lengths": [2048], "seed": 2}, 100)
  assert one == eval_lib.settings_name("passkey", {"seed": 2, "lengths": [2048]}, 100)
  assert one != eval_lib.settings_name("passkey", {"lengths": [2048, 1048576], "seed": 2}, 100)
  assert one.startswith("passkey_") and one.endswith("_step100")
  (tmp_path / "eval").write_text("a file where the results directory should be")
  with pytest.raises(OSError, match=rf"cannot write results to {tmp_path / 'eval'}"):
    eval_lib.check_writable(str(tmp_path), "eval")


def test_infer_refuses_a_zero_decode_length_and_names_a_bad_jsonl_line(tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "one"}\n{"prompt": "two"\n')
  with pytest.raises(ValueError, match=r"prompts.jsonl:2 is not valid JSON"):
    infer_lib.read_prompts(str(prompts))

  def no_model(**kwargs):
    raise AssertionError("the model was built before the settings were checked")

  with pytest.raises(ValueError, match=r"infer.max_decode_length must be a positive integer, got 0"):
    infer_lib.infer(str(tmp_path / "run"), model=no_model, vocabulary=byte_vocabulary(), input_file=str(prompts),
                    max_decode_length=0)
  tokens, lengths = infer_lib.encode_prompts(["a" * 300, "bc"], byte_vocabulary(), None)
  assert tokens.shape == (2, 300) and lengths.tolist() == [300, 2]  # no 64-token default cuts a long prompt
