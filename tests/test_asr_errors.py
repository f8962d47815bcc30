"""scripts/asr_errors.py: a wrong hypothesis is a model error when the model prefers it to the reference."""

import numpy as np
import pytest

from scripts import asr_errors


def test_summary_counts_model_and_search_errors_on_a_hand_example():
  references = ["call bob", "play jazz", "stop", "call ann now"]
  hypotheses = ["call bob", "play chess", "stop it", "call  ann now"]  # right, wrong, wrong, right (spacing)
  reference_nll = np.array([1.0, 5.0, 2.0, 3.0])
  hypothesis_nll = np.array([1.0, 4.0, 2.5, 3.0])  # "play chess" is preferred: a model error
  summary = asr_errors.summarize(references, hypotheses, reference_nll, hypothesis_nll, np.array([2, 2, 1, 3]))
  assert summary["wrong hypotheses"] == 2
  assert summary["wrong and more likely than the reference (model errors)"] == 1
  assert summary["wrong and less likely (search errors)"] == 1
  assert summary["reference NLL per label"] == pytest.approx(11.0 / 8)
