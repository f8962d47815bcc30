r"""Deferred NAM: pre-decoding delay of deferred vs full context encoding, and the per-frame cost
of the biasing attention.

  python scripts/bench_nam.py                          # 1K, 5K and 20K phrases
  python scripts/bench_nam.py --quick                  # tiny sizes (smoke test)
  python scripts/bench_nam.py --num_phrases=1000,20000 --top_k=32 --output=/tmp/bench_nam.json

The model is memlm_jax/models/nam.py with float32 parameters from nnx.Rngs(--seed): a NamBiaser
(DAN filter, top-K, a --num_layers x --context_dim context encoder with --num_heads heads) and a
BiasingAttention hook. The defaults are paper-like but CPU-feasible: a 256-wide encoder stream,
--frames=200 encoder frames (one 8 s utterance at 40 ms per frame), --batch=1, a 2-layer 128-wide
context encoder with 4 heads, K=16, vocabulary 4096, phrases of 2..16 wordpieces.

1. Pre-decoding delay: from the encoded audio to "the decoder can start", i.e. NamBiaser's whole
   call (filter scores over every phrase, top-K, context encoding, phrase embeddings) on
   x [batch, frames, model_dim], for each --num_phrases N, two ways with the same parameters:

     deferred  NamBiaser(deferred=True): score every phrase with DAN keys (wordpiece
               embeddings -> mean -> MLP), keep K, encode only those (Deferred NAM,
               arXiv 2404.10180);
     full      NamBiaser(deferred=False): encode all N phrases, score them with keys from
               their encodings, keep K (Dual-mode NAM, the baseline the issue names).

   Phrases are random token ids in [1, vocab) with lengths uniform in
   --min_phrase_len..--phrase_len, padded to [batch, bucket, phrase_len]; the bucket is the
   smallest of --buckets that holds N (default: the smallest 2^k or 3 * 2^(k-1) >= N, so at most
   a third of the rows are padding), and rows past N are all padding (both modes pay for them:
   full encodes them, the filter scores them). Each mode is jitted once per bucket (parameters
   and arrays are arguments, as in a server that gets a new list per request); compile seconds
   are reported separately. Times: one untimed warm-up call, then --repeats calls of each
   mode, alternating deferred and full so that load changes on a shared machine hit both,
   each ended by block_until_ready; the median counts. `DAN filter ms` times deferred's filter
   alone (DAN keys of all N, scores against the frames, top-K; compiled the same way):
   deferred minus it is the K-phrase encoding.

   Memory: the compiled executable's memory_analysis() (XLA's buffer plan), MiB = argument +
   output + temp bytes. It is what the program needs at its peak by XLA's own accounting,
   independent of the allocator and of other processes, so deferred and full compare like for
   like; arguments (parameters + the phrase arrays) are nearly the same for both (each drops
   the few parameters it does not use), the difference is in temp. It is not the process's RSS (no Python / JAX runtime, no compile-time memory).

   Check: the two modes select with different keys, so they agree only when K covers the
   list. Before timing, a list of exactly K phrases (padded to 2K rows, so full encodes twice
   as many rows as deferred) runs through both compiled modes: both must select every phrase
   and, since each phrase is encoded on its own, give the same encodings. `max diff` is the
   largest |deferred - full| over the valid encoded wordpieces and phrase embeddings (slots
   matched by phrase index, as the two score orders differ); above --tolerance, or a
   different selection, the check FAILs (exit 1).

2. Per-frame cost of the biasing attention: BiasingAttention (attention dim --attention_dim)
   over x [batch, frames, model_dim] given the context of K encoded phrases, for each K of
   --attention_top_ks, its median time divided by batch * frames; beside it one ConformerBlock
   of the same model_dim (--conformer_heads, --conformer_ff_mult, --conv_kernel) over the same
   frames, as a reference (a biased encoder adds one hook per biasing block).

Absolute times on a shared CPU are indicative only (a 2-core machine with other work running
gives noisy milliseconds); the ratios (speed-up, hook / block) are what we report.

JSON (--output): {"delay": one record per N, "per_frame": one record per K, "check_record": the
deferred-vs-full check, "config": the sizes, "backend", "jax", "check": PASS or FAIL}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
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

from memlm_jax.layers.conformer import ConformerBlock  # noqa: E402
from memlm_jax.models import nam  # noqa: E402

MIB = 2 ** 20


def bucket_for(n: int, buckets: Sequence[int] = ()) -> int:
  """The padded phrase count for n phrases: the smallest of `buckets` >= n, or with no buckets the
  smallest 2^k or 3 * 2^(k-1) >= n."""
  if buckets:
    fitting = [b for b in buckets if b >= n]
    if not fitting:
      raise ValueError(f"{n} phrases exceed the largest bucket {max(buckets)} (buckets {sorted(buckets)}).")
    return min(fitting)
  power = 1
  while power < n:
    if power >= 2 and 3 * power // 2 >= n:
      return 3 * power // 2
    power *= 2
  return power


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Sizes of one benchmark run (see the module docstring)."""
  num_phrases: tuple[int, ...] = (1000, 5000, 20000)
  buckets: tuple[int, ...] = ()  # () = the 2^k / 3 * 2^(k-1) rule
  top_k: int = 16
  attention_top_ks: tuple[int, ...] = (16, 32)
  batch: int = 1
  frames: int = 200
  model_dim: int = 256
  context_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  ff_mult: int = 2
  filter_dim: int = 64
  attention_dim: int = 64
  vocab: int = 4096
  phrase_len: int = 16
  min_phrase_len: int = 2
  conformer_heads: int = 4
  conformer_ff_mult: int = 4
  conv_kernel: int = 31
  repeats: int = 5
  tolerance: float = 1e-4
  seed: int = 0

  def __post_init__(self):
    positive = ("top_k", "batch", "frames", "model_dim", "context_dim", "num_layers", "num_heads", "ff_mult",
                "filter_dim", "attention_dim", "phrase_len", "min_phrase_len", "conformer_heads",
                "conformer_ff_mult", "conv_kernel", "repeats")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    for name in ("num_phrases", "attention_top_ks"):
      values = getattr(self, name)
      if not values or min(values) < 1:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values}.")
    if self.buckets and min(self.buckets) < 1:
      raise ValueError(f"buckets must be positive integers, got {self.buckets}.")
    if self.vocab < 2:
      raise ValueError(f"vocab must be >= 2 (padding id 0 and one wordpiece), got {self.vocab}.")
    if self.min_phrase_len > self.phrase_len:
      raise ValueError(f"min_phrase_len={self.min_phrase_len} is above phrase_len={self.phrase_len}.")
    if not self.tolerance >= 0:
      raise ValueError(f"tolerance must be >= 0, got {self.tolerance}.")
    for n in self.num_phrases:
      bucket_for(n, self.buckets)  # raises when no bucket holds n


