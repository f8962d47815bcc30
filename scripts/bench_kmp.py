r"""Per-beam-step cost of KMP phrase boosting (shallow fusion) vs no biasing and vs a Python
Aho-Corasick booster.

  python scripts/bench_kmp.py                         # 150, 3000 and 20000 phrases
  python scripts/bench_kmp.py --quick                 # 20 and 50 phrases, vocab 64 (smoke test)
  python scripts/bench_kmp.py --phrase_counts=1000 --output=/tmp/bench_kmp.json

The problem: --batch utterances x --beam hypotheses over a vocabulary of --vocab ids (0 =
blank), and a seeded random list of distinct phrases of --min_phrase_len..--max_phrase_len
tokens (ids 1..vocab - 1). A third of the phrases start with a prefix of an earlier phrase
(shared prefixes, as in lists of names). Single-token phrases are off by default: at 20000
phrases over 1023 ids most ids would be a whole phrase, so nearly every token would
complete one. Every hypothesis follows a scripted token stream in which half the tokens
continue a fragment of a phrase (so partial and full matches happen) and the other half
are random labels, a tenth of them blanks.

One beam step, three ways (the same inputs for all three):

  unbiased  what `beam_search` does per step without fusion: add the log-probs
            [batch, beam, vocab] to the scores and take the top --beam of beam x vocab.
  kmp       the same step with `kmp_fusion` in shallow mode (memlm_jax.decoding.kmp):
            token_bonus [batch, beam, vocab] added before the top-k, then the fusion state
            gathered by parent and advanced by the chosen tokens.
  baseline  the same jitted top-k step, with the bonuses computed on the host by a
            per-hypothesis Aho-Corasick booster written here in pure Python
            (`AhoCorasickBooster`): for each hypothesis, a loop over every vocabulary id
            (goto / failure-link walk), then an advance of each hypothesis by its token.

The tokens that advance the state come from the scripted streams (parents = each
hypothesis itself) rather than from the top-k of random log-probs, so that the match
states look like decoding; the top-k still runs and feeds the scores. The XLA cost of a
step does not depend on which tokens they are; the baseline's walks do.

unbiased and kmp run --steps steps inside one jitted lax.scan (as in the beam search);
their ms_per_step is the median of --repeats timed scans (after one untimed warm-up call,
compilation excluded) divided by --steps. The baseline runs one timed pass over the first
--baseline_steps steps (the same work per step, fewer steps: it is slow). Before timing,
the first --check_steps steps run through both boosters one step at a time and their
whole-vocabulary and advance bonuses are compared (`max_bonus_abs_diff`; exit status 1 if
they differ).

KMP over NAM's top K (--top_ks, default 16 and 32; empty to skip): a NAM filter keeps K of the N
phrases per utterance, and KMP then boosts only those. For each K, --batch random sets of K
distinct phrase indices (fewer than K phrases: the rest empty slots) gather the N-phrase table
to a batched [batch, K, ...] table (`kmp.select_phrases`, jitted; `gather_ms` is its median time,
paid once per utterance, not per step), and the same kmp scan runs on it (per-utterance tables:
the vmapped path of kmp_fusion). Printed as a second table beside the all-N kmp step; the
per-step XLA cost does not depend on which phrases are kept.

JSON (--output) is a list with one record per phrase count: phrases, ms_per_step,
unbiased_ms_per_step, baseline_ms_per_step, overhead_ratio (kmp / unbiased),
speedup_vs_baseline (baseline / kmp), beam, batch, vocab, max_phrase_len, chain_width,
top_k (one record per K: k, ms_per_step, speedup_vs_all (all-N kmp / top-K kmp),
overhead_ratio (top-K kmp / unbiased), gather_ms, ...) and extras. On a shared CPU the
absolute times are not performance claims: the ratios are what count, and the KMP step is
written for accelerators (a gather and a scatter-max over [hyps, phrases, chain] in
parallel), the baseline for nothing but a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections import deque
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from memlm_jax.decoding.kmp import PhraseTable, kmp_fusion, make_phrase_table, select_phrases  # noqa: E402
from memlm_jax.losses.rnnt import BLANK_ID  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Sizes of one benchmark run (see the module docstring)."""
  phrase_counts: tuple[int, ...] = (150, 3000, 20000)
  batch: int = 1
  beam: int = 8
  vocab: int = 1024
  min_phrase_len: int = 2
  max_phrase_len: int = 16
  steps: int = 200
  baseline_steps: int = 50
  check_steps: int = 3
  repeats: int = 5
  bonus_per_token: float = 1.5
  seed: int = 0
  top_ks: tuple[int, ...] = (16, 32)

  def __post_init__(self):
    positive = ("batch", "beam", "vocab", "min_phrase_len", "steps", "baseline_steps", "repeats")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if not self.phrase_counts or min(self.phrase_counts) < 1:
      raise ValueError(f"phrase_counts must be positive integers, got {self.phrase_counts}.")
    if self.vocab < 2:
      raise ValueError(f"vocab must be >= 2 (the blank and one label), got {self.vocab}.")
    if self.max_phrase_len < self.min_phrase_len:
      raise ValueError(f"max_phrase_len={self.max_phrase_len} is below min_phrase_len={self.min_phrase_len}.")
    if self.check_steps < 0:
      raise ValueError(f"check_steps must be >= 0, got {self.check_steps}.")
    if any(k < 1 for k in self.top_ks):
      raise ValueError(f"top_ks must be positive integers, got {self.top_ks}.")


