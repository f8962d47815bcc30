"""experiments/infini_lm (paper Table 2) and experiments/infini_booksum (paper Table 4): the paper configs parse
with the paper's settings, the tables print ours beside the paper's rows, and (slow) each run.py runs end to end."""

import importlib.util
import os

import gin
import pytest

from tests import lm_runs


def _module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(os.path.dirname(path)), os.path.join(lm_runs.REPO,
                                                                                                      path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_table2_paper_config_has_the_papers_settings():
  lm_runs.parse(["runs/train.gin", "experiments/infini_lm/pg19_paper.gin"], ["MODEL_DIR = '/tmp/unused'"])
  sizes = {name: gin.query_parameter(f"InfiniTransformerLM.{name}") for name in
           ("num_layers", "num_heads", "head_dim", "mlp_dim", "segment_length", "vocab_size")}
  assert sizes == {"num_layers": 12, "num_heads": 8, "head_dim": 128, "mlp_dim": 4096, "segment_length": 2048,
                   "vocab_size": 32000}
  assert gin.query_parameter("%SEQUENCE_LENGTH") == 32768  # 16 segments a step, the paper's 32K inputs
  assert gin.query_parameter("train/DatasetConfig.feature_converter") == "long_document"
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME").selector == "pg19_task"


def test_the_table4_paper_config_cuts_training_inputs_to_fit_and_nothing_else():
  lm_runs.parse(["runs/train.gin", "experiments/infini_booksum/paper_8b.gin"], ["MODEL_DIR = '/tmp/unused'"])
  assert gin.query_parameter("train/DatasetConfig.feature_converter") == "prefix_lm"
  limit = gin.query_parameter("booksum_task.input_tokens_limit")
  assert limit == gin.query_parameter("%SEQUENCE_LENGTH") - gin.query_parameter("%TARGETS_LENGTH")
  assert gin.query_parameter("InfiniTransformerLM.segment_length") == 2048


def test_the_tables_print_ours_beside_the_papers_rows():
  lm = _module("experiments/infini_lm/run.py")
  overall = lambda word: {"overall": {"token_perplexity": 3.0, "word_perplexity": word,  # noqa: E731
                                      "num_documents": 20}}
  text = lm.table({"delta": overall(6.0), "no_memory": overall(8.0)})
  assert "| Infini (linear + delta) | 3.000 | 6.000 | -25.0% |" in text
  assert "| Infini-Transformer (Linear + Delta) | 9.67 |" in text and "| Transformer-XL | 11.88 |" in text
  booksum = _module("experiments/infini_booksum/run.py")
  scores = {"rouge1": 30.0, "rouge2": 5.0, "rougeL": 20.0, "rougeLsum": 21.0, "overall": 15.0, "examples": 40}
  text = booksum.table({"delta": scores})
  assert "| Infini (linear + delta) | 30.0 | 5.0 | 20.0 | 15.0 |" in text
  assert "| Infini-Transformers (Linear + Delta) | 40.0 | 8.8 | 17.9 | 18.5 |" in text


@pytest.mark.parametrize("path", ["experiments/infini_lm/run.py", "experiments/infini_booksum/run.py"])
def test_bad_flags_are_refused_before_any_work(tmp_path, path, capsys):
  module = _module(path)
  assert module.main(["--variants=delta,nonsense", f"--out_dir={tmp_path}/out", f"--data_dir={tmp_path}/data"]) == 1
  assert "unknown variant 'nonsense'" in capsys.readouterr().err
  assert module.main(["--train_steps=0", f"--out_dir={tmp_path}/out", f"--data_dir={tmp_path}/data"]) == 1
  assert not os.path.exists(tmp_path / "data")


@pytest.mark.slow
@pytest.mark.parametrize("path,variants", [("experiments/infini_lm/run.py", "delta,dense"),
                                           ("experiments/infini_booksum/run.py", "no_memory")])
def test_each_experiment_runs_to_its_table(tmp_path, path, variants, capsys):
  module = _module(path)
  argv = [f"--variants={variants}", "--train_steps=4", "--binding=warmup_cosine_schedule.warmup_steps = 1",
          f"--out_dir={tmp_path}/out", f"--data_dir={tmp_path}/data"]
  assert module.main(argv) == 0
  printed = capsys.readouterr().out
  assert os.path.isfile(tmp_path / "out" / "table.md") and "| paper model |" in printed
  assert module.main(argv) == 0  # a rerun reuses the corpus, the models and the evals


def test_fact_accuracy_counts_the_reference_pairs_a_summary_states():
  booksum = _module("experiments/infini_booksum/run.py")
  generations = [{"references": ["The story follows A, the potter from X; B, the sailor from Y; and C, the miller "
                                 "from Z."],
                  "prediction": "The story follows Q, the sailor from Y; R, the potter from Z; and S, the smith from W."}]
  # Pairs: (sailor, Y) only; roles: potter and sailor of the three; towns: Y and Z of the three.
  assert booksum.fact_accuracy(generations) == pytest.approx({"pairs_right": 1 / 3, "roles_right": 2 / 3,
                                                              "towns_right": 2 / 3})
