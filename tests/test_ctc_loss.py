"""The CTC head's loss (losses/ctc.py) against a brute-force sum over every frame-level path, and the
rows too short for any alignment."""

import itertools

import jax
import numpy as np
import pytest

from memlm_jax.losses import ctc


def _brute_force_nll(logits: np.ndarray, frames: int, labels: list[int], blank: int = 0) -> float:
  """-log of the summed probability of every path over the first `frames` frames that collapses
  (merge repeats, drop blanks) to `labels`."""
  log_p = np.asarray(jax.nn.log_softmax(logits[:frames].astype(np.float64), axis=-1))
  total = 0.0
  for path in itertools.product(range(logits.shape[-1]), repeat=frames):
    collapsed = [s for i, s in enumerate(path) if s != blank and (i == 0 or s != path[i - 1])]
    if collapsed == labels:
      total += np.exp(sum(log_p[t, s] for t, s in enumerate(path)))
  return -np.log(total)


def test_frames_needed_counts_a_blank_between_equal_neighbours():
  labels = np.array([[3, 3, 4, 4, 4], [5, 6, 5, 0, 0], [2, 2, 0, 0, 0]], np.int32)
  paddings = (labels == 0).astype(np.float32)
  np.testing.assert_array_equal(ctc.frames_needed(labels, paddings), [8, 3, 3])


@pytest.mark.parametrize("seed", [0, 1])
def test_ctc_loss_is_the_sum_over_every_path(seed):
  rng = np.random.default_rng(seed)
  vocab, frames = 4, 6
  logits = rng.normal(size=(4, frames, vocab)).astype(np.float32) * 2
  rows = [([1, 2, 1], 6), ([3, 3], 5), ([2], 4), ([1, 1, 1], 4)]  # (labels, valid frames); the last has none
  labels = np.zeros((4, 3), np.int32)
  label_paddings = np.ones((4, 3), np.float32)
  logit_paddings = np.ones((4, frames), np.float32)
  for i, (row, valid) in enumerate(rows):
    labels[i, :len(row)], label_paddings[i, :len(row)] = row, 0.0
    logit_paddings[i, :valid] = 0.0
  logits[1, 5:] = rng.normal(size=vocab) * 50  # garbage on a padded frame changes nothing

  nll = ctc.ctc_loss(logits, logit_paddings, labels, label_paddings, blank_id=0)
  np.testing.assert_array_equal(ctc.frames_needed(labels, label_paddings), [3, 3, 1, 5])
  for i, (row, valid) in enumerate(rows[:3]):
    np.testing.assert_allclose(nll[i], _brute_force_nll(logits[i], valid, row), rtol=1e-5)
  assert float(nll[3]) == 0.0  # no alignment: left out, not a huge stand-in for log(0)
  grad = jax.grad(lambda x: ctc.ctc_loss(x, logit_paddings, labels, label_paddings).sum())(logits)
  assert np.all(np.isfinite(grad)) and not np.any(grad[3])