QUICK_CONFIG = BenchConfig(phrase_counts=(20, 50), vocab=64, max_phrase_len=8, steps=3, baseline_steps=3,
                           check_steps=2, repeats=2, top_ks=(4, 8))

# Phrases and token streams.


def random_phrases(rng: np.random.Generator, count: int, vocab_size: int, min_len: int, max_len: int,
                   shared_prefix_fraction: float = 1 / 3) -> list[list[int]]:
  """`count` distinct phrases of min_len..max_len ids in [1, vocab_size); a shared_prefix_fraction of them
  start with a prefix of an earlier phrase."""
  seen, phrases = set(), []
  for _ in range(100 * count):
    if len(phrases) == count:
      return phrases
    length = int(rng.integers(min_len, max_len + 1))
    phrase = []
    if phrases and rng.random() < shared_prefix_fraction:
      base = phrases[rng.integers(len(phrases))]
      phrase = base[:int(rng.integers(1, min(len(base), length) + 1))]
    phrase = phrase + rng.integers(1, vocab_size, size=length - len(phrase)).tolist()
    if tuple(phrase) not in seen:
      seen.add(tuple(phrase))
      phrases.append(phrase)
  raise ValueError(f"could not draw {count} distinct phrases of {min_len}..{max_len} ids below {vocab_size}.")


def token_streams(rng: np.random.Generator, phrases: Sequence[Sequence[int]], steps: int, hyps: int,
                  vocab_size: int, blank_fraction: float = 0.1) -> np.ndarray:
  """Tokens [steps, hyps] int32: per hypothesis, alternately a fragment of a random phrase (the whole
  phrase half the time, else a random prefix) and as many random labels (blank_fraction of them blanks)."""
  streams = np.zeros((steps, hyps), np.int32)
  for h in range(hyps):
    stream = []
    while len(stream) < steps:
      phrase = phrases[rng.integers(len(phrases))]
      cut = len(phrase) if rng.random() < 0.5 else int(rng.integers(1, len(phrase) + 1))
      noise = rng.integers(1, vocab_size, size=cut)
      stream += list(phrase[:cut]) + np.where(rng.random(cut) < blank_fraction, BLANK_ID, noise).tolist()
    streams[:, h] = stream[:steps]
  return streams


# The baseline: a per-hypothesis Aho-Corasick booster in pure Python.


