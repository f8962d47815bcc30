"""CTC phrase spotting against brute force over every window and every CTC path."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm_jax.decoding.ctc_spotter import replace_spotted_words
from memlm_jax.losses.ctc_spotting import phrase_gains, phrase_spots, spotted_phrases


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
  # An empty phrase (gain -inf) is never spotted, even with no threshold at all.
  assert np.asarray(spotted_phrases(gains, phrase_paddings, top_k=4, threshold=np.inf))[0].tolist()[3] == -1
  assert sorted(got[0][:2]) == [0, 1] and got[0][2] == -1
  assert got[1][0] == 2 and got[1][1] == 0 and got[1][2] in (1, 3)
  assert np.asarray(spotted_phrases(gains, phrase_paddings, top_k=6, threshold=0.0))[1].tolist() == [2, -1, -1, -1,
                                                                                                    -1, -1]
  with pytest.raises(ValueError, match="top_k >= 1 and threshold >= 0"):
    spotted_phrases(gains, phrase_paddings, top_k=0, threshold=1.0)
  with pytest.raises(ValueError, match="phrase_tokens and phrase_paddings"):
    phrase_gains(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3)), tokens, phrase_paddings)


def test_the_window_attains_the_gain():
  rng = np.random.default_rng(7)
  log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(1, 6, 4)) * 2.0, jnp.float32))
  lists = [[(1,), (2, 3), (3, 1, 3), (2, 2)]]
  tokens, phrase_paddings = padded(lists, length=3)
  spots = phrase_spots(log_probs, jnp.zeros((1, 6)), tokens, phrase_paddings)
  for b, phrase in enumerate(lists[0]):
    start, end = int(spots.start[0, b]), int(spots.end[0, b])
    assert 0 <= start <= end < 6
    window = np.asarray(log_probs[0, start:end + 1], np.float64)
    np.testing.assert_allclose(brute_force_gain(window, end - start + 1, phrase), spots.gain[0, b], atol=1e-5)
    np.testing.assert_allclose(brute_force_gain(np.asarray(log_probs[0], np.float64), 6, phrase), spots.gain[0, b],
                               atol=1e-5)


def test_replacing_the_words_inside_the_window():
  # Words (a token starting a word is marked): [1 2] [3] [4 5] [6]; emitted at frames 0 1 | 3 | 5 6 | 9.
  starts_word = np.array([False, True, False, True, True, False, True, False])
  tokens, frames = [1, 2, 3, 4, 5, 6], [0, 1, 3, 5, 6, 9]
  # The window 4..5 touches the third word only ("4 5" emitted at 5 and 6): it is replaced whole.
  assert replace_spotted_words(tokens, frames, [7, 7], 4, 5, starts_word) == ([1, 2, 3, 7, 7, 6], [0, 1, 3, 4, 4, 9])
  # With a margin of 1 the window 2..4 reaches frames 1..5: every word but the last.
  assert replace_spotted_words(tokens, frames, [7], 2, 4, starts_word, margin=1)[0] == [7, 6]
  # No word inside 7..8: the phrase goes in before the first word emitted after 8.
  assert replace_spotted_words(tokens, frames, [7], 7, 8, starts_word) == ([1, 2, 3, 4, 5, 7, 6],
                                                                          [0, 1, 3, 5, 6, 7, 9])
  assert replace_spotted_words([], [], [7], 2, 3, starts_word) == ([7], [2])
  # A word emitted across the window ("4 5" at frames 2 and 8; the window 4..6 holds none of its labels)
  # counts as inside, so the frames stay in order.
  assert replace_spotted_words([4, 5, 6], [2, 8, 9], [7], 4, 6, starts_word) == ([7, 6], [4, 9])
  # A one-word phrase over three words ([1 2] [3] [4 5]): allowed with 2 extra words, refused with 1.
  assert replace_spotted_words(tokens, frames, [7], 0, 5, starts_word, max_extra_words=2)[0] == [7, 6]
  assert replace_spotted_words(tokens, frames, [7], 0, 5, starts_word, max_extra_words=1) is None
  # A two-word phrase (label 6 starts a word) over the same three words: allowed with 1.
  assert replace_spotted_words(tokens, frames, [6, 6], 0, 5, starts_word, max_extra_words=1)[0] == [6, 6, 6]
