r"""Per-beam-step cost of phrase boosting (shallow fusion) with its two backends, KMP
(memlm_jax.decoding.kmp) and Aho-Corasick (memlm_jax.decoding.aho_corasick), vs no biasing and vs a
pure-Python Aho-Corasick booster; the build time and device memory of their tables; and the same
overheads on a decode step of the tiny transducer.

  python scripts/bench_kmp.py                     # 150, 3000, 20000, 100000 phrases (KMP timed up to 20000)
  python scripts/bench_kmp.py --quick             # 20 and 50 phrases, vocab 64 (smoke test; KMP timed at 20)
  python scripts/bench_kmp.py --phrase_counts=1000 --kmp_max_phrases=1000 --output=/tmp/bench_kmp.json

The problem: --batch utterances x --beam hypotheses over a vocabulary of --vocab ids (0 =
blank), and a seeded random list of distinct phrases of --min_phrase_len..--max_phrase_len
tokens (ids 1..vocab - 1). A third of the phrases start with a prefix of an earlier phrase
(shared prefixes, as in lists of names). Single-token phrases are off by default: at 20000
phrases over 1023 ids most ids would be a whole phrase, so nearly every token would
complete one. Every hypothesis follows a scripted token stream in which half the tokens
continue a fragment of a phrase (so partial and full matches happen) and the other half
are random labels, a tenth of them blanks.

One beam step, four ways (the same inputs for all four):

  unbiased  what `beam_search` does per step without fusion: add the log-probs
            [batch, beam, vocab] to the scores and take the top --beam of beam x vocab.
  kmp       the same step with `kmp_fusion` in shallow mode (memlm_jax.decoding.kmp):
            token_bonus [batch, beam, vocab] added before the top-k, then the fusion state
            gathered by parent and advanced by the chosen tokens. Per step a gather and two
            scatter-maxes over [hyps, phrases, chain]: the cost grows with the phrases.
  ac        the same step with `automaton_fusion` (memlm_jax.decoding.aho_corasick): the same
            bonuses from one automaton node per hypothesis (a failure-chain walk of at most
            --max_phrase_len nodes and a scatter of their children); the cost is set by the
            longest phrase and the widest trie node, not by the number of phrases.
  baseline  the same jitted top-k step, with the bonuses computed on the host by a
            per-hypothesis Aho-Corasick booster written here in pure Python
            (`AhoCorasickBooster`): for each hypothesis, a loop over every vocabulary id
            (goto / failure-link walk), then an advance of each hypothesis by its token.

The tokens that advance the state come from the scripted streams (parents = each
hypothesis itself) rather than from the top-k of random log-probs, so that the match
states look like decoding; the top-k still runs and feeds the scores. The XLA cost of a
step does not depend on which tokens they are; the baseline's walks do.

unbiased, kmp and ac run --steps steps inside one jitted lax.scan (as in the beam search);
their ms_per_step is the median of --repeats timed scans (after one untimed warm-up call,
compilation excluded) divided by --steps. The baseline runs one timed pass over the first
--baseline_steps steps (the same work per step, fewer steps: it is slow). Its step holds the
unbiased top-k, so baseline / ac is at most baseline / unbiased (on a CPU, where the top-k of
beam x vocab is slow, that cap is low); `baseline_host_ms_per_step` is its boosting alone.
Above --kmp_max_phrases phrases (default 20000) the kmp scans are skipped (null in the JSON,
"-" in the tables, the reason in `kmp_skipped`) so that one run up to 100000 phrases stays
within minutes on a CPU; its table is still built, sized and checked.

Bonus check: before timing, the first --check_steps steps run through the three boosters one
step at a time, and the whole-vocabulary and advance bonuses of each pair (kmp / baseline,
ac / baseline, ac / kmp) are compared; exit status 1 if any pair differs by more than float32
rounding (`bonus_tolerance`).

Tables: host build time in seconds of each backend's public builder, from token lists to
arrays on the device (`make_phrase_table`, `make_automaton`; the baseline's `AhoCorasickBooster`
for reference), first as a new list (what a new list costs: jnp.asarray compiles a copy per
new array shape) and again for the same list; and the device memory of the arrays in MiB (the
sum of their nbytes).

Decode step (--decode, on by default): the same comparison on what `beam_search` does per
expansion step of the tiny transducer, the sizes of configs/tiny/transducer.gin (encoder dim
--encoder_dim 96, an LstmPredictor of --predictor_dim 128 embedding and hidden units, a
JointNetwork of --joint_dim 128), built from the model classes of
memlm_jax/models/transducer_parts.py with random init (no checkpoint; the cost does not depend
on the weights). Per step: the joint of one random encoder frame with every hypothesis's
predictor output, log_softmax, (+ the fusion's token_bonus), the top --beam of beam x vocab,
then the states gathered by parent, the predictor stepped on the emitted tokens and (fused) the
fusion advanced, each kept where the token is blank (as beam_search's emit does); same streams,
same scan and timing as above. It leaves out beam_search's bookkeeping that does not depend on the
fusion (merging equal label sequences, the ended set's top-k): the unbiased decode step is if
anything cheaper than beam_search's, so its overhead ratios are upper bounds.

KMP over NAM's top K (--top_ks, default 16 and 32; empty to skip): a NAM filter keeps K of the N
phrases per utterance, and KMP then boosts only those. For each K, --batch random sets of K
distinct phrase indices (fewer than K phrases: the rest empty slots) gather the N-phrase table
to a batched [batch, K, ...] table (`kmp.select_phrases`, jitted; `gather_ms` is its median time,
paid once per utterance, not per step), and the same kmp scan runs on it (per-utterance tables:
the vmapped path of kmp_fusion). Printed as a last table beside the all-N kmp step; the
per-step XLA cost does not depend on which phrases are kept.

The printout ends with the ac step against the issue's goals (GOAL_OVERHEAD x the unbiased
decode step, GOAL_SPEEDUP x faster than the baseline), for information: they do not set the exit
status.

JSON (--output) is a list with one record per phrase count:
  phrases, trie_nodes, phrase_tokens, beam, batch, vocab, min/max_phrase_len, steps, ...;
  unbiased_ms_per_step, kmp_ms_per_step, ac_ms_per_step, baseline_ms_per_step,
  baseline_host_ms_per_step (the baseline's time outside its jitted top-k);
  ac_boosting_speedup_vs_baseline (baseline_host_ms_per_step / what ac adds to the decode step,
    decode_step.ac_boosting_ms_per_step; null where ac adds nothing measurable);
  kmp_overhead_ratio (kmp / unbiased), ac_overhead_ratio (ac / unbiased),
  kmp_speedup_vs_baseline (baseline / kmp), ac_speedup_vs_baseline (baseline / ac),
  ac_vs_kmp_speedup (kmp / ac); kmp_skipped (null, or why the kmp scans did not run);
  kmp_build_s, ac_build_s, baseline_build_s (host seconds; kmp_rebuild_s, ac_rebuild_s: the
  same list built again); kmp_table_mib, ac_table_mib (device memory); chain_width (KMP),
  ac_num_nodes, ac_fanout_width, ac_max_depth (the automaton's shape);
  kmp_baseline_bonus_diff, ac_baseline_bonus_diff, ac_kmp_bonus_diff and their max,
  max_bonus_abs_diff; all_*_ms_per_step (every timed scan), *_compile_s;
  decode_step (null with --nodecode): unbiased_ms_per_step, kmp_ms_per_step, ac_ms_per_step,
    kmp_overhead_ratio, ac_overhead_ratio (fused / unbiased decode step), the model sizes, ...;
  top_k: one record per K: k, ms_per_step, speedup_vs_all (all-N kmp / top-K kmp; null where
    the all-N kmp step was skipped), overhead_ratio (top-K kmp / unbiased), gather_ms, ...
On a shared CPU the absolute times are not performance claims: the ratios are what count, and
the jitted steps are written for accelerators (gathers and scatter-maxes in parallel), the
baseline for nothing but a CPU.
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
from typing import Any, Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from memlm_jax.decoding.aho_corasick import automaton_fusion, make_automaton  # noqa: E402
from memlm_jax.decoding.kmp import PhraseTable, kmp_fusion, make_phrase_table, select_phrases  # noqa: E402
from memlm_jax.decoding.rows import select_rows  # noqa: E402
from memlm_jax.decoding.transducer_beam import ScoreFusion  # noqa: E402
from memlm_jax.losses.rnnt import BLANK_ID  # noqa: E402
from memlm_jax.models.transducer_parts import JointNetwork, LstmPredictor  # noqa: E402

# The issue's targets for the ac step at 20000 phrases, printed beside the results (they do not set the exit status).
GOAL_OVERHEAD = 1.3
GOAL_SPEEDUP = 10.0


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Sizes of one benchmark run (see the module docstring)."""
  phrase_counts: tuple[int, ...] = (150, 3000, 20000, 100000)
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
  kmp_max_phrases: int = 20000
  decode: bool = True
  # configs/tiny/transducer.gin: ConformerEncoder.model_dim, LstmPredictor.embed_dim (= hidden_dim),
  # JointNetwork.joint_dim.
  encoder_dim: int = 96
  predictor_dim: int = 128
  joint_dim: int = 128

  def __post_init__(self):
    positive = ("batch", "beam", "vocab", "min_phrase_len", "steps", "baseline_steps", "repeats", "kmp_max_phrases",
                "encoder_dim", "predictor_dim", "joint_dim")
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

  def times_kmp(self, count: int) -> bool:
    """Whether the kmp scans run for `count` phrases."""
    return count <= self.kmp_max_phrases