class AhoCorasickBooster:
  """KMP boosting's bonuses (memlm_jax.decoding.kmp, without prefixes) from an Aho-Corasick automaton
  in pure Python, one hypothesis at a time. A hypothesis's state is a trie node (int, 0 = root).

  The node is the longest suffix of the output since the last reset that is a prefix of
  some phrase, so for phrase b the KMP match length i_b is the depth of the deepest node on
  its failure chain that lies on P_b, and r = max_b w_b i_b is `potential[node]` (a max of
  depth * weight along the chain). A token whose new node has a phrase as a suffix (its
  output set is non-empty) completes those phrases: r(after) = max of w_b len(P_b) over
  them (`completion[node]`), and the state resets to the root. Blank: no change, no bonus.
  """

  def __init__(self, phrases: Sequence[Sequence[int]], bonus_per_token: float,
               weights: Sequence[float] | None = None):
    weights = [1.0] * len(phrases) if weights is None else [float(w) for w in weights]
    if len(weights) != len(phrases):
      raise ValueError(f"got {len(weights)} weights for {len(phrases)} phrases.")
    self.bonus_per_token = float(bonus_per_token)
    self.children: list[dict[int, int]] = [{}]
    depth, heaviest_through, ending = [0], [0.0], [0.0]
    for phrase, weight in zip(phrases, weights):
      if not phrase or min(phrase) < 1:
        raise ValueError(f"phrases must be non-empty lists of ids >= 1, got {list(phrase)}.")
      node = 0
      for token in phrase:
        if token not in self.children[node]:
          self.children[node][token] = len(self.children)
          self.children.append({})
          depth.append(depth[node] + 1)
          heaviest_through.append(0.0)
          ending.append(0.0)
        node = self.children[node][token]
        heaviest_through[node] = max(heaviest_through[node], weight)
      ending[node] = max(ending[node], weight * len(phrase))

    size = len(self.children)
    self.fail, self.completion, self.potential = [0] * size, [0.0] * size, [0.0] * size
    queue = deque([0])
    while queue:  # breadth first, so every failure target is finished before it is used
      parent = queue.popleft()
      for token, node in self.children[parent].items():
        target = self.fail[parent]
        while token not in self.children[target] and target != 0:
          target = self.fail[target]
        target = self.children[target].get(token, 0)
        target = 0 if target == node else target  # a child of the root fails to the root
        self.fail[node] = target
        self.completion[node] = max(ending[node], self.completion[target])
        self.potential[node] = max(depth[node] * heaviest_through[node], self.potential[target])
        queue.append(node)

  @property
  def num_nodes(self) -> int:
    return len(self.children)

  def goto(self, node: int, token: int) -> int:
    """The node after a label `token` (>= 1) at `node`, before any reset."""
    children, fail = self.children, self.fail
    while token not in children[node] and node != 0:
      node = fail[node]
    return children[node].get(token, 0)

  def token_bonus(self, node: int, vocab_size: int) -> list[float]:
    """Bonus of every id in [0, vocab_size) for the hypothesis at `node` (blank: 0)."""
    children, fail, completion, potential = self.children, self.fail, self.completion, self.potential
    before = potential[node]
    bonuses = [0.0] * vocab_size
    for token in range(1, vocab_size):
      state = node
      while token not in children[state] and state != 0:
        state = fail[state]
      state = children[state].get(token, 0)
      bonuses[token] = self.bonus_per_token * ((completion[state] or potential[state]) - before)
    return bonuses

  def advance(self, node: int, token: int) -> tuple[int, float]:
    """(new node, bonus earned) after `token` (blank: unchanged, 0)."""
    if token == BLANK_ID:
      return node, 0.0
    state = self.goto(node, int(token))
    completed = self.completion[state]
    bonus = self.bonus_per_token * ((completed or self.potential[state]) - self.potential[node])
    return (0 if completed else state), bonus

  def final_bonus(self, node: int) -> float:
    """End-of-utterance correction: cancels a pending partial match."""
    return -self.bonus_per_token * self.potential[node]


# One beam step, jitted.