QUICK_CONFIG = BenchConfig(num_phrases=(40, 100), top_k=8, attention_top_ks=(4, 8), frames=12, model_dim=32,
                           context_dim=16, num_layers=1, num_heads=2, filter_dim=16, attention_dim=16, vocab=64,
                           phrase_len=6, conformer_heads=2, conformer_ff_mult=2, conv_kernel=5, repeats=2)


# Inputs and modules.


def random_phrase_arrays(rng: np.random.Generator, batch: int, n: int, bucket: int, vocab: int, min_len: int,
                         max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """bias_tokens [batch, bucket, max_len] int32 (0 = padding) and bias_paddings (float32, 1.0 = padded):
  n random phrases of min_len..max_len ids in [1, vocab) per utterance, the rows past n all padding."""
  lengths = rng.integers(min_len, max_len + 1, size=(batch, n))
  valid = np.zeros((batch, bucket, max_len), bool)
  valid[:, :n] = np.arange(max_len) < lengths[..., None]
  tokens = np.where(valid, rng.integers(1, vocab, size=valid.shape), 0).astype(np.int32)
  return tokens, (~valid).astype(np.float32)


def _biaser(config: BenchConfig, deferred: bool, top_k: int) -> nam.NamBiaser:
  with nnx.use_eager_sharding(False):
    return nam.NamBiaser(config.vocab, config.model_dim, context_dim=config.context_dim,
                         num_layers=config.num_layers, num_heads=config.num_heads, ff_mult=config.ff_mult,
                         filter_dim=config.filter_dim, top_k=top_k, deferred=deferred,
                         rngs=nnx.Rngs(config.seed))


def _compiled(module: nnx.Module, call: Callable, *args) -> tuple[Callable, Any, float, Any]:
  """(run(*args), the module's state, compile seconds, memory_analysis()) of call(module, *args) jitted with
  the module's state as an argument. Intermediates a module sows stay inside the trace."""
  graphdef, state = nnx.split(module)

  def fn(state, *args):
    return call(nnx.merge(graphdef, state), *args)

  start = time.perf_counter()
  executable = jax.jit(fn).lower(state, *args).compile()
  compile_s = time.perf_counter() - start
  return (lambda *a: executable(state, *a)), state, compile_s, executable.memory_analysis()


def _memory_bytes(analysis: Any) -> dict:
  """argument / output / temp bytes of a compiled executable (None where the backend does not report)."""
  if analysis is None:
    return {"argument_bytes": None, "output_bytes": None, "temp_bytes": None, "total_bytes": None}
  parts = {"argument_bytes": int(analysis.argument_size_in_bytes), "output_bytes": int(analysis.output_size_in_bytes),
           "temp_bytes": int(analysis.temp_size_in_bytes)}
  return {**parts, "total_bytes": sum(parts.values())}


def _time_alternating(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Milliseconds of `repeats` calls of each fn (one untimed warm-up call each), taking turns."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(1000 * (time.perf_counter() - start))
  return times


def context_difference(a: nam.NamContext, b: nam.NamContext) -> tuple[bool, float]:
  """(same selected phrases, max |a - b| over the valid wordpieces and phrase embeddings), the K slots of
  each utterance matched by phrase index (the no-bias entry compared as is)."""
  sel_a, sel_b = np.asarray(a.selected), np.asarray(b.selected)
  order_a, order_b = np.argsort(sel_a, axis=1, kind="stable"), np.argsort(sel_b, axis=1, kind="stable")
  same = bool(np.array_equal(np.take_along_axis(sel_a, order_a, 1), np.take_along_axis(sel_b, order_b, 1)))
  if not same:
    return False, float("inf")

  def slots(x, order):  # [batch, K + 1, ...] with the K selected slots sorted by phrase index
    x = np.asarray(x)
    index = np.concatenate([order, np.full((order.shape[0], 1), order.shape[1])], axis=1)
    return np.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  valid_a, valid_b = slots(a.wordpiece_valid, order_a), slots(b.wordpiece_valid, order_b)
  if not np.array_equal(valid_a, valid_b) or not np.array_equal(slots(a.phrase_valid, order_a),
                                                                 slots(b.phrase_valid, order_b)):
    return False, float("inf")
  wordpieces = np.abs(slots(a.wordpieces, order_a) - slots(b.wordpieces, order_b))[valid_a]
  phrases = np.abs(slots(a.phrases, order_a) - slots(b.phrases, order_b))[slots(a.phrase_valid, order_a)]
  return True, float(max(wordpieces.max(initial=0.0), phrases.max(initial=0.0)))


# 1. Pre-decoding delay.


def _call_biaser(biaser, x, paddings, tokens, bias_paddings):
  return biaser(x, paddings, tokens, bias_paddings)


def _call_filter(biaser, x, paddings, tokens, bias_paddings):
  valid = bias_paddings <= 0
  logits = biaser.filter_logits(x, paddings, biaser.phrase_keys(tokens, valid), valid)
  return jax.lax.top_k(logits[:, :-1], min(biaser.top_k, tokens.shape[1]))[1]  # the biaser pads a short list to K


def _stream(config: BenchConfig) -> tuple[jax.Array, jax.Array]:
  """The encoded audio x [batch, frames, model_dim] (random) and its paddings (none)."""
  rng = np.random.default_rng(config.seed)
  x = jnp.asarray(rng.normal(size=(config.batch, config.frames, config.model_dim)), jnp.float32)
  return x, jnp.zeros((config.batch, config.frames), jnp.float32)


def check_deferred_vs_full(config: BenchConfig) -> dict:
  """Both compiled modes on a list of exactly K phrases padded to 2K rows: same selection (the K phrases)
  and encodings."""
  x, paddings = _stream(config)
  tokens, bias_paddings = random_phrase_arrays(np.random.default_rng([config.seed, 2]), config.batch, config.top_k,
                                               2 * config.top_k, config.vocab, config.min_phrase_len, config.phrase_len)
  args = (x, paddings, jnp.asarray(tokens), jnp.asarray(bias_paddings))
  contexts = [_compiled(_biaser(config, deferred, config.top_k), _call_biaser, *args)[0](*args)
              for deferred in (True, False)]
  same, diff = context_difference(*contexts)
  return {"phrases": config.top_k, "top_k": config.top_k, "same_selection": same, "max_abs_diff": diff,
          "tolerance": config.tolerance, "passed": same and diff <= config.tolerance}


def bench_delay(config: BenchConfig, log=print) -> list[dict]:
  """One record per N of config.num_phrases (compiled once per bucket)."""
  x, paddings = _stream(config)
  modules = {"deferred": _biaser(config, True, config.top_k), "full": _biaser(config, False, config.top_k)}
  modules["filter"] = modules["deferred"]
  calls = {"deferred": _call_biaser, "full": _call_biaser, "filter": _call_filter}
  compiled: dict[int, dict] = {}
  records = []
  for n in config.num_phrases:
    bucket = bucket_for(n, config.buckets)
    tokens, bias_paddings = random_phrase_arrays(np.random.default_rng([config.seed, n]), config.batch, n, bucket,
                                                 config.vocab, config.min_phrase_len, config.phrase_len)
    args = (x, paddings, jnp.asarray(tokens), jnp.asarray(bias_paddings))
    fresh = bucket not in compiled
    if fresh:
      compiled[bucket] = {name: _compiled(modules[name], calls[name], *args) for name in ("deferred", "full", "filter")}
    runs = compiled[bucket]
    times = _time_alternating({name: (lambda run=run: run(*args)) for name, (run, _, _, _) in runs.items()},
                              config.repeats)
    ms = {name: statistics.median(t) for name, t in times.items()}
    memory = {name: _memory_bytes(runs[name][3]) for name in ("deferred", "full")}
    record = {
        "phrases": n, "bucket": bucket, "top_k": config.top_k,
        "deferred_ms": ms["deferred"], "full_ms": ms["full"], "filter_ms": ms["filter"],
        "speedup": ms["full"] / ms["deferred"],
        "deferred_mib": _mib(memory["deferred"]["total_bytes"]), "full_mib": _mib(memory["full"]["total_bytes"]),
        "memory_ratio": _ratio(memory["full"]["total_bytes"], memory["deferred"]["total_bytes"]),
        "deferred_memory": memory["deferred"], "full_memory": memory["full"],
        "all_deferred_ms": times["deferred"], "all_full_ms": times["full"], "all_filter_ms": times["filter"],
        "compile_s": ({name: runs[name][2] for name in runs} if fresh else None),
    }
    records.append(record)
    log(f"[{n} phrases, bucket {bucket}] deferred {ms['deferred']:.2f} ms (filter {ms['filter']:.2f}), "
        f"full {ms['full']:.2f} ms: {record['speedup']:.1f}x")
  return records


def _mib(nbytes: int | None) -> float | None:
  return None if nbytes is None else nbytes / MIB


def _ratio(a: int | None, b: int | None) -> float | None:
  return None if a is None or b is None or b == 0 else a / b


# 2. Per-frame cost of the biasing attention.


def bench_per_frame(config: BenchConfig, log=print) -> list[dict]:
  """One record per K of config.attention_top_ks: BiasingAttention and one ConformerBlock over the frames."""
  rng = np.random.default_rng([config.seed, 1])
  x = jnp.asarray(rng.normal(size=(config.batch, config.frames, config.model_dim)), jnp.float32)
  paddings = jnp.zeros((config.batch, config.frames), jnp.float32)
  with nnx.use_eager_sharding(False):
    block = ConformerBlock(config.model_dim, config.conformer_heads, ff_mult=config.conformer_ff_mult,
                           conv_kernel=config.conv_kernel, rngs=nnx.Rngs(config.seed))
    hook = nam.BiasingAttention(config.model_dim, context_dim=config.context_dim,
                                attention_dim=config.attention_dim, rngs=nnx.Rngs(config.seed))
  run_block, _, block_compile_s, _ = _compiled(block, lambda m, x, p: m(x, p), x, paddings)
  frames = config.batch * config.frames
  records = []
  for k in config.attention_top_ks:
    tokens, bias_paddings = random_phrase_arrays(np.random.default_rng([config.seed, k]), config.batch, 4 * k,
                                                 4 * k, config.vocab, config.min_phrase_len, config.phrase_len)
    bias_args = (x, paddings, jnp.asarray(tokens), jnp.asarray(bias_paddings))
    context = _compiled(_biaser(config, True, k), _call_biaser, *bias_args)[0](*bias_args)
    run_hook, _, hook_compile_s, _ = _compiled(hook, lambda m, x, p, c: m(x, p, c), x, paddings, context)
    times = _time_alternating({"hook": lambda: run_hook(x, paddings, context), "block": lambda: run_block(x, paddings)},
                              config.repeats)
    hook_ms, block_ms = statistics.median(times["hook"]), statistics.median(times["block"])
    record = {"top_k": k, "frames": frames, "hook_ms": hook_ms, "block_ms": block_ms,
              "hook_us_per_frame": 1000 * hook_ms / frames, "block_us_per_frame": 1000 * block_ms / frames,
              "hook_vs_block": hook_ms / block_ms, "all_hook_ms": times["hook"], "all_block_ms": times["block"],
              "compile_s": {"hook": hook_compile_s, "block": block_compile_s}}
    records.append(record)
    log(f"[K={k}] biasing attention {record['hook_us_per_frame']:.2f} us/frame, conformer block "
        f"{record['block_us_per_frame']:.2f} us/frame ({record['hook_vs_block']:.3f})")
  return records


# Report.


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _fmt(value: float | None, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def delay_table(records: Sequence[dict]) -> str:
  header = ["N", "bucket", "K", "deferred ms", "full ms", "speed-up (full / deferred)", "DAN filter ms",
            "deferred MiB", "full MiB", "memory ratio", "compile s (deferred / full)"]
  rows = [[str(r["phrases"]), str(r["bucket"]), str(r["top_k"]), f"{r['deferred_ms']:.2f}", f"{r['full_ms']:.2f}",
           f"{r['speedup']:.1f}x", f"{r['filter_ms']:.2f}", _fmt(r["deferred_mib"], ".2f"), _fmt(r["full_mib"], ".2f"),
           _fmt(r["memory_ratio"], ".1f") + ("x" if r["memory_ratio"] is not None else ""),
           ("(bucket compiled above)" if r["compile_s"] is None
            else f"{r['compile_s']['deferred']:.1f} / {r['compile_s']['full']:.1f}")] for r in records]
  return _markdown(header, rows)


def per_frame_table(records: Sequence[dict]) -> str:
  header = ["K", "frames", "biasing attention us/frame", "conformer block us/frame", "biasing / block"]
  rows = [[str(r["top_k"]), str(r["frames"]), f"{r['hook_us_per_frame']:.2f}", f"{r['block_us_per_frame']:.2f}",
           f"{r['hook_vs_block']:.3f}"] for r in records]
  return _markdown(header, rows)


def run(config: BenchConfig, log=print) -> tuple[dict, str]:
  """(the JSON document, the printed report) of one run."""
  check = check_deferred_vs_full(config)
  log(f"[check, {check['phrases']} phrases = K] same selection: {check['same_selection']}, max diff "
      f"{check['max_abs_diff']:.2g}")
  delay = bench_delay(config, log)
  per_frame = bench_per_frame(config, log)
  passed = check["passed"]
  c = config
  report = "\n".join([
      f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs); batch {c.batch}, {c.frames} encoder "
      f"frames of width {c.model_dim}; context encoder {c.num_layers} x {c.context_dim} ({c.num_heads} heads, ff x"
      f"{c.ff_mult}), filter {c.filter_dim}, K={c.top_k}; vocab {c.vocab}, phrases of {c.min_phrase_len}.."
      f"{c.phrase_len} wordpieces. Median of {c.repeats} calls (compilation excluded, deferred and full taking "
      "turns); MiB = XLA memory_analysis() argument + output + temp of the compiled call. Absolute times on a "
      "shared CPU are indicative only; the ratios are what we report.",
      "",
      "Pre-decoding delay (filter + top-K + context encoding):",
      "",
      delay_table(delay),
      "",
      f"deferred vs full check ({check['phrases']} phrases = K: same selection "
      f"{'yes' if check['same_selection'] else 'NO'}, max diff {check['max_abs_diff']:.2g} <= {c.tolerance:.2g}): "
      f"{'PASS' if passed else 'FAIL'}",
      "",
      f"Per-frame cost of BiasingAttention (attention dim {c.attention_dim}) vs one ConformerBlock "
      f"({c.conformer_heads} heads, ff x{c.conformer_ff_mult}, kernel {c.conv_kernel}), width {c.model_dim}:",
      "",
      per_frame_table(per_frame),
  ])
  document = {"delay": delay, "per_frame": per_frame, "check_record": check, "config": dataclasses.asdict(config),
              "backend": jax.default_backend(), "jax": jax.__version__, "cpus": os.cpu_count(),
              "check": "PASS" if passed else "FAIL"}
  return document, report


# Command line. The flags are defined only when this file runs as a script, so that tests can import it
# next to the other bench scripts (absl refuses a flag name defined by two modules).

_LIST_FIELDS = ("num_phrases", "buckets", "attention_top_ks")
_HELP = {
    "num_phrases": "Phrase list sizes N, one delay record each.",
    "buckets": "Padded phrase counts to choose from (smallest >= N); empty: 2^k or 3 * 2^(k-1).",
    "top_k": "K of the filter in the delay benchmark.",
    "attention_top_ks": "K values of the per-frame biasing attention benchmark.",
    "batch": "Utterances.", "frames": "Encoder frames per utterance.", "model_dim": "Encoder stream width.",
    "context_dim": "Context encoder width.", "num_layers": "Context encoder layers.",
    "num_heads": "Context encoder heads.", "ff_mult": "Context encoder feed-forward multiplier.",
    "filter_dim": "DAN filter width.", "attention_dim": "BiasingAttention query / key / value width.",
    "vocab": "Wordpiece vocabulary (id 0 = padding).", "phrase_len": "Longest phrase (padded length).",
    "min_phrase_len": "Shortest phrase.", "conformer_heads": "Heads of the reference ConformerBlock.",
    "conformer_ff_mult": "Feed-forward multiplier of the reference ConformerBlock.",
    "conv_kernel": "Convolution kernel of the reference ConformerBlock.",
    "repeats": "Timed calls per measurement (the median counts).",
    "tolerance": "Largest allowed |deferred - full| of the encodings.", "seed": "Seed for parameters and inputs.",
}


def _define_flags() -> dict:
  defaults = BenchConfig()
  values = {}
  for field in dataclasses.fields(BenchConfig):
    default = getattr(defaults, field.name)
    if field.name in _LIST_FIELDS:
      values[field.name] = flags.DEFINE_list(field.name, [str(v) for v in default], _HELP[field.name])
    elif isinstance(default, float):
      values[field.name] = flags.DEFINE_float(field.name, default, _HELP[field.name])
    else:
      values[field.name] = flags.DEFINE_integer(field.name, default, _HELP[field.name])
  values["quick"] = flags.DEFINE_bool("quick", False, f"Smoke test sizes {QUICK_CONFIG} (override the size flags).")
  values["output"] = flags.DEFINE_string("output", "results/bench_nam.json", "Where the JSON goes ('' for none).")
  return values


def _config(values: dict) -> BenchConfig:
  if values["quick"].value:
    return QUICK_CONFIG
  fields = {field.name: values[field.name].value for field in dataclasses.fields(BenchConfig)}
  try:
    for name in _LIST_FIELDS:
      fields[name] = tuple(int(v) for v in fields[name])
    return BenchConfig(**fields)
  except ValueError as error:
    raise app.UsageError(str(error)) from error


def main(argv, values: dict) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  document, report = run(_config(values))
  print("\n" + report)
  if values["output"].value:
    os.makedirs(os.path.dirname(os.path.abspath(values["output"].value)), exist_ok=True)
    with open(values["output"].value, "w") as f:
      json.dump(document, f, indent=2)
    print(f"wrote {values['output'].value}")
  return 0 if document["check"] == "PASS" else 1


if __name__ == "__main__":
  _FLAG_VALUES = _define_flags()
  app.run(lambda argv: main(argv, _FLAG_VALUES))
