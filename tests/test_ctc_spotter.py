"""CTC phrase spotting against brute force over every window and every CTC path."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm_jax.decoding.ctc_spotter import phrase_gains, spotted_phrases


def collapse(path):
  """CTC's many-to-one map: merge repeats, drop blanks (0)."""
  merged = [label for i, label in enumerate(path) if i == 0 or label != path[i - 1]]
  return tuple(label for label in merged if label != 0)


def brute_force_gain(log_probs: np.ndarray, frames: int, phrase: tuple) -> float:
  """max over windows [s, e] of the valid frames and label paths over it that collapse to the phrase of
  sum (log p_t(path_t) - max_k log p_t(k))."""
  if not phrase:
    return -np.inf
  gains = log_probs - log_probs.max(axis=-1, keepdims=True)
  best = -np.inf
  for start in range(frames):
    for end in range(start, frames):
      for path in itertools.product(range(log_probs.shape[-1]), repeat=end - start + 1):
        if collapse(path) == phrase:
          best = max(best, sum(gains[start + i, label] for i, label in enumerate(path)))
  return best


def padded(phrase_lists, length):
  tokens = np.zeros((len(phrase_lists), max(map(len, phrase_lists)), length), np.int32)
  paddings = np.ones(tokens.shape, np.float32)
  for u, phrases in enumerate(phrase_lists):
    for b, phrase in enumerate(phrases):
      tokens[u, b, :len(phrase)] = phrase
      paddings[u, b, :len(phrase)] = 0.0
  return jnp.asarray(tokens), jnp.asarray(paddings)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gains_equal_brute_force(seed):
  rng = np.random.default_rng(seed)
  vocab, max_frames = 4, 6
  frames = [6, 4]  # the second row padded
  log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, max_frames, vocab)) * 2.0, jnp.float32))
  paddings = jnp.asarray(np.arange(max_frames)[None] >= np.array(frames)[:, None], jnp.float32)
  lists = [[(1,), (2, 3), (3, 3), (1, 2, 1), (2,) * 4, ()],
           [(3, 1), (1, 1, 1), (2, 3, 1), tuple(rng.integers(1, vocab, size=2)), (1, 2, 3, 1, 2), (2,)]]
  tokens, phrase_paddings = padded(lists, length=5)
  got = np.asarray(jax.jit(phrase_gains)(log_probs, paddings, tokens, phrase_paddings))
  for u, phrases in enumerate(lists):
    for b, phrase in enumerate(phrases):
      expected = brute_force_gain(np.asarray(log_probs[u], np.float64), frames[u], tuple(phrase))
      if np.isinf(expected):
        assert np.isneginf(got[u, b]), (u, phrase)
      else:
        np.testing.assert_allclose(got[u, b], expected, atol=1e-5, err_msg=str((u, phrase)))


def test_a_spoken_phrase_fits_where_it_is_said():
  """Hand example: frames spell blank 1 2 blank 3; phrase (1, 2) fits with gain 0, (2, 1) does not."""
  best = [0, 1, 2, 0, 3]
  log_probs = jnp.log(jnp.asarray(np.where(np.eye(4)[best] > 0, 0.7, 0.1), jnp.float32))
  tokens, phrase_paddings = padded([[(1, 2), (2, 1), (3,), (1, 2, 3)]], length=3)
  gains = np.asarray(phrase_gains(log_probs[None], jnp.zeros((1, 5)), tokens, phrase_paddings))[0]
  np.testing.assert_allclose(gains[[0, 2, 3]], 0.0, atol=1e-6)
  assert gains[1] == pytest.approx(np.log(0.1 / 0.7))  # (2, 1): "2" at frame 2, "1" costs one frame


def test_spotted_phrases_by_gain_per_token_with_threshold():
  gains = jnp.asarray([[-1.0, -0.5, -6.0, -np.inf], [-0.1, -3.0, 0.0, -2.0]], jnp.float32)
  tokens, phrase_paddings = padded([[(1, 2), (1,), (1, 2, 3), (1,)], [(1,), (1, 2, 3), (2,), (2, 2)]], length=3)
  # Per token: row 0: -0.5, -0.5, -2, -inf; row 1: -0.1, -1, 0, -1.
  got = np.asarray(spotted_phrases(gains, phrase_paddings, top_k=3, threshold=1.0))
  assert sorted(got[0][:2]) == [0, 1] and got[0][2] == -1
  assert got[1][0] == 2 and got[1][1] == 0 and got[1][2] in (1, 3)
  assert np.asarray(spotted_phrases(gains, phrase_paddings, top_k=6, threshold=0.0))[1].tolist() == [2, -1, -1, -1,
                                                                                                    -1, -1]
  with pytest.raises(ValueError, match="top_k >= 1 and threshold >= 0"):
    spotted_phrases(gains, phrase_paddings, top_k=0, threshold=1.0)
  with pytest.raises(ValueError, match="phrase_tokens and phrase_paddings"):
    phrase_gains(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3)), tokens, phrase_paddings)
