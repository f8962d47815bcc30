"""scripts/bench_kmp.py: its Aho-Corasick baseline against kmp.py and naive string matching, its scans on
both backends, and the --quick run's JSON."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm_jax.decoding.aho_corasick import make_automaton
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


def test_decode_step_sizes_are_the_tiny_transducers():
  with open(os.path.join(lm_runs.REPO, "configs", "tiny", "transducer.gin")) as f:
    bindings = dict(re.findall(r"^(\w+\.\w+)\s*=\s*(\S+)", f.read(), re.M))
  defaults = bench_kmp.BenchConfig()
  assert int(bindings["ConformerEncoder.model_dim"]) == defaults.encoder_dim
  assert int(bindings["LstmPredictor.embed_dim"]) == int(bindings["LstmPredictor.hidden_dim"]) == defaults.predictor_dim
  assert int(bindings["JointNetwork.joint_dim"]) == defaults.joint_dim


def test_scans_give_both_backends_the_same_scores():
  """The timed scans run KMP and Aho-Corasick on the same inputs: equal bonuses, so equal beam scores (and not
  the unbiased ones)."""
  config = bench_kmp.BenchConfig(vocab=16, beam=4, batch=2, max_phrase_len=5, steps=12, encoder_dim=8,
                                 predictor_dim=8, joint_dim=8)
  rng = np.random.default_rng(7)
  phrases = bench_kmp.random_phrases(rng, 12, config.vocab, 2, config.max_phrase_len)
  tokens = jnp.asarray(bench_kmp.token_streams(rng, phrases, config.steps, 8, config.vocab).reshape(config.steps, 2, 4))
  logp = jnp.asarray(jax.nn.log_softmax(rng.normal(size=(config.steps, 2, 4, config.vocab)), -1), jnp.float32)
  frames = jnp.asarray(rng.normal(size=(config.steps, 2, config.encoder_dim)), jnp.float32)
  lineage, scores = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4)), jnp.zeros((2, 4), jnp.float32)
  tables = {"kmp": make_phrase_table(phrases, config.vocab), "ac": make_automaton(phrases, config.vocab)}
  graphdef, params = bench_kmp.make_decoder_parts(config)
  parts = nnx.merge(graphdef, params)
  pred_out, pred_state = parts.predictor.step(parts.predictor.init_state(8), jnp.zeros((8,), jnp.int32))
  pred_out, pred_state = jax.tree.map(lambda x: x.reshape((2, 4) + x.shape[1:]), (pred_out, pred_state))
  synthetic, decoded = {}, {}
  for name, table in tables.items():
    fusion_fn = bench_kmp.BACKENDS[name]
    state = fusion_fn(table, 1.5).init(2, 4)
    synthetic[name] = bench_kmp.fused_scan(table, state, scores, logp, tokens, lineage, bonus_per_token=1.5,
                                           fusion_fn=fusion_fn)[1]
    decoded[name] = bench_kmp.decode_scan(params, table, state, pred_state, pred_out, scores, frames, tokens, lineage,
                                          graphdef=graphdef, fusion_fn=fusion_fn, bonus_per_token=1.5)
  np.testing.assert_allclose(synthetic["ac"], synthetic["kmp"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(decoded["ac"][3], decoded["kmp"][3], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(decoded["ac"][2], decoded["kmp"][2])  # the predictor saw the same tokens
  unbiased = bench_kmp.decode_scan(params, None, (), pred_state, pred_out, scores, frames, tokens, lineage,
                                   graphdef=graphdef)
  np.testing.assert_array_equal(unbiased[2], decoded["ac"][2])
  assert not np.allclose(unbiased[3], decoded["ac"][3])  # the streams complete phrases: the bonuses count


def test_bench_kmp_quick_writes_consistent_records(tmp_path):
  out = tmp_path / "bench_kmp.json"
  result = subprocess.run([sys.executable, "scripts/bench_kmp.py", "--quick", f"--output={out}"], cwd=lm_runs.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.loads(out.read_text())
  quick = bench_kmp.QUICK_CONFIG
  assert [r["phrases"] for r in records] == list(quick.phrase_counts)
  timed = [quick.times_kmp(r["phrases"]) for r in records]
  assert any(timed) and not all(timed)  # the smoke test runs both paths
  for r, kmp_timed in zip(records, timed):
    assert (r["beam"], r["batch"], r["vocab"], r["max_phrase_len"]) == (quick.beam, quick.batch, quick.vocab,
                                                                        quick.max_phrase_len)
    assert r["chain_width"] >= 1 and r["ac_fanout_width"] >= 1 and r["ac_max_depth"] == quick.max_phrase_len
    assert r["ac_num_nodes"] >= r["trie_nodes"] > 1
    assert min(r["unbiased_ms_per_step"], r["baseline_ms_per_step"]) > 0
    assert 0 < r["baseline_host_ms_per_step"] < r["baseline_ms_per_step"]
    added = r["decode_step"]["ac_ms_per_step"] - r["decode_step"]["unbiased_ms_per_step"]
    assert r["decode_step"]["ac_boosting_ms_per_step"] == pytest.approx(added)
    assert r["ac_boosting_speedup_vs_baseline"] == (pytest.approx(r["baseline_host_ms_per_step"] / added) if added > 0
                                                    else None)
    for name in ("kmp", "ac") if kmp_timed else ("ac",):
      ms = r[f"{name}_ms_per_step"]
      assert ms > 0 and ms == pytest.approx(np.median(r[f"all_{name}_ms_per_step"]))
      assert r[f"{name}_overhead_ratio"] == pytest.approx(ms / r["unbiased_ms_per_step"])
      assert r[f"{name}_speedup_vs_baseline"] == pytest.approx(r["baseline_ms_per_step"] / ms)
    if kmp_timed:
      assert r["kmp_skipped"] is None
      assert r["ac_vs_kmp_speedup"] == pytest.approx(r["kmp_ms_per_step"] / r["ac_ms_per_step"])
    else:
      assert "kmp_max_phrases" in r["kmp_skipped"]
      assert r["kmp_ms_per_step"] is r["kmp_overhead_ratio"] is r["ac_vs_kmp_speedup"] is None
    # Build times and device memory, the latter against the tables built again here.
    assert min(r["kmp_build_s"], r["ac_build_s"], r["kmp_rebuild_s"], r["ac_rebuild_s"]) > 0
    assert r["baseline_build_s"] >= 0
    phrases = bench_kmp.random_phrases(np.random.default_rng([quick.seed, r["phrases"]]), r["phrases"], quick.vocab,
                                       quick.min_phrase_len, quick.max_phrase_len)
    kmp_table = make_phrase_table(phrases, quick.vocab, max_phrase_length=quick.max_phrase_len)
    automaton = make_automaton(phrases, quick.vocab, max_phrase_length=quick.max_phrase_len)
    assert r["kmp_table_mib"] * 2**20 == pytest.approx(sum(x.nbytes for x in jax.tree.leaves(kmp_table)))
    assert r["ac_table_mib"] * 2**20 == pytest.approx(automaton.nbytes) and automaton.nbytes > 0
    # The bonus check: every pair of boosters agrees.
    for pair in ("kmp_baseline", "ac_baseline", "ac_kmp"):
      assert 0 <= r[f"{pair}_bonus_diff"] <= r["max_bonus_abs_diff"] <= bench_kmp.bonus_tolerance(quick)
    decode = r["decode_step"]
    assert (decode["encoder_dim"], decode["predictor_dim"], decode["joint_dim"]) == (quick.encoder_dim,
                                                                                    quick.predictor_dim,
                                                                                    quick.joint_dim)
    for name in ("kmp", "ac") if kmp_timed else ("ac",):
      assert decode[f"{name}_ms_per_step"] > 0
      assert decode[f"{name}_overhead_ratio"] == pytest.approx(decode[f"{name}_ms_per_step"]
                                                               / decode["unbiased_ms_per_step"])
    assert (decode["kmp_ms_per_step"] is None) == (not kmp_timed)
    assert [t["k"] for t in r["top_k"]] == list(quick.top_ks)
    assert all((t["speedup_vs_all"] is None) == (not kmp_timed) and t["ms_per_step"] > 0 for t in r["top_k"])
  for text in ("| phrases |", "bonus check", "PASS", "Decode step", "kmp not timed at 50 phrases", "ac at 20 phrases"):
    assert text in result.stdout, text