# kmp_max_phrases=20 so that the smoke test also runs the path that skips the kmp scans (at 50 phrases).
QUICK_CONFIG = BenchConfig(phrase_counts=(20, 50), vocab=64, max_phrase_len=8, steps=20, baseline_steps=5,
                           check_steps=2, repeats=3, top_ks=(4, 8), kmp_max_phrases=20)

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


# The backends: fusion builders over their tables (same signature, same bonuses).
BACKENDS: dict[str, Callable[..., ScoreFusion]] = {"kmp": kmp_fusion, "ac": automaton_fusion}


def fused_scan(table: Any, state: Any, scores: jax.Array, logp: jax.Array, tokens: jax.Array, lineage: jax.Array, *,
               bonus_per_token: float, fusion_fn: Callable[..., ScoreFusion] = kmp_fusion) -> tuple[Any, jax.Array]:
  """(fusion state, scores) after steps of shallow fusion `fusion_fn(table, bonus_per_token)`.

  Args:
    table: the phrases, a kmp.PhraseTable (fusion_fn kmp_fusion) or an aho_corasick.PhraseAutomaton
      (automaton_fusion); an argument rather than a constant of the compiled scan, as in a server.
    state: fusion state, leaves [batch, beam, ...]; scores: [batch, beam].
    logp: [steps, batch, beam, vocab]; tokens: [steps, batch, beam] int32, the tokens that advance the state.
    lineage: [batch, beam] int32, the parent each hypothesis's state is gathered from.
  """
  fusion = fusion_fn(table, bonus_per_token)
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