def _beam_top_k(scores: jax.Array, logp: jax.Array, bonus: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """New scores [batch, beam] and parents [batch, beam]: the best beam of scores [batch, beam] + logp
  (+ bonus) [batch, beam, vocab], shifted so that the best is 0 (keeps long scans in range)."""
  batch, beam, vocab = logp.shape
  candidates = scores[..., None] + logp
  if bonus is not None:
    candidates = candidates + bonus
  top, flat_index = jax.lax.top_k(candidates.reshape(batch, beam * vocab), beam)
  return top - top[:, :1], flat_index // vocab


def unbiased_scan(scores: jax.Array, logp: jax.Array) -> jax.Array:
  """Scores [batch, beam] after steps of logp [steps, batch, beam, vocab] without fusion."""
  def step(scores, logp_t):
    return _beam_top_k(scores, logp_t, None)[0], None
  return jax.lax.scan(step, scores, logp)[0]


def fused_scan(table: PhraseTable, state: Any, scores: jax.Array, logp: jax.Array, tokens: jax.Array,
               lineage: jax.Array, *, bonus_per_token: float) -> tuple[Any, jax.Array]:
  """(fusion state, scores) after steps of shallow KMP fusion (`kmp_fusion(table, bonus_per_token)`).

  Args:
    table: the phrases (an argument rather than a constant of the compiled scan, as in a server).
    state: fusion state, leaves [batch, beam, ...]; scores: [batch, beam].
    logp: [steps, batch, beam, vocab]; tokens: [steps, batch, beam] int32, the tokens that advance the state.
    lineage: [batch, beam] int32, the parent each hypothesis's state is gathered from.
  """
  fusion = kmp_fusion(table, bonus_per_token)
  rows = jnp.arange(scores.shape[0])[:, None]

  def step(carry, inputs):
    state, scores = carry
    logp_t, tokens_t = inputs
    scores, _ = _beam_top_k(scores, logp_t, fusion.token_bonus(state))
    state = jax.tree.map(lambda x: x[rows, lineage], state)
    state, _ = fusion.advance(state, tokens_t)
    return (state, scores), None

  return jax.lax.scan(step, (state, scores), (logp, tokens))[0]


def _timed_ms(fn, args: tuple, repeats: int) -> tuple[list[float], float]:
  """(milliseconds of each of `repeats` calls, compile seconds) of jax.jit(fn)(*args), after a warm-up."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(1000 * (time.perf_counter() - start))
  return times, compile_s


def baseline_pass(booster: AhoCorasickBooster, scores: np.ndarray, logp: np.ndarray, tokens: np.ndarray) -> float:
  """Milliseconds of the baseline over logp [steps, batch, beam, vocab] and tokens [steps, batch, beam]: per
  step the host bonuses of every hypothesis, the jitted top-k step, the host advances."""
  steps, batch, beam, vocab = logp.shape
  top_k_step = jax.jit(lambda s, l, b: _beam_top_k(s, l, b)[0])
  jax.block_until_ready(top_k_step(scores, logp[0], np.zeros(logp.shape[1:], np.float32)))  # compile
  nodes = [[0] * beam for _ in range(batch)]
  start = time.perf_counter()
  for t in range(steps):
    bonus = np.array([[booster.token_bonus(node, vocab) for node in row] for row in nodes], np.float32)
    scores = jax.block_until_ready(top_k_step(scores, logp[t], bonus))
    nodes = [[booster.advance(node, token)[0] for node, token in zip(row, row_tokens)]
             for row, row_tokens in zip(nodes, tokens[t].tolist())]
  return 1000 * (time.perf_counter() - start)


def stream_statistics(booster: AhoCorasickBooster, tokens: np.ndarray) -> dict:
  """How much matching the streams tokens [steps, hyps] do: completed phrases and the mean match length
  r (unit weights) per hypothesis step."""
  completed, matched = 0, 0.0
  for column in tokens.T.tolist():
    node = 0
    for token in column:
      if token != BLANK_ID:
        completed += booster.completion[booster.goto(node, token)] > 0
      node = booster.advance(node, token)[0]
      matched += booster.potential[node]
  steps = tokens.size
  return {"completions_per_hyp_step": completed / steps, "mean_match_length": matched / steps}


def bonus_disagreement(table: PhraseTable, booster: AhoCorasickBooster, tokens: np.ndarray) -> float:
  """Largest |KMP - baseline| of the whole-vocabulary and the advance bonuses over tokens
  [steps, batch, beam], one step at a time (0.0 for no steps); KMP = kmp_fusion(table, the booster's delta)."""
  steps, batch, beam = tokens.shape
  vocab, fusion = table.vocab_size, kmp_fusion(table, booster.bonus_per_token)
  token_bonus = jax.jit(lambda table, state: kmp_fusion(table, booster.bonus_per_token).token_bonus(state))
  advance = jax.jit(lambda table, state, tokens: kmp_fusion(table, booster.bonus_per_token).advance(state, tokens))
  state = fusion.init(batch, beam)
  nodes = [0] * (batch * beam)
  worst = 0.0
  for t in range(steps):
    want = np.array([booster.token_bonus(node, vocab) for node in nodes]).reshape(batch, beam, vocab)
    worst = max(worst, float(np.abs(np.asarray(token_bonus(table, state)) - want).max()))
    state, earned = advance(table, state, jnp.asarray(tokens[t]))
    stepped = [booster.advance(node, token) for node, token in zip(nodes, tokens[t].reshape(-1).tolist())]
    nodes = [node for node, _ in stepped]
    want_earned = np.array([bonus for _, bonus in stepped]).reshape(batch, beam)
    worst = max(worst, float(np.abs(np.asarray(earned) - want_earned).max()))
  return worst


# KMP over NAM's top K.


def top_k_indices(rng: np.random.Generator, batch: int, phrases: int, k: int) -> np.ndarray:
  """[batch, k] int32: per utterance min(k, phrases) distinct random phrase indices, then -1 (empty slots)."""
  kept = min(k, phrases)
  rows = [np.concatenate([rng.choice(phrases, kept, replace=False), np.full(k - kept, -1)]) for _ in range(batch)]
  return np.stack(rows).astype(np.int32)


def bench_top_k(config: BenchConfig, table: PhraseTable, scores: np.ndarray, run_logp: jax.Array,
                run_tokens: jax.Array, lineage: jax.Array, all_ms_per_step: float, unbiased_ms_per_step: float,
                k: int) -> dict:
  """The kmp scan on the table gathered to K phrases per utterance; the record of the module docstring."""
  phrases = table.lengths.shape[0]
  indices = jnp.asarray(top_k_indices(np.random.default_rng([config.seed, phrases, k]), config.batch, phrases, k))
  batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (config.batch,) + x.shape), table)
  gather_ms, gather_compile_s = _timed_ms(select_phrases, (batched, indices), config.repeats)
  top_table = jax.jit(select_phrases)(batched, indices)
  initial_state = kmp_fusion(top_table, config.bonus_per_token).init(config.batch, config.beam)
  fused_ms, compile_s = _timed_ms(
      functools.partial(fused_scan, bonus_per_token=config.bonus_per_token),
      (top_table, initial_state, jnp.asarray(scores), run_logp, run_tokens, lineage), config.repeats)
  ms_per_step = statistics.median(fused_ms) / config.steps
  return {"k": k, "ms_per_step": ms_per_step, "speedup_vs_all": all_ms_per_step / ms_per_step,
          "overhead_ratio": ms_per_step / unbiased_ms_per_step, "gather_ms": statistics.median(gather_ms),
          "all_ms_per_step": [t / config.steps for t in fused_ms], "all_gather_ms": gather_ms,
          "compile_s": compile_s, "gather_compile_s": gather_compile_s}


