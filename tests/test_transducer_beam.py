"""Transducer greedy decoding and both beam searches ('tsd', 'one_pass') against naive loops,
a naive time-synchronous search and brute-force enumeration."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memlm_jax.decoding.transducer_beam import (BEAM_METHODS, BeamResult, ScoreFusion, TransducerFns,
                                                beam_search, greedy_decode)

# Tiny models.


@functools.cache
def rnn_model(seed: int, vocab: int = 5, enc_dim: int = 4, hidden: int = 6, blank_bias: float = 1.0):
  """Random RNN predictor (embedding + tanh recurrence) and random tanh joint."""
  rng = np.random.default_rng(seed)
  emb = jnp.asarray(rng.normal(size=(vocab, hidden)), jnp.float32)
  rec = jnp.asarray(rng.normal(size=(hidden, hidden)) * 0.5, jnp.float32)
  w_enc = jnp.asarray(rng.normal(size=(enc_dim, hidden)), jnp.float32)
  w_pred = jnp.asarray(rng.normal(size=(hidden, hidden)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(hidden, vocab)) * 2.0, jnp.float32)
  bias = jnp.zeros((vocab,), jnp.float32).at[0].set(blank_bias)

  def predictor_step(h, labels):
    h = jnp.tanh(h @ rec + emb[labels])
    return h, h

  return TransducerFns(predictor_init=lambda n: jnp.zeros((n, hidden), jnp.float32),
                       predictor_step=predictor_step,
                       joint=lambda e, p: jnp.tanh(e @ w_enc + p @ w_pred) @ w_out + bias)


def context_index(last: int, count: int, vocab: int, max_count: int) -> int:
  return min(count, max_count) * vocab + last


def table_model(table: np.ndarray, max_count: int):
  """logits = table[frame, context(last label, labels so far)]; the encoder output is one-hot frames."""
  frames, contexts, vocab = table.shape
  table = jnp.asarray(table, jnp.float32)

  def predictor_step(state, labels):
    _, count = state
    count = count + (labels > 0)
    ctx = jnp.minimum(count, max_count) * vocab + labels
    return jax.nn.one_hot(ctx, contexts), (labels, count)

  zeros = lambda n: jnp.zeros((n,), jnp.int32)
  fns = TransducerFns(predictor_init=lambda n: (zeros(n), zeros(n)), predictor_step=predictor_step,
                      joint=lambda e, p: jnp.einsum("nt,np,tpv->nv", e, p, table))
  return fns, jnp.eye(frames, dtype=jnp.float32)[None]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.logaddexp.reduce(x)


def brute_force(table, max_count, max_symbols, max_len, path_bonus=lambda labels: 0.0):
  """Every alignment (<= max_symbols labels, then a blank, per frame; <= max_len labels).

  Returns ({labels: log-sum over its alignments + bonus}, {labels: best alignment + bonus}).
  """
  frames, _, vocab = table.shape
  logp = np.asarray(table, np.float64)
  logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
  chunks = [c for n in range(max_symbols + 1) for c in itertools.product(range(1, vocab), repeat=n)]
  total, best = {}, {}
  for choice in itertools.product(chunks, repeat=frames):
    labels = sum(choice, ())
    if len(labels) > max_len:
      continue
    lp, last, count = 0.0, 0, 0
    for t, chunk in enumerate(choice):
      for y in chunk:
        lp += logp[t, context_index(last, count, vocab, max_count), y]
        last, count = y, count + 1
      lp += logp[t, context_index(last, count, vocab, max_count), 0]
    total[labels] = np.logaddexp(total.get(labels, -np.inf), lp)
    best[labels] = max(best.get(labels, -np.inf), lp)
  bonus = {labels: path_bonus(labels) for labels in total}
  return ({y: v + bonus[y] for y, v in total.items()}, {y: v + bonus[y] for y, v in best.items()})


def hypotheses(result: BeamResult, row: int = 0) -> dict:
  """{labels: score} of the non-empty slots of one row."""
  out = {}
  for tokens, length, score in zip(np.asarray(result.tokens[row]), np.asarray(result.lengths[row]),
                                   np.asarray(result.scores[row])):
    if np.isfinite(score):
      labels = tuple(int(t) for t in tokens[:length])
      assert labels not in out, f"{labels} appears twice in the beam"
      assert not tokens[length:].any()
      out[labels] = float(score)
  return out


def random_inputs(seed, batch, frames, enc_dim=4, lengths=None):
  rng = np.random.default_rng(seed)
  enc = rng.normal(size=(batch, frames, enc_dim)).astype(np.float32)
  lengths = np.full((batch,), frames) if lengths is None else np.asarray(lengths)
  paddings = (np.arange(frames)[None, :] >= lengths[:, None]).astype(np.float32)
  return jnp.asarray(enc), jnp.asarray(paddings)


def jit_beam(fns, **kwargs):
  return jax.jit(functools.partial(beam_search, fns, **kwargs))


def jit_greedy(fns, **kwargs):
  return jax.jit(functools.partial(greedy_decode, fns, **kwargs))


# Compiled once per setting and shared between tests (compiling dominates the test time).
greedy_of = functools.cache(lambda seed, max_symbols, max_len: jit_greedy(
    rnn_model(seed), max_symbols_per_frame=max_symbols, max_output_length=max_len))
beam_of = functools.cache(lambda seed, beam, max_symbols, max_len, method="tsd": jit_beam(
    rnn_model(seed), beam_size=beam, max_symbols_per_frame=max_symbols, max_output_length=max_len, method=method))

# (model seed, max_symbols_per_frame, max_output_length) of the greedy / beam-1 comparisons.
GREEDY_CASES = [(1, 1, 12), (2, 3, 4), (3, 2, 12)]
GREEDY_LENGTHS = [6, 3, 5, 1]  # frames of each row of a [4, 6] batch


def naive_greedy(fns, enc, frames, max_symbols, max_len):
  """One utterance, Python loops: the labels the argmax emits in each frame (<= max_symbols)."""
  pred_out, state = fns.predictor_step(fns.predictor_init(1), jnp.zeros((1,), jnp.int32))
  per_frame, total = [], 0
  for t in range(frames):
    chunk = []
    for _ in range(max_symbols):
      y = int(np.argmax(np.asarray(fns.joint(enc[None, t], pred_out)[0]))) if total < max_len else 0
      if y == 0:
        break
      chunk.append(y)
      total += 1
      pred_out, state = fns.predictor_step(state, jnp.asarray([y], jnp.int32))
    per_frame.append(chunk)
  return per_frame


def path_log_prob(fns, enc, frames, labels_per_frame):
  """Log-prob of one alignment (labels_per_frame[t] labels then a blank in frame t) of one utterance."""
  pred_out, state = fns.predictor_step(fns.predictor_init(1), jnp.zeros((1,), jnp.int32))
  lp = 0.0
  for t in range(frames):
    for y in labels_per_frame[t]:
      lp += log_softmax(fns.joint(enc[None, t], pred_out)[0])[y]
      pred_out, state = fns.predictor_step(state, jnp.asarray([y], jnp.int32))
    lp += log_softmax(fns.joint(enc[None, t], pred_out)[0])[0]
  return lp


def blank_log_prob(fns, enc_frame, labels):
  """log P(blank | labels so far, encoder frame enc_frame [enc_dim]) of one hypothesis."""
  pred_out, state = fns.predictor_step(fns.predictor_init(1), jnp.zeros((1,), jnp.int32))
  for y in labels:
    pred_out, state = fns.predictor_step(state, jnp.asarray([y], jnp.int32))
  return log_softmax(fns.joint(enc_frame[None], pred_out)[0])[0]


def naive_tsd(fns, enc, frames, beam, max_symbols, max_len):
  """Time-synchronous decoding of one utterance with Python dicts {labels: (score, pred_out, state)}:
  per frame, `ended` (closed with blank) and `active` (still emitting) hold `beam` hypotheses each."""
  pred_out, state = fns.predictor_step(fns.predictor_init(1), jnp.zeros((1,), jnp.int32))
  hyps = {(): (0.0, pred_out, state)}
  for t in range(frames):
    active, ended = hyps, {}
    for step in range(max_symbols + 1):
      if not active:
        break
      logp = {y: log_softmax(fns.joint(enc[None, t], out)[0]) for y, (_, out, _) in active.items()}
      for y, (score, out, st) in active.items():
        old = ended.get(y, (-np.inf,))[0]
        ended[y] = (np.logaddexp(old, score + logp[y][0]), out, st)  # equal labels, equal state
      ended = dict(sorted(ended.items(), key=lambda item: -item[1][0])[:beam])
      worst_ended = min(v[0] for v in ended.values()) if len(ended) == beam else -np.inf
      children = sorted(((score + logp[y][label], y, label) for y, (score, _, _) in active.items()
                         if step < max_symbols and len(y) < max_len for label in range(1, len(logp[y]))),
                        reverse=True)[:beam]
      parents, active = active, {}
      for score, y, label in children:
        if score >= worst_ended:  # below it, no extension can enter `ended`
          out, st = fns.predictor_step(parents[y][2], jnp.asarray([label], jnp.int32))
          active[y + (label,)] = (score, out, st)
    hyps = ended
  return {y: v[0] for y, v in hyps.items()}


# Greedy decoding.


@pytest.mark.parametrize("seed,max_symbols,max_len", GREEDY_CASES)
def test_greedy_matches_naive_loop(seed, max_symbols, max_len):
  fns = rnn_model(seed)
  enc, paddings = random_inputs(seed, batch=4, frames=6, lengths=GREEDY_LENGTHS)
  tokens, out_lengths = greedy_of(seed, max_symbols, max_len)(enc, paddings)
  assert tokens.shape == (4, max_len) and tokens.dtype == jnp.int32
  emitted_many = False
  for row, frames in enumerate(GREEDY_LENGTHS):
    expected = sum(naive_greedy(fns, enc[row], frames, max_symbols, max_len), [])
    emitted_many |= len(expected) > 2
    assert int(out_lengths[row]) == len(expected)
    np.testing.assert_array_equal(tokens[row], expected + [0] * (max_len - len(expected)))
  assert emitted_many


# Beam search: exactness against brute force.


@pytest.mark.parametrize("method", BEAM_METHODS)
@pytest.mark.parametrize("frames,max_symbols,vocab,max_len", [(3, 2, 3, 6), (2, 3, 3, 4), (3, 1, 4, 2)])
def test_unbounded_beam_equals_brute_force(frames, max_symbols, vocab, max_len, method):
  """With a beam wider than the search space every label sequence survives with its exact
  log-sum over alignments (hypotheses are merged, so no sequence appears twice). 'tsd' needs
  one slot per sequence and a spare one (a full B prunes the active hypotheses below it, which
  can drop alignments of sequences B holds); 'one_pass' shares its slots between ended and
  active hypotheses."""
  rng = np.random.default_rng(frames * 100 + max_symbols * 10 + vocab)
  table = rng.normal(size=(frames, (max_len + 1) * vocab, vocab)) * 1.5
  fns, enc = table_model(table, max_count=max_len)
  expected, _ = brute_force(table, max_len, max_symbols, max_len)
  beam = len(expected) + 1 if method == "tsd" else 2 * len(expected)
  result = jit_beam(fns, beam_size=beam, max_symbols_per_frame=max_symbols, max_output_length=max_len,
                    method=method)(enc, jnp.zeros(enc.shape[:2]))
  found = hypotheses(result)
  assert set(found) == set(expected)
  for labels, score in found.items():
    np.testing.assert_allclose(score, expected[labels], atol=1e-4, err_msg=str(labels))
  scores = np.asarray(result.scores[0])
  assert np.all(np.diff(scores[np.isfinite(scores)]) <= 0)


@pytest.mark.parametrize("method", BEAM_METHODS)
def test_small_beam_finds_planted_best_path(method):
  frames, max_symbols, vocab, max_len = 4, 2, 3, 8
  rng = np.random.default_rng(3)
  table = rng.normal(size=(frames, (max_len + 1) * vocab, vocab))
  # Favour one alignment strongly: at every step of it, its next symbol gets +6.
  plan = [tuple(rng.integers(1, vocab, size=rng.integers(0, max_symbols + 1))) for _ in range(frames)]
  last, count = 0, 0
  for t, chunk in enumerate(plan):
    for y in chunk + (0,):
      table[t, context_index(last, count, vocab, max_len), y] += 6.0
      if y:
        last, count = y, count + 1
  fns, enc = table_model(table, max_count=max_len)
  total, best_alignment = brute_force(table, max_len, max_symbols, max_len)
  target = max(total, key=total.get)
  assert target == sum(plan, ())
  result = jit_beam(fns, beam_size=3, max_symbols_per_frame=max_symbols, max_output_length=max_len,
                    method=method)(enc, jnp.zeros(enc.shape[:2]))
  top = tuple(int(t) for t in result.tokens[0, 0, :int(result.lengths[0, 0])])
  assert top == target
  # Each label carries the frame the planted alignment emits it at.
  planned_frames = [t for t, chunk in enumerate(plan) for _ in chunk]
  np.testing.assert_array_equal(result.frames[0, 0], planned_frames + [0] * (max_len - len(planned_frames)))
  # A pruned beam keeps a subset of the alignments: between the best one and the full sum.
  assert best_alignment[target] - 1e-4 <= float(result.scores[0, 0]) <= total[target] + 1e-4


# Beam search 'tsd': against a naive search, and what it guarantees that 'one_pass' does not.


@pytest.mark.parametrize("seed,beam,max_symbols,max_len", [(5, 3, 2, 9), (6, 2, 3, 5), (11, 1, 2, 12)])
def test_tsd_matches_naive_search(seed, beam, max_symbols, max_len):
  """Same hypotheses and scores as the dict-based search (pruning, merging, padding, length cap)."""
  lengths = [6, 4, 5]
  enc, paddings = random_inputs(seed + 30, batch=3, frames=6, lengths=lengths)
  result = beam_of(seed, beam, max_symbols, max_len)(enc, paddings)
  many_labels = False
  for row, frames in enumerate(lengths):
    expected = naive_tsd(rnn_model(seed), enc[row], frames, beam, max_symbols, max_len)
    found = hypotheses(result, row)
    assert set(found) == set(expected)
    for labels, score in found.items():
      np.testing.assert_allclose(score, expected[labels], rtol=1e-5, atol=1e-5, err_msg=str(labels))
    many_labels |= max(len(y) for y in found) > 2
  assert many_labels


def multi_label_frame_model():
  """Two frames, 3 labels, max 3 per frame. The best output (1, 2, 3) is emitted in frame 0,
  where its partial 1 -> 2 falls below both the ended empty hypothesis and the active 1 -> 3
  (which then ends badly); frame 1 strongly favours hypotheses that already hold 1, 2, 3."""
  vocab, max_len, tiny = 4, 4, 1e-4
  table = np.full((2, (max_len + 1) * vocab, vocab), np.log(0.25))
  table[1] = np.log([0.1, 0.3, 0.3, 0.3])

  def probs(frame, labels, p):  # [blank, 1, 2, 3] after `labels` in `frame`
    table[frame, context_index(labels[-1] if labels else 0, len(labels), vocab, max_len)] = np.log(p)

  probs(0, (), [0.31, 0.40, 0.29, tiny])
  probs(0, (1,), [0.05, tiny, 0.40, 0.55])
  probs(0, (2,), [0.5, 0.25, 0.25, tiny])
  probs(0, (1, 3), [0.01, 0.5, 0.49, tiny])
  probs(0, (1, 2), [0.04, tiny, tiny, 0.95])
  probs(0, (1, 2, 3), [0.99, tiny, tiny, tiny])
  probs(0, (1, 3, 1), [0.5, tiny, tiny, tiny])
  probs(1, (1, 2, 3), [0.99, tiny, tiny, tiny])
  return table, max_len


def test_tsd_keeps_a_frame_that_needs_three_labels():
  table, max_len = multi_label_frame_model()
  fns, enc = table_model(table, max_count=max_len)
  total, best_alignment = brute_force(table, max_len, 3, max_len)
  target = max(total, key=total.get)
  assert len(target) == 3
  kwargs = dict(beam_size=2, max_symbols_per_frame=3, max_output_length=max_len)
  tsd = jit_beam(fns, **kwargs)(enc, jnp.zeros((1, 2)))
  one_pass = jit_beam(fns, method="one_pass", **kwargs)(enc, jnp.zeros((1, 2)))
  greedy = jit_beam(fns, method="one_pass", **{**kwargs, "beam_size": 1})(enc, jnp.zeros((1, 2)))
  tsd_best = hypotheses(tsd)
  assert max(tsd_best, key=tsd_best.get) == target
  assert best_alignment[target] - 1e-4 <= float(tsd.scores[0, 0]) <= total[target] + 1e-4
  # one_pass prunes the partial path in frame 0 and ends below greedy decoding (the reported bug).
  assert target not in hypotheses(one_pass)
  assert float(one_pass.scores[0, 0]) < float(greedy.scores[0, 0]) < float(tsd.scores[0, 0])


def test_tsd_never_drops_an_ended_hypothesis():
  """An ended hypothesis only leaves B for a better one, so after frame t the best score is at
  least that of every hypothesis of the beam after frame t - 1 closed with a blank in frame t.
  'one_pass' does not guarantee it: active hypotheses can evict ended ones and then end worse.

  (The best score is not always >= the greedy path's: a beam can prefer, in one frame, a
  stopping point that later frames punish (beam 1 included), and with beam >= 2 the greedy
  label chain can be pushed out of the active set by label extensions of other hypotheses.)"""
  utterances, frames = 4, 5
  fns = rnn_model(seed=0, blank_bias=0.0)
  enc, _ = random_inputs(seed=7, batch=utterances, frames=frames)
  # Row u * frames + t decodes the first t + 1 frames of utterance u.
  prefixes = jnp.repeat(enc, frames, axis=0)
  paddings = np.tile(np.arange(frames)[None, :] > np.arange(frames)[:, None], (utterances, 1))
  violations = {}
  for method in BEAM_METHODS:
    result = jit_beam(fns, beam_size=2, max_symbols_per_frame=2, max_output_length=12, method=method)(
        prefixes, jnp.asarray(paddings, jnp.float32))
    violations[method] = []
    for u, t in itertools.product(range(utterances), range(1, frames)):
      row = u * frames + t
      closed = [score + blank_log_prob(fns, enc[u, t], labels) for labels, score in hypotheses(result, row - 1).items()]
      if float(result.scores[row, 0]) < max(closed) - 1e-5:
        violations[method].append((u, t))
  assert not violations["tsd"]
  assert violations["one_pass"]


def test_tsd_beam_one_in_one_frame_is_at_least_greedy():
  """In one frame beam 1 keeps the best stopping point along greedy's label chain (greedy stops
  at the first point where blank wins), so its score is >= greedy's. Over several frames this
  does not hold (see test_tsd_never_drops_an_ended_hypothesis)."""
  seed = 3
  enc, paddings = random_inputs(seed + 50, batch=48, frames=1)
  greedy = beam_of(seed, 1, 3, 8, "one_pass")(enc, paddings)
  tsd = beam_of(seed, 1, 3, 8)(enc, paddings)
  assert np.all(np.asarray(tsd.scores[:, 0]) >= np.asarray(greedy.scores[:, 0]) - 1e-5)
  assert np.any(np.asarray(tsd.scores[:, 0]) > np.asarray(greedy.scores[:, 0]) + 1e-3)  # not always the same


# Beam search: against greedy and itself.


@pytest.mark.parametrize("seed,max_symbols,max_len", GREEDY_CASES)
def test_one_pass_beam_one_equals_greedy(seed, max_symbols, max_len):
  enc, paddings = random_inputs(seed, batch=4, frames=6, lengths=GREEDY_LENGTHS)
  tokens, lengths = greedy_of(seed, max_symbols, max_len)(enc, paddings)
  result = beam_of(seed, 1, max_symbols, max_len, "one_pass")(enc, paddings)
  assert int(lengths.max()) > 2
  np.testing.assert_array_equal(result.tokens[:, 0], tokens)
  np.testing.assert_array_equal(result.lengths[:, 0], lengths)


@pytest.mark.parametrize("method", BEAM_METHODS)
def test_batched_equals_per_utterance(method):
  lengths = [5, 3, 3]  # frames 5, 6 are padding in every row
  enc, paddings = random_inputs(seed=11, batch=3, frames=7, lengths=lengths)
  enc = jnp.where(paddings[..., None] > 0, jnp.nan, enc)  # padded frames must not be read
  search = beam_of(5, 4, 2, 9, method)
  batched = search(enc, paddings)
  scores = np.asarray(batched.scores)
  assert not np.isnan(scores).any() and np.isfinite(scores[:, 0]).all()
  for row, frames in enumerate(lengths):
    alone = search(enc[row:row + 1, :frames], jnp.zeros((1, frames)))
    np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])
    np.testing.assert_array_equal(batched.lengths[row], alone.lengths[0])
    np.testing.assert_allclose(batched.scores[row], alone.scores[0], rtol=1e-5)


def test_jit_compiles_once_for_same_shapes():
  fns = rnn_model(seed=2)
  traces = []

  def decode(enc, paddings):
    traces.append(1)
    return beam_search(fns, enc, paddings, beam_size=3, max_output_length=8)

  decode = jax.jit(decode)
  first = decode(*random_inputs(seed=1, batch=2, frames=5, lengths=[5, 3]))
  second = decode(*random_inputs(seed=2, batch=2, frames=5, lengths=[2, 5]))
  assert len(traces) == 1
  assert not np.array_equal(np.asarray(first.scores), np.asarray(second.scores))


# Score fusion.


def constant_fusion(vocab, token_bonus, final_weight=0.0, mode="shallow", boosted=2):
  """Bonus token_bonus[y] for emitting y; the state counts emissions of `boosted`."""
  token_bonus = jnp.asarray(token_bonus, jnp.float32)

  def advance(count, tokens):
    return count + (tokens == boosted), token_bonus[tokens]

  return ScoreFusion(init=lambda b, k: jnp.zeros((b, k), jnp.int32),
                     token_bonus=lambda count: jnp.broadcast_to(token_bonus, count.shape + (vocab,)),
                     advance=advance,
                     final_bonus=lambda count: final_weight * count.astype(jnp.float32),
                     mode=mode)


@pytest.mark.parametrize("method", BEAM_METHODS)
@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_fusion_unbounded_beam_equals_brute_force(mode, method):
  frames, max_symbols, vocab, max_len = 3, 2, 3, 6
  rng = np.random.default_rng(21)
  table = rng.normal(size=(frames, (max_len + 1) * vocab, vocab))
  bonus = np.array([0.0, -0.4, 0.7])
  fusion = constant_fusion(vocab, bonus, final_weight=0.25, mode=mode)
  fns, enc = table_model(table, max_count=max_len)
  expected, _ = brute_force(table, max_len, max_symbols, max_len,
                            path_bonus=lambda y: sum(bonus[t] for t in y) + 0.25 * y.count(2))
  result = jit_beam(fns, beam_size=2 * len(expected), max_symbols_per_frame=max_symbols,
                    max_output_length=max_len, fusion=fusion, method=method)(enc, jnp.zeros(enc.shape[:2]))
  found = hypotheses(result)
  assert set(found) == set(expected)
  for labels, score in found.items():
    np.testing.assert_allclose(score, expected[labels], atol=1e-4, err_msg=str(labels))


@pytest.mark.parametrize("method", BEAM_METHODS)
@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_zero_fusion_is_no_fusion(mode, method):
  fns = rnn_model(seed=8)
  enc, paddings = random_inputs(seed=4, batch=2, frames=6, lengths=[6, 4])
  kwargs = dict(beam_size=4, max_symbols_per_frame=2, max_output_length=8, method=method)
  plain = beam_of(8, 4, 2, 8, method)(enc, paddings)
  fused = jit_beam(fns, fusion=constant_fusion(5, np.zeros(5), mode=mode),
                   fusion_top_k=2 if mode == "shallow" else None, **kwargs)(enc, paddings)
  for a, b in zip(plain, fused):
    np.testing.assert_array_equal(a, b)


def test_constant_bonus_shallow_vs_rescore():
  """'one_pass' beam 1: shallow fusion re-ranks before pruning (greedy on boosted log-probs);
  rescore prunes on the model (greedy tokens) and only adds the bonus to what it kept."""
  seed, max_symbols, max_len = GREEDY_CASES[2]
  vocab, boosted, bonus_value = 5, 2, 3.0
  fns = rnn_model(seed)
  enc, paddings = random_inputs(seed, batch=4, frames=6, lengths=GREEDY_LENGTHS)
  bonus = np.zeros(vocab)
  bonus[boosted] = bonus_value
  kwargs = dict(beam_size=1, max_symbols_per_frame=max_symbols, max_output_length=max_len, method="one_pass")

  boosted_joint = lambda e, p: jax.nn.log_softmax(fns.joint(e, p), axis=-1) + jnp.asarray(bonus, jnp.float32)
  boosted_fns = TransducerFns(fns.predictor_init, fns.predictor_step, boosted_joint)
  shallow = jit_beam(fns, fusion=constant_fusion(vocab, bonus, mode="shallow"), **kwargs)(enc, paddings)
  tokens, lengths = jit_greedy(boosted_fns, max_symbols_per_frame=max_symbols, max_output_length=max_len)(
      enc, paddings)
  np.testing.assert_array_equal(shallow.tokens[:, 0], tokens)
  np.testing.assert_array_equal(shallow.lengths[:, 0], lengths)

  rescore = jit_beam(fns, fusion=constant_fusion(vocab, bonus, mode="rescore"), **kwargs)(enc, paddings)
  plain_tokens, plain_lengths = greedy_of(seed, max_symbols, max_len)(enc, paddings)
  np.testing.assert_array_equal(rescore.tokens[:, 0], plain_tokens)
  assert (np.asarray(shallow.tokens) == boosted).sum() > (np.asarray(rescore.tokens) == boosted).sum()

  # Rescore score = model log-prob of the greedy alignment + bonus per boosted token.
  plain = beam_of(seed, 1, max_symbols, max_len, "one_pass")(enc, paddings)
  count = (np.asarray(plain_tokens) == boosted).sum(axis=1)
  np.testing.assert_allclose(rescore.scores[:, 0], np.asarray(plain.scores[:, 0]) + bonus_value * count,
                             rtol=1e-5)
  # ... and the plain beam-1 score is the log-prob of that one alignment.
  for row, frames in enumerate(GREEDY_LENGTHS):
    alignment = naive_greedy(fns, enc[row], frames, max_symbols, max_len)
    assert sum(alignment, []) == list(np.asarray(plain_tokens[row, :int(plain_lengths[row])]))
    np.testing.assert_allclose(plain.scores[row, 0], path_log_prob(fns, enc[row], frames, alignment),
                               rtol=1e-5)


def test_fusion_top_k_restricts_bonus():
  """'one_pass' beam 1 with top-k shallow fusion is greedy decoding on the top-k-boosted model."""
  seed, max_symbols, max_len = GREEDY_CASES[2]
  vocab, boosted = 5, 3
  fns = rnn_model(seed)
  enc, paddings = random_inputs(seed, batch=4, frames=6, lengths=GREEDY_LENGTHS)
  bonus = np.zeros(vocab)
  bonus[boosted] = 2.5
  fusion = constant_fusion(vocab, bonus, mode="shallow", boosted=boosted)
  kwargs = dict(max_symbols_per_frame=max_symbols, max_output_length=max_len, fusion=fusion, method="one_pass")

  # top-1: the bonus applies only where the boosted token is the best non-blank label.
  def top1_joint(e, p):
    logp = jax.nn.log_softmax(fns.joint(e, p), axis=-1)
    is_top = jnp.argmax(logp[:, 1:], axis=-1) + 1 == boosted
    return logp.at[:, boosted].add(jnp.where(is_top, bonus[boosted], 0.0))

  restricted = jit_beam(fns, beam_size=1, fusion_top_k=1, **kwargs)(enc, paddings)
  top1_fns = TransducerFns(fns.predictor_init, fns.predictor_step, top1_joint)
  ref_tokens, ref_lengths = jit_greedy(top1_fns, max_symbols_per_frame=max_symbols,
                                       max_output_length=max_len)(enc, paddings)
  np.testing.assert_array_equal(restricted.tokens[:, 0], ref_tokens)
  np.testing.assert_array_equal(restricted.lengths[:, 0], ref_lengths)
  unrestricted = jit_beam(fns, beam_size=1, **kwargs)(enc, paddings)
  assert not np.array_equal(unrestricted.tokens, restricted.tokens)
  # top-(all labels) is the same as no restriction.
  everything = jit_beam(fns, beam_size=1, fusion_top_k=vocab - 1, **kwargs)(enc, paddings)
  for a, b in zip(unrestricted, everything):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", BEAM_METHODS)
@pytest.mark.parametrize("mode", ["shallow", "rescore"])
def test_fusion_state_follows_parent(mode, method):
  """The fusion state hashes the emitted labels; its final bonus must match each output."""
  vocab, modulus, weight = 5, 101, 1e-3
  fns = rnn_model(seed=8)
  enc, paddings = random_inputs(seed=4, batch=2, frames=6, lengths=[6, 4])

  def advance(state, tokens):
    h, count = state
    return ((h * vocab + tokens) % modulus, count + 1), jnp.zeros(tokens.shape)

  fusion = ScoreFusion(init=lambda b, k: (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.int32)),
                       token_bonus=lambda state: jnp.zeros(state[0].shape + (vocab,)),
                       advance=advance,
                       final_bonus=lambda state: weight * state[0] + 10.0 * state[1],
                       mode=mode)
  plain = beam_of(8, 4, 2, 8, method)(enc, paddings)
  fused = jit_beam(fns, fusion=fusion, beam_size=4, max_symbols_per_frame=2,
                   max_output_length=8, method=method)(enc, paddings)

  def label_hash(labels):
    h = 0
    for y in labels:
      h = (h * vocab + y) % modulus
    return h

  for row in range(2):
    base, boosted = hypotheses(plain, row), hypotheses(fused, row)
    assert set(base) == set(boosted) and any(len(y) > 2 for y in base)
    for labels, score in boosted.items():
      expected = base[labels] + weight * label_hash(labels) + 10.0 * len(labels)
      np.testing.assert_allclose(score, expected, rtol=1e-6, err_msg=str(labels))


# Internal-LM subtraction.


def prior_table_model(table: np.ndarray, prior: np.ndarray, max_count: int):
  """table_model plus a label prior that depends on the context only: logits = table[frame, context] +
  prior[context], so the joint with a zero encoder frame is prior[context] (its internal LM)."""
  fns, enc = table_model(table, max_count)
  prior = jnp.asarray(prior, jnp.float32)
  return dataclasses.replace(fns, joint=lambda e, p: fns.joint(e, p) + p @ prior), enc


def prior_log_prob(prior: np.ndarray, labels: tuple, vocab: int, max_count: int) -> float:
  """log p_ILM(labels): each label under the softmax of prior[its context] over the non-blank labels."""
  total, last = 0.0, 0
  for count, y in enumerate(labels):
    total += log_softmax(prior[context_index(last, count, vocab, max_count), 1:])[y - 1]
    last = y
  return total


@pytest.mark.parametrize("method", BEAM_METHODS)
@pytest.mark.parametrize("ilm_weight", [0.5, 1.3])
def test_ilm_subtraction_unbounded_beam_equals_brute_force(ilm_weight, method):
  """Every label sequence's score is its log-sum over alignments less ilm_weight x its log-prob under
  the internal LM (the joint with a zero frame, blank left out), computed here label by label."""
  frames, max_symbols, vocab, max_len = 3, 2, 3, 5
  rng = np.random.default_rng(int(ilm_weight * 10) + len(method))
  contexts = (max_len + 1) * vocab
  table = rng.normal(size=(frames, contexts, vocab))
  prior = rng.normal(size=(contexts, vocab)) * 2.0
  fns, enc = prior_table_model(table, prior, max_count=max_len)
  expected, _ = brute_force(table + prior[None], max_len, max_symbols, max_len,
                            path_bonus=lambda y: -ilm_weight * prior_log_prob(prior, y, vocab, max_len))
  beam = len(expected) + 1 if method == "tsd" else 2 * len(expected)
  result = jit_beam(fns, beam_size=beam, max_symbols_per_frame=max_symbols, max_output_length=max_len,
                    method=method, ilm_weight=ilm_weight)(enc, jnp.zeros(enc.shape[:2]))
  found = hypotheses(result)
  assert set(found) == set(expected)
  for labels, score in found.items():
    np.testing.assert_allclose(score, expected[labels], atol=1e-4, err_msg=str(labels))


def test_ilm_weight_zero_is_the_plain_search():
  enc, paddings = random_inputs(seed=5, batch=2, frames=6, lengths=[6, 3])
  plain = beam_of(3, 4, 2, 8)(enc, paddings)
  zero = jit_beam(rnn_model(3), beam_size=4, max_symbols_per_frame=2, max_output_length=8, ilm_weight=0.0)(enc,
                                                                                                        paddings)
  for a, b in zip(plain, zero):
    np.testing.assert_array_equal(a, b)
  subtracted = jit_beam(rnn_model(3), beam_size=4, max_symbols_per_frame=2, max_output_length=8, ilm_weight=0.5)(
      enc, paddings)
  assert not np.allclose(subtracted.scores, plain.scores)  # the weight reaches the search


# Bad input.


def test_bad_arguments_raise():
  fns = rnn_model(seed=0)
  enc, paddings = random_inputs(seed=0, batch=2, frames=3)
  with pytest.raises(ValueError, match="beam_size"):
    beam_search(fns, enc, paddings, beam_size=0, max_output_length=4)
  with pytest.raises(ValueError, match="method must be one of"):
    beam_search(fns, enc, paddings, beam_size=2, max_output_length=4, method="onepass")
  with pytest.raises(ValueError, match="encoder_paddings"):
    beam_search(fns, enc, paddings[:, :2], beam_size=2, max_output_length=4)
  with pytest.raises(ValueError, match="max_symbols_per_frame"):
    greedy_decode(fns, enc, paddings, max_symbols_per_frame=0, max_output_length=4)
  with pytest.raises(ValueError, match="mode"):
    constant_fusion(5, np.zeros(5), mode="deep")
  with pytest.raises(ValueError, match="fusion_top_k"):
    beam_search(fns, enc, paddings, beam_size=2, max_output_length=4,
                fusion=constant_fusion(5, np.zeros(5)), fusion_top_k=5)
  for bad in (-0.5, float("nan"), float("inf"), True, "1"):
    with pytest.raises(ValueError, match="ilm_weight must be a finite number >= 0"):
      beam_search(fns, enc, paddings, beam_size=2, max_output_length=4, ilm_weight=bad)