def baseline_pass(booster: AhoCorasickBooster, scores: np.ndarray, logp: np.ndarray,
                  tokens: np.ndarray) -> tuple[float, float]:
  """Milliseconds (all, host boosting only) of the baseline over logp [steps, batch, beam, vocab] and tokens
  [steps, batch, beam]: per step the host bonuses of every hypothesis, the jitted top-k step, the host advances."""
  steps, batch, beam, vocab = logp.shape
  top_k_step = jax.jit(lambda s, l, b: _beam_top_k(s, l, b)[0])
  jax.block_until_ready(top_k_step(scores, logp[0], np.zeros(logp.shape[1:], np.float32)))  # compile
  nodes = [[0] * beam for _ in range(batch)]
  start, in_top_k = time.perf_counter(), 0.0
  for t in range(steps):
    bonus = np.array([[booster.token_bonus(node, vocab) for node in row] for row in nodes], np.float32)
    top_k_start = time.perf_counter()
    scores = jax.block_until_ready(top_k_step(scores, logp[t], bonus))
    in_top_k += time.perf_counter() - top_k_start
    nodes = [[booster.advance(node, token)[0] for node, token in zip(row, row_tokens)]
             for row, row_tokens in zip(nodes, tokens[t].tolist())]
  total = time.perf_counter() - start
  return 1000 * total, 1000 * (total - in_top_k)


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


# The decode step of the tiny transducer.


class DecoderParts(nnx.Module):
  """The tiny transducer's prediction and joint networks (the model classes, random init)."""

  def __init__(self, vocab_size: int, *, encoder_dim: int, predictor_dim: int, joint_dim: int, rngs: nnx.Rngs):
    self.predictor = LstmPredictor(vocab_size, embed_dim=predictor_dim, hidden_dim=predictor_dim, rngs=rngs)
    self.joint = JointNetwork(encoder_dim, predictor_dim, vocab_size, joint_dim=joint_dim, rngs=rngs)


def make_decoder_parts(config: BenchConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graph, parameters) of DecoderParts at config's sizes."""
  with nnx.use_eager_sharding(False):  # the parameters carry sharding names; one device, no mesh
    parts = DecoderParts(config.vocab, encoder_dim=config.encoder_dim, predictor_dim=config.predictor_dim,
                         joint_dim=config.joint_dim, rngs=nnx.Rngs(config.seed))
  return nnx.split(parts)