# One record per phrase count.


def bench_phrase_count(config: BenchConfig, count: int) -> dict:
  """Times the three steps for `count` phrases; the record of the module docstring."""
  rng = np.random.default_rng([config.seed, count])
  phrases = random_phrases(rng, count, config.vocab, config.min_phrase_len, config.max_phrase_len)
  hyps = config.batch * config.beam
  steps = max(config.steps, config.baseline_steps, config.check_steps)
  tokens = token_streams(rng, phrases, steps, hyps, config.vocab).reshape(steps, config.batch, config.beam)
  logits = rng.normal(size=(steps, config.batch, config.beam, config.vocab))
  logp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
  scores = np.zeros((config.batch, config.beam), np.float32)

  start = time.perf_counter()
  table = make_phrase_table(phrases, config.vocab, max_phrase_length=config.max_phrase_len)
  table_build_s = time.perf_counter() - start
  start = time.perf_counter()
  booster = AhoCorasickBooster(phrases, config.bonus_per_token)
  baseline_build_s = time.perf_counter() - start

  max_diff = bonus_disagreement(table, booster, tokens[:config.check_steps])

  run_logp, run_tokens = jnp.asarray(logp[:config.steps]), jnp.asarray(tokens[:config.steps])
  lineage = jnp.broadcast_to(jnp.arange(config.beam, dtype=jnp.int32), (config.batch, config.beam))
  unbiased_ms, unbiased_compile_s = _timed_ms(unbiased_scan, (jnp.asarray(scores), run_logp), config.repeats)
  initial_state = kmp_fusion(table, config.bonus_per_token).init(config.batch, config.beam)
  fused_ms, fused_compile_s = _timed_ms(
      functools.partial(fused_scan, bonus_per_token=config.bonus_per_token),
      (table, initial_state, jnp.asarray(scores), run_logp, run_tokens, lineage), config.repeats)
  baseline_ms = baseline_pass(booster, scores, logp[:config.baseline_steps], tokens[:config.baseline_steps])

  ms_per_step = statistics.median(fused_ms) / config.steps
  unbiased_ms_per_step = statistics.median(unbiased_ms) / config.steps
  top_k = [bench_top_k(config, table, scores, run_logp, run_tokens, lineage, ms_per_step, unbiased_ms_per_step, k)
           for k in config.top_ks]
  baseline_ms_per_step = baseline_ms / config.baseline_steps
  return {
      "phrases": len(phrases), "ms_per_step": ms_per_step, "unbiased_ms_per_step": unbiased_ms_per_step,
      "baseline_ms_per_step": baseline_ms_per_step, "overhead_ratio": ms_per_step / unbiased_ms_per_step,
      "speedup_vs_baseline": baseline_ms_per_step / ms_per_step,
      "beam": config.beam, "batch": config.batch, "vocab": config.vocab, "min_phrase_len": config.min_phrase_len,
      "max_phrase_len": config.max_phrase_len, "chain_width": table.chain_width,
      "phrase_tokens": sum(map(len, phrases)), "trie_nodes": booster.num_nodes,
      "bonus_per_token": config.bonus_per_token, "steps": config.steps, "repeats": config.repeats,
      "baseline_steps": config.baseline_steps, "check_steps": config.check_steps,
      "all_ms_per_step": [t / config.steps for t in fused_ms],
      "all_unbiased_ms_per_step": [t / config.steps for t in unbiased_ms],
      "max_bonus_abs_diff": max_diff, **stream_statistics(booster, tokens[:config.steps].reshape(config.steps, -1)),
      "compile_s": fused_compile_s, "unbiased_compile_s": unbiased_compile_s, "table_build_s": table_build_s,
      "baseline_build_s": baseline_build_s, "backend": jax.default_backend(), "seed": config.seed,
      "top_k": top_k,
  }


