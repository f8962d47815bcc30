"""Independent references for the phrase boosters (decoding/kmp.py, decoding/aho_corasick.py): the
bonuses straight from the scoring rules by string comparison, random phrase lists, and tiny
transducers whose beam search the boosters are fused into."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memlm_jax.decoding.transducer_beam import TransducerFns, beam_search

VOCAB = 5  # blank + labels 1..4

# Naive reference: match lengths by string comparison on the output since the last reset.


def longest_matches(phrases, history):
  """For each phrase P: the longest k <= len(P) with P[:k] == the last k tokens of history."""
  return [max(k for k in range(min(len(p), len(history)) + 1) if tuple(history[len(history) - k:]) == tuple(p[:k]))
          for p in phrases]


def naive_bonuses(phrases, tokens, delta, weights=None, prefixes=(), multiplier=1.0):
  """Bonus of every token and the final correction, straight from the module docstring's rules."""
  weights = [1.0] * len(phrases) if weights is None else weights
  raw = lambda lengths: max([0.0] + [w * n for w, n in zip(weights, lengths)])  # noqa: E731
  scale = lambda active: delta * (multiplier if active else 1.0)  # noqa: E731
  history, prefix_history, active, out = [], [], False, []
  for x in tokens:
    if x == 0:
      out.append(0.0)
      continue
    before = scale(active) * raw(longest_matches(phrases, history))
    history = history + [x]
    lengths = longest_matches(phrases, history)
    completed = [b for b, p in enumerate(phrases) if lengths[b] == len(p)]
    after = max(weights[b] * len(phrases[b]) for b in completed) if completed else raw(lengths)
    prefix_history = prefix_history + [x]
    prefix_done = any(n == len(q) for n, q in zip(longest_matches(prefixes, prefix_history), prefixes))
    if prefix_done:
      prefix_history = []
    in_force = prefix_done or (active and after > 0)
    out.append(scale(in_force) * after - before)
    active = prefix_done or (active and after > 0 and not completed)
    if completed:
      history = []
  out.append(-scale(active) * raw(longest_matches(phrases, history)))
  return np.array(out)


def random_phrase_list(rng, max_count=4, max_len=5, alphabet=VOCAB - 1):
  """Distinct phrases, some of them prefixes, suffixes or infixes of the others."""
  phrases = []
  for _ in range(rng.integers(1, max_count + 1)):
    if phrases and rng.random() < 0.5:
      source = phrases[rng.integers(len(phrases))]
      start = rng.integers(len(source))
      phrase = source[start:rng.integers(start + 1, len(source) + 1)]
      if rng.random() < 0.3 and len(phrase) < max_len:
        phrase = phrase + [int(rng.integers(1, alphabet + 1))]
    else:
      phrase = [int(t) for t in rng.integers(1, alphabet + 1, size=rng.integers(1, max_len + 1))]
    if phrase not in phrases:
      phrases.append(phrase)
  return phrases


def random_sequence(rng, phrases, length, alphabet=VOCAB - 1):
  """Pieces of the phrases (whole or cut short) mixed with random tokens and blanks."""
  out = []
  while len(out) < length:
    if rng.random() < 0.6:
      p = phrases[rng.integers(len(phrases))]
      out += p[:rng.integers(1, len(p) + 1)] if rng.random() < 0.5 else p
    else:
      out.append(int(rng.integers(0, alphabet + 1)))
  return out[:length]


def rnn_model(seed, vocab=VOCAB, enc_dim=4, hidden=6):
  rng = np.random.default_rng(seed)
  emb, rec, w_enc, w_pred, w_out = (jnp.asarray(rng.normal(size=s) * c, jnp.float32) for s, c in [
      ((vocab, hidden), 1.0), ((hidden, hidden), 0.5), ((enc_dim, hidden), 1.0), ((hidden, hidden), 1.0),
      ((hidden, vocab), 2.0)])

  def predictor_step(h, labels):
    h = jnp.tanh(h @ rec + emb[labels])
    return h, h

  return TransducerFns(predictor_init=lambda n: jnp.zeros((n, hidden), jnp.float32), predictor_step=predictor_step,
                       joint=lambda e, p: jnp.tanh(e @ w_enc + p @ w_pred) @ w_out)


def table_model(table, max_count):
  """logits = table[frame, min(labels so far, max_count) * vocab + last label]; one-hot frames as encoder output."""
  frames, contexts, vocab = table.shape
  table = jnp.asarray(table, jnp.float32)

  def predictor_step(state, labels):
    _, count = state
    count = count + (labels > 0)
    return jax.nn.one_hot(jnp.minimum(count, max_count) * vocab + labels, contexts), (labels, count)

  zeros = lambda n: jnp.zeros((n,), jnp.int32)  # noqa: E731
  fns = TransducerFns(predictor_init=lambda n: (zeros(n), zeros(n)), predictor_step=predictor_step,
                      joint=lambda e, p: jnp.einsum("nt,np,tpv->nv", e, p, table))
  return fns, jnp.eye(frames, dtype=jnp.float32)[None]


def hypotheses(result, row=0):
  return {tuple(int(t) for t in tokens[:length]): float(score)
          for tokens, length, score in zip(np.asarray(result.tokens[row]), np.asarray(result.lengths[row]),
                                           np.asarray(result.scores[row])) if np.isfinite(score)}


def search(fns, enc, paddings, **kwargs):
  return jax.jit(functools.partial(beam_search, fns, **kwargs))(enc, paddings)


def near_miss_model():
  """Three frames, one label each: 1, then 2, then 2 (logit 2.0) slightly over 3 (logit 1.6).
  The unbiased best output [1, 2, 2] is one token off the phrase [1, 2, 3]."""
  vocab, max_count = 4, 3
  table = np.full((3, (max_count + 1) * vocab, vocab), -4.0)
  table[..., 0] = 4.0  # blank, unless the frame still has to emit
  ctx = lambda count, last: count * vocab + last  # noqa: E731
  table[0, ctx(0, 0)] = [-4.0, 4.0, -2.0, -2.0]
  table[1, ctx(1, 1)] = [-4.0, -2.0, 4.0, -2.0]
  table[2, ctx(2, 2)] = [-4.0, -2.0, 2.0, 1.6]
  return table_model(table, max_count)


def check_unbounded_beam_scores(make_fusion, mode):
  """With a beam wider than the search space, the boosted score of every output is its plain score
  plus the bonuses the naive reference gives its label sequence. make_fusion(phrases, vocab, delta,
  mode) -> ScoreFusion."""
  frames, max_symbols, max_len = 2, 2, 4
  rng = np.random.default_rng(7)
  vocab = 4
  table = rng.normal(size=(frames, (max_len + 1) * vocab, vocab)) * 1.5
  fns, enc = table_model(table, max_count=max_len)
  phrases, delta = [[1, 2], [2, 3, 1], [3]], 0.8
  kwargs = dict(beam_size=256, max_symbols_per_frame=max_symbols, max_output_length=max_len)
  plain = hypotheses(search(fns, enc, jnp.zeros((1, frames)), **kwargs))
  boosted = hypotheses(search(fns, enc, jnp.zeros((1, frames)), fusion=make_fusion(phrases, vocab, delta, mode),
                              **kwargs))
  assert set(plain) == set(boosted) and len(plain) == 1 + 3 + 9 + 27 + 81
  for labels, score in boosted.items():
    np.testing.assert_allclose(score, plain[labels] + naive_bonuses(phrases, labels, delta).sum(), atol=1e-4,
                               err_msg=str(labels))
