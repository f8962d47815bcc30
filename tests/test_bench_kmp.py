"""scripts/bench_kmp.py: its Aho-Corasick baseline against kmp.py and naive string matching, and the
--quick run's JSON."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from memlm_jax.decoding.kmp import KmpBooster, make_phrase_table
from scripts import bench_kmp
from tests import lm_runs


def naive_sequence_bonuses(phrases, weights, delta, tokens):
  """Bonus of each token (then the final correction) by comparing strings: r = max_b w_b * (longest suffix of
  the output since the last reset that is a prefix of P_b); a completed phrase pays max w_b len(P_b), resets."""
  def longest(phrase, history):
    return max(k for k in range(min(len(phrase), len(history)) + 1) if history[len(history) - k:] == phrase[:k])

  def raw(history):
    return max(w * longest(p, history) for p, w in zip(phrases, weights))

  history, out = [], []
  for token in tokens:
    if token == 0:
      out.append(0.0)
      continue
    before, history = raw(history), history + [token]
    completed = [w * len(p) for p, w in zip(phrases, weights) if history[len(history) - len(p):] == p]
    out.append(delta * ((max(completed) if completed else raw(history)) - before))
    history = [] if completed else history
  return out + [-delta * raw(history)]


def small_case(seed, hyps=4, steps=150):
  """Overlapping phrases over 5 labels, random weights, and streams [steps, hyps] that hit them."""
  rng = np.random.default_rng(seed)
  phrases = bench_kmp.random_phrases(rng, int(rng.integers(2, 7)), 6, 1, 5, shared_prefix_fraction=0.5)
  weights = rng.uniform(0.5, 2.0, len(phrases)).tolist()
  return phrases, weights, bench_kmp.token_streams(rng, phrases, steps, hyps, 6, blank_fraction=0.2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_baseline_computes_the_kmp_bonuses(seed):
  phrases, weights, tokens = small_case(seed)
  delta = 1.3
  table = make_phrase_table(phrases, 6, weights=weights, max_phrase_length=5, chain_width=5)
  token_bonus = jax.jit(lambda table, state: KmpBooster(table, delta).token_bonus(state))
  advance = jax.jit(lambda table, state, tokens: KmpBooster(table, delta).advance(state, tokens))
  potential = jax.jit(lambda table, state: KmpBooster(table, delta).potential(state))
  booster = bench_kmp.AhoCorasickBooster(phrases, delta, weights)
  state, nodes = KmpBooster(table, delta).init((tokens.shape[1],)), [0] * tokens.shape[1]
  for step_tokens in tokens:
    want = [booster.token_bonus(node, 6) for node in nodes]
    np.testing.assert_allclose(token_bonus(table, state), want, rtol=1e-5, atol=1e-5)
    state, earned = advance(table, state, step_tokens)
    stepped = [booster.advance(node, int(t)) for node, t in zip(nodes, step_tokens)]
    nodes = [node for node, _ in stepped]
    np.testing.assert_allclose(earned, [bonus for _, bonus in stepped], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(-np.asarray(potential(table, state)), [booster.final_bonus(n) for n in nodes],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [3, 4])
def test_baseline_matches_naive_string_matching(seed):
  phrases, weights, tokens = small_case(seed, hyps=2, steps=60)
  booster = bench_kmp.AhoCorasickBooster(phrases, 0.7, weights)
  for column in tokens.T.tolist():
    node, got = 0, []
    for token in column:
      node, bonus = booster.advance(node, token)
      got.append(bonus)
    got.append(booster.final_bonus(node))
    np.testing.assert_allclose(got, naive_sequence_bonuses(phrases, weights, 0.7, column), atol=1e-9)


def test_phrases_and_streams_are_as_described():
  rng = np.random.default_rng(5)
  phrases = bench_kmp.random_phrases(rng, 300, 50, 2, 9)
  assert len(phrases) == 300 and len({tuple(p) for p in phrases}) == 300
  assert all(2 <= len(p) <= 9 and all(1 <= t < 50 for t in p) for p in phrases)
  first_tokens = [p[0] for p in phrases]
  assert len(set(first_tokens)) < 200  # shared prefixes: far fewer distinct first tokens than a uniform draw
  tokens = bench_kmp.token_streams(rng, phrases, 400, 3, 50)
  assert tokens.shape == (400, 3) and tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 50
  stats = bench_kmp.stream_statistics(bench_kmp.AhoCorasickBooster(phrases, 1.0), tokens)
  assert stats["completions_per_hyp_step"] > 0.01 and stats["mean_match_length"] > 0.5
  with pytest.raises(ValueError, match="distinct phrases"):
    bench_kmp.random_phrases(rng, 5, 3, 1, 1)  # only ids 1 and 2 exist
  with pytest.raises(ValueError, match="max_phrase_len=1"):
    bench_kmp.BenchConfig(min_phrase_len=2, max_phrase_len=1)
  with pytest.raises(ValueError, match="ids >= 1"):
    bench_kmp.AhoCorasickBooster([[1, 0]], 1.0)


def test_bench_kmp_quick_writes_consistent_records(tmp_path):
  out = tmp_path / "bench_kmp.json"
  result = subprocess.run([sys.executable, "scripts/bench_kmp.py", "--quick", f"--output={out}"], cwd=lm_runs.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.loads(out.read_text())
  quick = bench_kmp.QUICK_CONFIG
  assert [r["phrases"] for r in records] == list(quick.phrase_counts)
  for r in records:
    assert (r["beam"], r["batch"], r["vocab"], r["max_phrase_len"]) == (quick.beam, quick.batch, quick.vocab,
                                                                        quick.max_phrase_len)
    assert r["chain_width"] >= 1
    assert min(r["ms_per_step"], r["unbiased_ms_per_step"], r["baseline_ms_per_step"]) > 0
    assert r["ms_per_step"] == pytest.approx(np.median(r["all_ms_per_step"]))
    assert r["overhead_ratio"] == pytest.approx(r["ms_per_step"] / r["unbiased_ms_per_step"])
    assert r["speedup_vs_baseline"] == pytest.approx(r["baseline_ms_per_step"] / r["ms_per_step"])
    assert r["max_bonus_abs_diff"] <= bench_kmp.bonus_tolerance(quick)
  assert "| phrases |" in result.stdout and "bonus check" in result.stdout and "PASS" in result.stdout