def run_benchmark(config: BenchConfig, log=print) -> list[dict]:
  """One record per phrase count of config, logged as they finish."""
  records = []
  for count in config.phrase_counts:
    record = bench_phrase_count(config, count)
    records.append(record)
    log(f"[{count} phrases] kmp {record['ms_per_step']:.3f} ms/step, unbiased {record['unbiased_ms_per_step']:.3f}, "
        f"baseline {record['baseline_ms_per_step']:.3f} (bonus diff {record['max_bonus_abs_diff']:.2g})")
    for top in record["top_k"]:
      log(f"[{count} phrases, top {top['k']}] kmp {top['ms_per_step']:.3f} ms/step (all / top-K "
          f"{top['speedup_vs_all']:.1f}), gather {top['gather_ms']:.3f} ms once per utterance")
  return records


def bonus_tolerance(config: BenchConfig) -> float:
  """Allowed |KMP - baseline| bonus difference: float32 rounding of delta * max_phrase_len."""
  return 1e-5 * max(1.0, config.bonus_per_token * config.max_phrase_len)


def table(records: list[dict]) -> str:
  """Markdown table of the records."""
  header = ["phrases", "chain width", "kmp ms/step", "unbiased ms/step", "baseline ms/step",
            "overhead (kmp / unbiased)", "speedup (baseline / kmp)", "max bonus diff"]
  rows = [[str(r["phrases"]), str(r["chain_width"]), f"{r['ms_per_step']:.3f}", f"{r['unbiased_ms_per_step']:.3f}",
           f"{r['baseline_ms_per_step']:.3f}", f"{r['overhead_ratio']:.2f}", f"{r['speedup_vs_baseline']:.2f}",
           f"{r['max_bonus_abs_diff']:.2g}"] for r in records]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def top_k_table(records: list[dict]) -> str:
  """Markdown table of KMP over NAM's top K: one row per (phrase count, K)."""
  header = ["phrases", "K", "kmp all ms/step", "kmp top-K ms/step", "speedup (all / top-K)",
            "overhead (top-K / unbiased)", "gather ms (once per utterance)"]
  rows = [[str(r["phrases"]), str(t["k"]), f"{r['ms_per_step']:.3f}", f"{t['ms_per_step']:.3f}",
           f"{t['speedup_vs_all']:.1f}", f"{t['overhead_ratio']:.2f}", f"{t['gather_ms']:.3f}"]
          for r in records for t in r.get("top_k", [])]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