def decode_scan(params: nnx.State, table: Any, fusion_state: Any, pred_state: Any, pred_out: jax.Array,
                scores: jax.Array, frames: jax.Array, tokens: jax.Array, lineage: jax.Array, *, graphdef: nnx.GraphDef,
                fusion_fn: Callable[..., ScoreFusion] | None = None, bonus_per_token: float = 0.0) -> tuple:
  """(fusion state, predictor state, predictor output, scores) after steps of the decode step of the module
  docstring: joint, log_softmax, (+ token_bonus,) top-k, states gathered by parent, predictor step and
  (fused) fusion advance on the emitted tokens, kept on blank.

  Args:
    params, graphdef: DecoderParts split by nnx.split.
    table: the phrases (None without fusion, fusion_fn None); fusion_state: leaves [batch, beam, ...] (()
      without fusion).
    pred_state: the LSTM carry (c, h), each [batch, beam, predictor_dim]; pred_out: [batch, beam, predictor_dim].
    scores: [batch, beam]; frames: [steps, batch, encoder_dim] encoder frames.
    tokens: [steps, batch, beam] int32, the tokens the hypotheses emit; lineage: [batch, beam] int32 parents.
  """
  parts = nnx.merge(graphdef, params)
  fusion = None if fusion_fn is None else fusion_fn(table, bonus_per_token)
  batch, beam = scores.shape
  rows = jnp.arange(batch)[:, None]
  flat = lambda x: x.reshape((batch * beam,) + x.shape[2:])  # noqa: E731
  unflat = lambda x: x.reshape((batch, beam) + x.shape[1:])  # noqa: E731

  def step(carry, inputs):
    fusion_state, pred_state, pred_out, scores = carry
    frame, tokens_t = inputs
    logits = parts.joint(jnp.repeat(frame, beam, axis=0), flat(pred_out))
    logp = unflat(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    scores, _ = _beam_top_k(scores, logp, None if fusion is None else fusion.token_bonus(fusion_state))
    fusion_state, pred_state, pred_out = jax.tree.map(lambda x: x[rows, lineage], (fusion_state, pred_state, pred_out))
    emitted = tokens_t != BLANK_ID
    new_out, new_state = parts.predictor.step(jax.tree.map(flat, pred_state), flat(tokens_t))
    pred_state = select_rows(emitted, jax.tree.map(unflat, new_state), pred_state)
    pred_out = select_rows(emitted, unflat(new_out), pred_out)
    if fusion is not None:
      advanced, _ = fusion.advance(fusion_state, tokens_t)
      fusion_state = select_rows(emitted, advanced, fusion_state)
    return (fusion_state, pred_state, pred_out, scores), None

  return jax.lax.scan(step, (fusion_state, pred_state, pred_out, scores), (frames, tokens))[0]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
  return None if numerator is None or denominator is None else numerator / denominator


def bench_decode(config: BenchConfig, decoder: tuple[nnx.GraphDef, nnx.State], tables: dict[str, Any],
                 frames: np.ndarray, run_tokens: jax.Array, lineage: jax.Array) -> dict:
  """Times decode_scan unbiased and with each backend of `tables` ({'kmp': PhraseTable, 'ac': PhraseAutomaton},
  either may be missing) over frames [steps, batch, encoder_dim]; the decode_step record of the module docstring."""
  graphdef, params = decoder
  batch, beam = config.batch, config.beam
  predictor = nnx.merge(graphdef, params).predictor
  pred_out, pred_state = predictor.step(predictor.init_state(batch * beam), jnp.zeros((batch * beam,), jnp.int32))
  pred_out, pred_state = jax.tree.map(lambda x: x.reshape((batch, beam) + x.shape[1:]), (pred_out, pred_state))
  scores, frames = jnp.zeros((batch, beam), jnp.float32), jnp.asarray(frames)
  run = functools.partial(decode_scan, graphdef=graphdef)
  unbiased_ms, unbiased_compile_s = _timed_ms(
      run, (params, None, (), pred_state, pred_out, scores, frames, run_tokens, lineage), config.repeats)
  record = {"unbiased_ms_per_step": statistics.median(unbiased_ms) / config.steps,
            "all_unbiased_ms_per_step": [t / config.steps for t in unbiased_ms],
            "unbiased_compile_s": unbiased_compile_s}
  for name, fusion_fn in BACKENDS.items():
    times, compile_s = None, None
    if name in tables:
      state = fusion_fn(tables[name], config.bonus_per_token).init(batch, beam)
      times, compile_s = _timed_ms(functools.partial(run, fusion_fn=fusion_fn, bonus_per_token=config.bonus_per_token),
                                   (params, tables[name], state, pred_state, pred_out, scores, frames, run_tokens,
                                    lineage), config.repeats)
    ms_per_step = None if times is None else statistics.median(times) / config.steps
    record.update({f"{name}_ms_per_step": ms_per_step,
                   f"{name}_overhead_ratio": _ratio(ms_per_step, record["unbiased_ms_per_step"]),
                   f"all_{name}_ms_per_step": None if times is None else [t / config.steps for t in times],
                   f"{name}_compile_s": compile_s})
  record.update({"encoder_dim": config.encoder_dim, "predictor": "LstmPredictor", "predictor_dim": config.predictor_dim,
                 "joint_dim": config.joint_dim,
                 "decoder_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))})
  return record


# The bonus check.


def fusion_bonuses(fusion_fn: Callable[..., ScoreFusion], table: Any, bonus_per_token: float,
                   tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(whole-vocabulary bonuses [steps, batch, beam, vocab], advance bonuses [steps, batch, beam]) of shallow
  fusion `fusion_fn(table, bonus_per_token)` along tokens [steps, batch, beam], one jitted step at a time."""
  steps, batch, beam = tokens.shape
  token_bonus = jax.jit(lambda table, state: fusion_fn(table, bonus_per_token).token_bonus(state))
  advance = jax.jit(lambda table, state, tokens: fusion_fn(table, bonus_per_token).advance(state, tokens))
  state = fusion_fn(table, bonus_per_token).init(batch, beam)
  whole, earned = [], []
  for t in range(steps):
    whole.append(np.asarray(token_bonus(table, state)))
    state, bonus = advance(table, state, jnp.asarray(tokens[t]))
    earned.append(np.asarray(bonus))
  return (np.asarray(whole, np.float64).reshape(steps, batch, beam, table.vocab_size),
          np.asarray(earned, np.float64).reshape(steps, batch, beam))


def baseline_bonuses(booster: AhoCorasickBooster, vocab_size: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """fusion_bonuses of the pure-Python baseline: ([steps, batch, beam, vocab], [steps, batch, beam])."""
  steps, batch, beam = tokens.shape
  nodes, whole, earned = [0] * (batch * beam), [], []
  for t in range(steps):
    whole.append([booster.token_bonus(node, vocab_size) for node in nodes])
    stepped = [booster.advance(node, token) for node, token in zip(nodes, tokens[t].reshape(-1).tolist())]
    nodes = [node for node, _ in stepped]
    earned.append([bonus for _, bonus in stepped])
  return (np.asarray(whole, np.float64).reshape(steps, batch, beam, vocab_size),
          np.asarray(earned, np.float64).reshape(steps, batch, beam))


def bonus_difference(first: tuple[np.ndarray, ...], second: tuple[np.ndarray, ...]) -> float:
  """Largest |first - second| over the arrays of two `fusion_bonuses` results (0.0 for no steps)."""
  return max([0.0] + [float(np.abs(a - b).max()) for a, b in zip(first, second) if a.size])


def bonus_tolerance(config: BenchConfig) -> float:
  """Allowed bonus difference between two boosters: float32 rounding of delta * max_phrase_len."""
  return 1e-5 * max(1.0, config.bonus_per_token * config.max_phrase_len)


# KMP over NAM's top K.


def top_k_indices(rng: np.random.Generator, batch: int, phrases: int, k: int) -> np.ndarray:
  """[batch, k] int32: per utterance min(k, phrases) distinct random phrase indices, then -1 (empty slots)."""
  kept = min(k, phrases)
  rows = [np.concatenate([rng.choice(phrases, kept, replace=False), np.full(k - kept, -1)]) for _ in range(batch)]
  return np.stack(rows).astype(np.int32)


def bench_top_k(config: BenchConfig, table: PhraseTable, scores: np.ndarray, run_logp: jax.Array,
                run_tokens: jax.Array, lineage: jax.Array, all_ms_per_step: float | None, unbiased_ms_per_step: float,
                k: int) -> dict:
  """The kmp scan on the table gathered to K phrases per utterance; the record of the module docstring
  (all_ms_per_step: the all-N kmp step, None where it was skipped)."""
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
  return {"k": k, "ms_per_step": ms_per_step, "speedup_vs_all": _ratio(all_ms_per_step, ms_per_step),
          "overhead_ratio": ms_per_step / unbiased_ms_per_step, "gather_ms": statistics.median(gather_ms),
          "all_ms_per_step": [t / config.steps for t in fused_ms], "all_gather_ms": gather_ms,
          "compile_s": compile_s, "gather_compile_s": gather_compile_s}


# One record per phrase count.


def _built(build: Callable[[], Any]) -> tuple[Any, float]:
  """(build(), host seconds until its arrays are on the device)."""
  start = time.perf_counter()
  built = jax.block_until_ready(build())
  return built, time.perf_counter() - start


def _mib(num_bytes: int) -> float:
  return num_bytes / 2**20


def bench_phrase_count(config: BenchConfig, count: int, decoder: tuple[nnx.GraphDef, nnx.State] | None = None
                       ) -> dict:
  """Builds, checks and times the boosters for `count` phrases (and, given `decoder` from make_decoder_parts,
  the decode step); the record of the module docstring."""
  rng = np.random.default_rng([config.seed, count])
  phrases = random_phrases(rng, count, config.vocab, config.min_phrase_len, config.max_phrase_len)
  hyps = config.batch * config.beam
  steps = max(config.steps, config.baseline_steps, config.check_steps)
  tokens = token_streams(rng, phrases, steps, hyps, config.vocab).reshape(steps, config.batch, config.beam)
  logits = rng.normal(size=(steps, config.batch, config.beam, config.vocab))
  logp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
  frames = rng.normal(size=(config.steps, config.batch, config.encoder_dim)).astype(np.float32)
  scores = np.zeros((config.batch, config.beam), np.float32)

  build_kmp = lambda: make_phrase_table(phrases, config.vocab, max_phrase_length=config.max_phrase_len)  # noqa: E731
  build_ac = lambda: make_automaton(phrases, config.vocab, max_phrase_length=config.max_phrase_len)  # noqa: E731
  kmp_table, kmp_build_s = _built(build_kmp)
  automaton, ac_build_s = _built(build_ac)
  # Built again: the first build of a shape also compiles the host-to-device copies of its arrays.
  kmp_rebuild_s, ac_rebuild_s = _built(build_kmp)[1], _built(build_ac)[1]
  booster, baseline_build_s = _built(lambda: AhoCorasickBooster(phrases, config.bonus_per_token))
  tables = {"kmp": kmp_table, "ac": automaton}

  check = tokens[:config.check_steps]
  bonuses = {name: fusion_bonuses(BACKENDS[name], t, config.bonus_per_token, check) for name, t in tables.items()}
  bonuses["baseline"] = baseline_bonuses(booster, config.vocab, check)
  diffs = {f"{a}_{b}_bonus_diff": bonus_difference(bonuses[a], bonuses[b])
           for a, b in (("kmp", "baseline"), ("ac", "baseline"), ("ac", "kmp"))}

  kmp_skipped = None
  if not config.times_kmp(count):
    kmp_skipped = f"{count} phrases > --kmp_max_phrases={config.kmp_max_phrases}"
  timed = {name: t for name, t in tables.items() if name != "kmp" or kmp_skipped is None}
  run_logp, run_tokens = jnp.asarray(logp[:config.steps]), jnp.asarray(tokens[:config.steps])
  lineage = jnp.broadcast_to(jnp.arange(config.beam, dtype=jnp.int32), (config.batch, config.beam))
  unbiased_ms, unbiased_compile_s = _timed_ms(unbiased_scan, (jnp.asarray(scores), run_logp), config.repeats)
  unbiased_ms_per_step = statistics.median(unbiased_ms) / config.steps
  baseline_ms, baseline_host_ms = baseline_pass(booster, scores, logp[:config.baseline_steps],
                                                tokens[:config.baseline_steps])
  baseline_ms_per_step = baseline_ms / config.baseline_steps

  record = {"phrases": len(phrases), "unbiased_ms_per_step": unbiased_ms_per_step,
            "baseline_ms_per_step": baseline_ms_per_step,
            "baseline_host_ms_per_step": baseline_host_ms / config.baseline_steps, "kmp_skipped": kmp_skipped}
  for name, fusion_fn in BACKENDS.items():
    times, compile_s = None, None
    if name in timed:
      state = fusion_fn(timed[name], config.bonus_per_token).init(config.batch, config.beam)
      times, compile_s = _timed_ms(functools.partial(fused_scan, bonus_per_token=config.bonus_per_token,
                                                     fusion_fn=fusion_fn),
                                   (timed[name], state, jnp.asarray(scores), run_logp, run_tokens, lineage),
                                   config.repeats)
    ms_per_step = None if times is None else statistics.median(times) / config.steps
    record.update({f"{name}_ms_per_step": ms_per_step,
                   f"{name}_overhead_ratio": _ratio(ms_per_step, unbiased_ms_per_step),
                   f"{name}_speedup_vs_baseline": _ratio(baseline_ms_per_step, ms_per_step),
                   f"all_{name}_ms_per_step": None if times is None else [t / config.steps for t in times],
                   f"{name}_compile_s": compile_s})
  record["ac_vs_kmp_speedup"] = _ratio(record["kmp_ms_per_step"], record["ac_ms_per_step"])
  record.update({
      "kmp_build_s": kmp_build_s, "ac_build_s": ac_build_s, "kmp_rebuild_s": kmp_rebuild_s,
      "ac_rebuild_s": ac_rebuild_s, "baseline_build_s": baseline_build_s,
      "kmp_table_mib": _mib(sum(x.nbytes for x in jax.tree.leaves(kmp_table))), "ac_table_mib": _mib(automaton.nbytes),
      "chain_width": kmp_table.chain_width, "ac_num_nodes": automaton.num_nodes,
      "ac_fanout_width": automaton.fanout_width, "ac_max_depth": automaton.max_depth,
      **diffs, "max_bonus_abs_diff": max(diffs.values()),
      "beam": config.beam, "batch": config.batch, "vocab": config.vocab, "min_phrase_len": config.min_phrase_len,
      "max_phrase_len": config.max_phrase_len, "phrase_tokens": sum(map(len, phrases)),
      "trie_nodes": booster.num_nodes, "bonus_per_token": config.bonus_per_token, "steps": config.steps,
      "repeats": config.repeats, "baseline_steps": config.baseline_steps, "check_steps": config.check_steps,
      "kmp_max_phrases": config.kmp_max_phrases, "all_unbiased_ms_per_step": [t / config.steps for t in unbiased_ms],
      **stream_statistics(booster, tokens[:config.steps].reshape(config.steps, -1)),
      "unbiased_compile_s": unbiased_compile_s, "backend": jax.default_backend(), "seed": config.seed,
  })
  record["decode_step"] = None if decoder is None else bench_decode(config, decoder, timed, frames, run_tokens, lineage)
  if record["decode_step"] is not None:
    # What boosting itself adds to a decode step, against the baseline's boosting alone (its host time):
    # a difference of two medians, so noisy where it is small.
    added = record["decode_step"]["ac_ms_per_step"] - record["decode_step"]["unbiased_ms_per_step"]
    record["decode_step"]["ac_boosting_ms_per_step"] = added
    record["ac_boosting_speedup_vs_baseline"] = (record["baseline_host_ms_per_step"] / added if added > 0 else None)
  record["top_k"] = [bench_top_k(config, kmp_table, scores, run_logp, run_tokens, lineage, record["kmp_ms_per_step"],
                                 unbiased_ms_per_step, k) for k in config.top_ks]
  return record


def _ms(value: float | None) -> str:
  return "-" if value is None else f"{value:.3f}"


def _x(value: float | None, digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def run_benchmark(config: BenchConfig, log=print) -> list[dict]:
  """One record per phrase count of config, logged as they finish."""
  jax.block_until_ready(jnp.zeros(()))  # starts the backend, which the first table build would otherwise pay for
  decoder = make_decoder_parts(config) if config.decode else None
  records = []
  for count in config.phrase_counts:
    r = bench_phrase_count(config, count, decoder)
    records.append(r)
    log(f"[{count} phrases] unbiased {_ms(r['unbiased_ms_per_step'])} ms/step, kmp {_ms(r['kmp_ms_per_step'])}, "
        f"ac {_ms(r['ac_ms_per_step'])}, baseline {_ms(r['baseline_ms_per_step'])}"
        + (f" (kmp skipped: {r['kmp_skipped']})" if r["kmp_skipped"] else "")
        + f"; bonus diff {r['max_bonus_abs_diff']:.2g}; build kmp {r['kmp_build_s']:.2f} s, ac "
        f"{r['ac_build_s']:.2f} s; tables kmp {r['kmp_table_mib']:.2f} MiB, ac {r['ac_table_mib']:.2f} MiB")
    if r["decode_step"] is not None:
      d = r["decode_step"]
      log(f"[{count} phrases, decode step] unbiased {_ms(d['unbiased_ms_per_step'])} ms/step, kmp "
          f"{_ms(d['kmp_ms_per_step'])}, ac {_ms(d['ac_ms_per_step'])}")
    for top in r["top_k"]:
      log(f"[{count} phrases, top {top['k']}] kmp {top['ms_per_step']:.3f} ms/step (all / top-K "
          f"{_x(top['speedup_vs_all'], 1)}), gather {top['gather_ms']:.3f} ms once per utterance")
  return records


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def step_table(records: list[dict]) -> str:
  """Markdown table of the per-step times and ratios ('-': kmp skipped)."""
  header = ["phrases", "unbiased ms/step", "kmp ms/step", "ac ms/step", "baseline ms/step", "kmp / unbiased",
            "ac / unbiased", "baseline / kmp", "baseline / ac", "kmp / ac", "max bonus diff"]
  rows = [[str(r["phrases"]), _ms(r["unbiased_ms_per_step"]), _ms(r["kmp_ms_per_step"]), _ms(r["ac_ms_per_step"]),
           _ms(r["baseline_ms_per_step"]), _x(r["kmp_overhead_ratio"]), _x(r["ac_overhead_ratio"]),
           _x(r["kmp_speedup_vs_baseline"], 1), _x(r["ac_speedup_vs_baseline"], 1), _x(r["ac_vs_kmp_speedup"], 1),
           f"{r['max_bonus_abs_diff']:.2g}"] for r in records]
  return _markdown(header, rows)


def build_table(records: list[dict]) -> str:
  """Markdown table of the tables' shapes, host build times and device memory."""
  header = ["phrases", "trie nodes", "kmp chain width", "ac node slots", "ac fanout width", "kmp build s (again)",
            "ac build s (again)", "baseline build s", "kmp MiB", "ac MiB"]
  rows = [[str(r["phrases"]), str(r["trie_nodes"]), str(r["chain_width"]), str(r["ac_num_nodes"]),
           str(r["ac_fanout_width"]), f"{r['kmp_build_s']:.3f} ({r['kmp_rebuild_s']:.3f})",
           f"{r['ac_build_s']:.3f} ({r['ac_rebuild_s']:.3f})", f"{r['baseline_build_s']:.3f}",
           f"{r['kmp_table_mib']:.2f}", f"{r['ac_table_mib']:.2f}"] for r in records]
  return _markdown(header, rows)


def decode_table(records: list[dict]) -> str:
  """Markdown table of the decode step of the tiny transducer ('-': kmp skipped)."""
  header = ["phrases", "unbiased ms/step", "+ kmp ms/step", "+ ac ms/step", "kmp / unbiased", "ac / unbiased"]
  rows = [[str(r["phrases"]), _ms(d["unbiased_ms_per_step"]), _ms(d["kmp_ms_per_step"]), _ms(d["ac_ms_per_step"]),
           _x(d["kmp_overhead_ratio"]), _x(d["ac_overhead_ratio"])]
          for r in records if (d := r["decode_step"]) is not None]
  return _markdown(header, rows)


def top_k_table(records: list[dict]) -> str:
  """Markdown table of KMP over NAM's top K: one row per (phrase count, K)."""
  header = ["phrases", "K", "kmp all ms/step", "kmp top-K ms/step", "speedup (all / top-K)",
            "overhead (top-K / unbiased)", "gather ms (once per utterance)"]
  rows = [[str(r["phrases"]), str(t["k"]), _ms(r["kmp_ms_per_step"]), f"{t['ms_per_step']:.3f}",
           _x(t["speedup_vs_all"], 1), f"{t['overhead_ratio']:.2f}", f"{t['gather_ms']:.3f}"]
          for r in records for t in r.get("top_k", [])]
  return _markdown(header, rows)


def goal_lines(records: list[dict]) -> list[str]:
  """The ac step of each record against GOAL_OVERHEAD (the decode step's ratio where it ran, else the
  synthetic step's) and GOAL_SPEEDUP."""
  lines = []
  for r in records:
    decode = r["decode_step"]
    overhead, which = ((decode["ac_overhead_ratio"], "decode") if decode is not None
                       else (r["ac_overhead_ratio"], "synthetic"))
    speedup = r["ac_speedup_vs_baseline"]
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    lines.append(f"ac at {r['phrases']} phrases: {overhead:.2f}x the unbiased {which} step (goal <= {GOAL_OVERHEAD}: "
                 f"{met(overhead <= GOAL_OVERHEAD)}), {speedup:.1f}x faster than the baseline (goal >= "
                 f"{GOAL_SPEEDUP:g}: {met(speedup >= GOAL_SPEEDUP)}; the baseline step holds the unbiased top-k, "
                 f"baseline / unbiased = {r['baseline_ms_per_step'] / r['unbiased_ms_per_step']:.1f}, its host "
                 f"boosting alone takes {r['baseline_host_ms_per_step']:.3f} ms/step)")
    if decode is not None:
      boost = r.get("ac_boosting_speedup_vs_baseline")
      lines.append(f"  boosting alone at {r['phrases']} phrases: ac adds {decode['ac_boosting_ms_per_step']:.3f} ms to "
                   f"the decode step, the baseline's host boosting takes {r['baseline_host_ms_per_step']:.3f}: "
                   + ("ac's addition is within noise" if boost is None else
                      f"{boost:.1f}x (goal >= {GOAL_SPEEDUP:g}: {met(boost >= GOAL_SPEEDUP)})"))
  return lines


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
                                          "Steps on which the KMP, Aho-Corasick and baseline bonuses are compared."),
      "repeats": flags.DEFINE_integer("repeats", defaults.repeats, "Timed scans per step kind (median counts)."),
      "bonus_per_token": flags.DEFINE_float("bonus_per_token", defaults.bonus_per_token, "Boosting delta."),
      "seed": flags.DEFINE_integer("seed", defaults.seed, "Seed for phrases, streams, log-probs and the model."),
      "top_ks": flags.DEFINE_list("top_ks", [str(k) for k in defaults.top_ks],
                                  "K values of KMP over NAM's top K (phrases gathered per utterance); empty: skip."),
      "kmp_max_phrases": flags.DEFINE_integer("kmp_max_phrases", defaults.kmp_max_phrases,
                                              "Above this many phrases the kmp scans are skipped (slow on a CPU); "
                                              "its table is still built, sized and checked."),
      "decode": flags.DEFINE_bool("decode", defaults.decode, "Also time the decode step of the tiny transducer."),
      "encoder_dim": flags.DEFINE_integer("encoder_dim", defaults.encoder_dim, "Decode step: encoder output dim."),
      "predictor_dim": flags.DEFINE_integer("predictor_dim", defaults.predictor_dim,
                                            "Decode step: LSTM predictor embedding and hidden dim."),
      "joint_dim": flags.DEFINE_integer("joint_dim", defaults.joint_dim, "Decode step: joint network dim."),
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
        f"delta {config.bonus_per_token}. unbiased, kmp and ac: median of {config.repeats} jitted scans of "
        f"{config.steps} steps (compilation excluded); baseline (pure-Python Aho-Corasick bonuses, one hypothesis "
        f"and one vocabulary id at a time): one pass over the first {config.baseline_steps} steps, the same work "
        "per step. The ratios are what count; absolute CPU times are not performance claims.\n")
  print("One beam step (top-k over random log-probs, + the boosting):\n")
  print(step_table(records))
  for r in records:
    if r["kmp_skipped"]:
      print(f"kmp not timed at {r['phrases']} phrases ({r['kmp_skipped']}); its table is built, sized and checked.")
  tolerance = bonus_tolerance(config)
  agree = all(r["max_bonus_abs_diff"] <= tolerance for r in records)
  worst = {pair: max(r[f"{pair}_bonus_diff"] for r in records) for pair in ("kmp_baseline", "ac_baseline", "ac_kmp")}
  print(f"\nbonus check (whole-vocabulary and advance bonuses on the first {config.check_steps} steps, tolerance "
        f"{tolerance:.2g}; largest diff kmp / baseline {worst['kmp_baseline']:.2g}, ac / baseline "
        f"{worst['ac_baseline']:.2g}, ac / kmp {worst['ac_kmp']:.2g}): {'PASS' if agree else 'FAIL'}")
  print("\nTables: host build time (token lists to device arrays; in parentheses the same list built again, the "
        "copies' per-shape compilations cached) and device memory:\n")
  print(build_table(records))
  if config.decode:
    print(f"\nDecode step of the tiny transducer (random init; encoder dim {config.encoder_dim}, LstmPredictor "
          f"{config.predictor_dim}, joint {config.joint_dim}): joint + log_softmax (+ token_bonus) + top-k + "
          "predictor step (+ advance), the same scan and streams:\n")
    print(decode_table(records))
  print("")
  print("\n".join(goal_lines(records)))
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