# Command line. The flags are defined only when this file runs as a script, so that tests can import it
# next to the other bench scripts (absl refuses a flag name defined by two modules).


def _define_flags() -> dict:
  defaults = BenchConfig()
  return {
      "phrase_counts": flags.DEFINE_list("phrase_counts", [str(n) for n in defaults.phrase_counts],
                                         "Phrase list sizes, one record each."),
      "batch": flags.DEFINE_integer("batch", defaults.batch, "Utterances per step."),
      "beam": flags.DEFINE_integer("beam", defaults.beam, "Hypotheses per utterance."),
      "vocab": flags.DEFINE_integer("vocab", defaults.vocab, "Vocabulary size, blank (id 0) included."),
      "min_phrase_len": flags.DEFINE_integer("min_phrase_len", defaults.min_phrase_len, "Shortest phrase."),
      "max_phrase_len": flags.DEFINE_integer("max_phrase_len", defaults.max_phrase_len, "Longest phrase."),
      "steps": flags.DEFINE_integer("steps", defaults.steps, "Beam steps per timed scan."),
      "baseline_steps": flags.DEFINE_integer("baseline_steps", defaults.baseline_steps,
                                             "Beam steps of the one timed baseline pass."),
      "check_steps": flags.DEFINE_integer("check_steps", defaults.check_steps,
                                          "Steps on which KMP and baseline bonuses are compared."),
      "repeats": flags.DEFINE_integer("repeats", defaults.repeats, "Timed scans per step kind (median counts)."),
      "bonus_per_token": flags.DEFINE_float("bonus_per_token", defaults.bonus_per_token, "KMP delta."),
      "seed": flags.DEFINE_integer("seed", defaults.seed, "Seed for phrases, streams and log-probs."),
      "top_ks": flags.DEFINE_list("top_ks", [str(k) for k in defaults.top_ks],
                                  "K values of KMP over NAM's top K (phrases gathered per utterance); empty: skip."),
      "quick": flags.DEFINE_bool("quick", False, f"Smoke test sizes {QUICK_CONFIG} (override the size flags)."),
      "output": flags.DEFINE_string("output", "results/bench_kmp.json", "Where the JSON records go ('' for none)."),
  }


def _config(values: dict) -> BenchConfig:
  if values["quick"].value:
    return QUICK_CONFIG
  fields = {name: values[name].value for name in BenchConfig.__dataclass_fields__}
  try:
    fields["phrase_counts"] = tuple(int(n) for n in fields["phrase_counts"])
    fields["top_ks"] = tuple(int(k) for k in fields["top_ks"])
    return BenchConfig(**fields)
  except ValueError as error:
    raise app.UsageError(str(error)) from error


def main(argv, values: dict) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _config(values)
  records = run_benchmark(config)
  print(f"\njax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs); batch {config.batch}, beam "
        f"{config.beam}, vocab {config.vocab}, phrases of {config.min_phrase_len}..{config.max_phrase_len} tokens, "
        f"delta {config.bonus_per_token}. kmp and unbiased: median of {config.repeats} jitted scans of "
        f"{config.steps} steps (compilation excluded); baseline (pure-Python Aho-Corasick bonuses, one hypothesis "
        f"and one vocabulary id at a time): one pass over the first {config.baseline_steps} steps, the same work "
        "per step. The ratios are what count; absolute CPU times are not performance claims.\n")
  print(table(records))
  tolerance = bonus_tolerance(config)
  agree = all(r["max_bonus_abs_diff"] <= tolerance for r in records)
  print(f"\nbonus check (KMP vs baseline on the first {config.check_steps} steps, tolerance {tolerance:.2g}): "
        f"{'PASS' if agree else 'FAIL'}")
  if config.top_ks:
    print(f"\nKMP over NAM's top K: the phrase table gathered to K phrases per utterance (random indices; the "
          "per-step cost does not depend on which), the same jitted scan; the gather runs once per utterance.\n")
    print(top_k_table(records))
  if values["output"].value:
    os.makedirs(os.path.dirname(os.path.abspath(values["output"].value)), exist_ok=True)
    with open(values["output"].value, "w") as f:
      json.dump(records, f, indent=2)
    print(f"wrote {values['output'].value}")
  return 0 if agree else 1


if __name__ == "__main__":
  _FLAG_VALUES = _define_flags()
  app.run(lambda argv: main(argv, _FLAG_VALUES))
