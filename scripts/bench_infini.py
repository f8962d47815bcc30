r"""Streaming prefill at growing lengths: Infini-Transformer (bounded memory) vs the dense KV cache.

  python scripts/bench_infini.py                      # lengths 8192,32768,131072,1048576
  python scripts/bench_infini.py --quick              # lengths 2048,8192 (smoke test)
  python scripts/bench_infini.py --lengths=32768,65536 --output=/tmp/bench.json

Both models have the sizes of configs/tiny/{infini_lm,transformer_lm}.gin (vocab 384,
embed 64, 2 layers, 4 heads of 16, MLP 192; Infini segments of --segment_length) and
batch 1. For every length:

  infini  MemoryStreamer.prefill of a random prompt of that many tokens, --chunk_segments
          segments per jitted call (memory state only: no logits are computed);
  dense   TransformerLM with a preallocated KV cache of that length (rounded up to whole
          --dense_chunk and --key_block; the default lengths need no rounding), fed
          --dense_chunk tokens per jitted call (kv_cache.CachedLM.advance: cache only,
          block-wise attention over --key_block keys up to the chunk's last position).
          Lengths above --dense_max_length, or whose cache would exceed
          --dense_memory_budget_mb, are reported as rows with a `skipped` reason.

Each (model, length) runs in a fresh subprocess (this script with --_worker), so peak RSS
(getrusage ru_maxrss at the end of the worker) is that measurement's alone. It includes
the Python + JAX baseline, compilation and the warm-up. Timing excludes compilation: the
worker first runs the same jitted calls on the first two chunks (warm-up), then starts
again from an empty memory / a fresh cache and times the whole length (that chunk
included), ended by block_until_ready; `seconds` is the fastest of --infini_repeats /
--dense_repeats such passes (all in `all_seconds`), and `compiles_while_timed` counts XLA
compilations inside the timed passes (0 expected).

Both streams compute the state only, as a prefill does: no logits, and so (after XLA's
dead-code elimination) not the last layer's attention output and MLP either.

The Infini prompt is one int32 array (prefill takes the whole prompt): 4 MB at 1M tokens.
Dense input tokens are drawn chunk by chunk from a seeded generator.

After the table two checks: Infini peak RSS at the largest length within --rss_tolerance
of its peak at --reference_length (exit status 1 if not), and Infini seconds per token at
each length relative to the reference length (linear time means ratios near 1; reported,
not enforced: timings on a shared CPU are noisy). JSON (--output) is a list of records
with keys length, model, seconds, tokens_per_s, peak_rss_mb and extras.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from memlm_jax.decoding import kv_cache  # noqa: E402
from memlm_jax.decoding.lm_decoding import MemoryStreamer  # noqa: E402
from memlm_jax.models.infini_lm import InfiniTransformerLM, streaming_apply_fn  # noqa: E402
from memlm_jax.models.transformer_lm import TransformerLM, extend_apply_fn  # noqa: E402

# configs/tiny/infini_lm.gin and configs/tiny/transformer_lm.gin (other arguments: the models' defaults,
# which are what configs/models/*.gin set).
TINY_SIZES = dict(vocab_size=384, embed_dim=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=192)
INFINI, DENSE = "infini", "dense"
DEFAULT_LENGTHS = ["8192", "32768", "131072", "1048576"]
QUICK_LENGTHS = [2048, 8192]

_LENGTHS = flags.DEFINE_list("lengths", DEFAULT_LENGTHS, "Prompt lengths in tokens.")
_QUICK = flags.DEFINE_bool("quick", False, f"Smoke test: lengths {QUICK_LENGTHS} (overrides --lengths).")
_MODELS = flags.DEFINE_list("models", [INFINI, DENSE], f"Which of {INFINI}, {DENSE} to run.")
_SEGMENT_LENGTH = flags.DEFINE_integer("segment_length", 32, "Infini segment length (tiny config: 32).")
_CHUNK_SEGMENTS = flags.DEFINE_integer("chunk_segments", 64, "Infini segments per jitted prefill call.")
_DENSE_CHUNK = flags.DEFINE_integer("dense_chunk", 512, "Dense tokens per jitted cached call.")
_KEY_BLOCK = flags.DEFINE_integer("key_block", 256, "Dense attention key block (divides the cache length).")
_INFINI_REPEATS = flags.DEFINE_integer("infini_repeats", 3, "Timed Infini passes per length (the fastest counts).")
_DENSE_REPEATS = flags.DEFINE_integer("dense_repeats", 1, "Timed dense passes per length (the fastest counts).")
_DENSE_MAX_LENGTH = flags.DEFINE_integer("dense_max_length", 131072, "Longest length the dense baseline runs.")
_DENSE_BUDGET_MB = flags.DEFINE_float("dense_memory_budget_mb", 512.0,
                                      "Skip dense lengths whose KV cache would exceed this many MB.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for parameters and prompt tokens.")
_REFERENCE_LENGTH = flags.DEFINE_integer("reference_length", 32768,
                                         "Length the ratios are taken against (the smallest if not run).")
_RSS_TOLERANCE = flags.DEFINE_float("rss_tolerance", 0.10, "Allowed relative Infini peak-RSS growth.")
_TIME_TOLERANCE = flags.DEFINE_float("time_tolerance", 1.5,
                                     "Seconds-per-token ratios within [1/x, x] count as linear time.")
_WORKER_TIMEOUT_S = flags.DEFINE_integer("worker_timeout_s", 3600, "Seconds before a measurement is abandoned.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_infini.json", "Where the JSON records go ('' for none).")
_WORKER = flags.DEFINE_enum("_worker", None, [INFINI, DENSE], "Internal: run one measurement in this process.")
_WORKER_LENGTH = flags.DEFINE_integer("_length", None, "Internal: the worker's length.")
_RESULT_FILE = flags.DEFINE_string("_result_file", None, "Internal: where the worker writes its record.")

_PASS_THROUGH = (_SEGMENT_LENGTH, _CHUNK_SEGMENTS, _DENSE_CHUNK, _KEY_BLOCK, _INFINI_REPEATS, _DENSE_REPEATS,
                 _DTYPE, _SEED)


# Worker side: one measurement per process.

def _peak_rss_mb() -> float:
  """Peak resident set size of this process so far, in MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class _CompileCounter:
  """Counts XLA backend compilations (jax.monitoring) while `active`."""

  def __init__(self):
    self.active, self.count = False, 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    if self.active and "backend_compile" in event:
      self.count += 1


def _build(model: str) -> nnx.Module:
  """The tiny Infini or dense LM (float32 parameters, compute in --dtype)."""
  with nnx.use_eager_sharding(False):
    if model == INFINI:
      return InfiniTransformerLM(**TINY_SIZES, segment_length=_SEGMENT_LENGTH.value, dtype=_DTYPE.value,
                                 rngs=nnx.Rngs(_SEED.value))
    return TransformerLM(**TINY_SIZES, dtype=_DTYPE.value, rngs=nnx.Rngs(_SEED.value))


def _timed(counter: _CompileCounter, fn, repeats: int) -> list[float]:
  """Seconds of each of `repeats` runs of fn() to completion (results are dropped before the next run)."""
  times = []
  counter.active = True
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  counter.active = False
  return times


def _measure_infini(length: int, counter: _CompileCounter) -> tuple[list[float], dict]:
  """Prefill of a `length`-token prompt; the last (partial or full) segment stays in the stream buffer."""
  model = _build(INFINI)
  graphdef, params = nnx.split(model)
  streamer = MemoryStreamer(streaming_apply_fn(graphdef), _SEGMENT_LENGTH.value,
                            chunk_segments=_CHUNK_SEGMENTS.value)
  prompt = np.random.default_rng(_SEED.value).integers(1, model.vocab_size, (1, length), dtype=np.int32)

  def prefill(tokens):
    return streamer.prefill(params, model.init_memory(1), tokens, np.array([tokens.shape[1]])).memory

  warm = min(length, 2 * streamer.chunk_length + 1)  # two calls: from the empty and from a computed memory
  jax.block_until_ready(prefill(prompt[:, :warm]))
  rss_after_warmup = _peak_rss_mb()
  times = _timed(counter, lambda: prefill(prompt), _INFINI_REPEATS.value)
  committed = length - ((length - 1) % _SEGMENT_LENGTH.value + 1)
  return times, {"rss_after_warmup_mb": rss_after_warmup, "chunk_tokens": streamer.chunk_length,
                   "calls": math.ceil(committed / streamer.chunk_length), "tokens_into_memory": committed,
                   "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(model.init_memory(1))))}


def _dense_cache_length(length: int) -> int:
  step = math.lcm(_DENSE_CHUNK.value, _KEY_BLOCK.value)
  return -(-length // step) * step


def _measure_dense(length: int, counter: _CompileCounter) -> tuple[list[float], dict]:
  """Chunk-by-chunk cached forward over `length` tokens (rounded up to whole chunks and key blocks)."""
  model = _build(DENSE)
  graphdef, params = nnx.split(model)
  runner = kv_cache.CachedLM(extend_apply_fn(graphdef))
  max_length, chunk = _dense_cache_length(length), _DENSE_CHUNK.value

  def run(num_chunks):
    rng = np.random.default_rng(_SEED.value)
    cache = model.init_cache(1, max_length, key_block=_KEY_BLOCK.value)
    for offset in range(0, num_chunks * chunk, chunk):
      tokens = rng.integers(1, model.vocab_size, (1, chunk), dtype=np.int32)
      cache = runner.advance(params, tokens, cache, offset)
    return cache

  jax.block_until_ready(run(min(2, max_length // chunk)))  # warm-up; its cache is freed on return
  rss_after_warmup = _peak_rss_mb()
  times = _timed(counter, lambda: run(max_length // chunk), _DENSE_REPEATS.value)
  return times, {"rss_after_warmup_mb": rss_after_warmup, "chunk_tokens": chunk, "calls": max_length // chunk,
                   "cache_length": max_length, "key_block": _KEY_BLOCK.value,
                   "state_bytes": model.cache_bytes(1, max_length), "traces": runner.num_traces}


def _worker(model: str, length: int, result_file: str) -> None:
  """Measures one (model, length) and writes its record (peak RSS read last) to result_file."""
  counter = _CompileCounter()
  measure = _measure_infini if model == INFINI else _measure_dense
  times, extras = measure(length, counter)
  seconds = min(times)
  record = {"length": length, "model": model, "seconds": seconds, "tokens_per_s": length / seconds,
            "all_seconds": times, **extras,
            "compiles_while_timed": counter.count, "dtype": _DTYPE.value, "backend": jax.default_backend()}
  record["peak_rss_mb"] = _peak_rss_mb()
  with open(result_file, "w") as f:
    json.dump(record, f)


# Parent side: one subprocess per measurement, then the table and the checks.

def _dense_cache_mb(length: int) -> float:
  abstract = nnx.eval_shape(lambda: _build(DENSE))
  return abstract.cache_bytes(1, _dense_cache_length(length)) / 2**20


def _skip_reason(model: str, length: int) -> str | None:
  """Why the dense baseline does not run at `length` (every reason that applies), or None."""
  if model != DENSE:
    return None
  reasons = []
  if length > _DENSE_MAX_LENGTH.value:
    reasons.append(f"length > --dense_max_length={_DENSE_MAX_LENGTH.value}")
  cache_mb = _dense_cache_mb(length)
  if cache_mb > _DENSE_BUDGET_MB.value:
    reasons.append(f"KV cache {cache_mb:.0f} MB > --dense_memory_budget_mb={_DENSE_BUDGET_MB.value:g}")
  return "; ".join(reasons) or None


def _empty_record(model: str, length: int, **why) -> dict:
  return {"length": length, "model": model, "seconds": None, "tokens_per_s": None, "peak_rss_mb": None, **why}


def _run_worker(model: str, length: int) -> dict:
  """Runs one measurement in a fresh Python process; an error record if it fails."""
  with tempfile.TemporaryDirectory() as tmp:
    result_file = os.path.join(tmp, "record.json")
    command = [sys.executable, os.path.abspath(__file__), f"--_worker={model}", f"--_length={length}",
               f"--_result_file={result_file}"] + [f"--{flag.name}={flag.value}" for flag in _PASS_THROUGH]
    try:
      proc = subprocess.run(command, capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S.value)
    except subprocess.TimeoutExpired:
      return _empty_record(model, length, error=f"timed out after {_WORKER_TIMEOUT_S.value} s")
    if proc.returncode != 0 or not os.path.exists(result_file):
      tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
      return _empty_record(model, length, error=f"worker exit status {proc.returncode}: {tail}")
    with open(result_file) as f:
      return json.load(f)


def _measured(record: dict) -> bool:
  return record.get("seconds") is not None


def _add_ratios(records: list[dict], reference_length: int) -> None:
  """Per model: peak RSS and seconds per token relative to that model's run at reference_length."""
  for model in {r["model"] for r in records}:
    refs = [r for r in records if r["model"] == model and r["length"] == reference_length and _measured(r)]
    if not refs:
      continue
    ref = refs[0]
    for r in records:
      if r["model"] == model and _measured(r):
        r["reference_length"] = reference_length
        r["rss_vs_reference"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        r["time_per_token_vs_reference"] = (r["seconds"] / r["length"]) / (ref["seconds"] / ref["length"])


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _table(records: list[dict], reference_length: int) -> str:
  header = ["length", "model", "seconds", "tokens/s", "peak RSS MB", f"RSS/{reference_length}",
            f"(s/tok)/{reference_length}", "note"]
  lines = [[str(r["length"]), r["model"], _fmt(r["seconds"], ".2f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["peak_rss_mb"], ".1f"), _fmt(r.get("rss_vs_reference"), ".3f"),
            _fmt(r.get("time_per_token_vs_reference"), ".2f"), r.get("skipped") or r.get("error") or ""]
           for r in records]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
  out = ["  ".join(c.rjust(w) if i < len(header) - 1 else c for i, (c, w) in enumerate(zip(header, widths)))]
  out.append("  ".join("-" * w for w in widths))
  out += ["  ".join(c.rjust(w) if i < len(header) - 1 else c for i, (c, w) in enumerate(zip(line, widths)))
          for line in lines]
  return "\n".join(out)


def _memory_check(records: list[dict], lengths: list[int], reference_length: int) -> bool:
  """Prints whether Infini peak RSS at the largest length is within --rss_tolerance of the reference's."""
  by_length = {r["length"]: r for r in records if r["model"] == INFINI}
  if not by_length:
    print(f"memory check: n/a (--models has no {INFINI})")
    return True
  largest, ref = by_length.get(max(lengths)), by_length.get(reference_length)
  if largest is None or ref is None or not (_measured(largest) and _measured(ref)):
    print(f"memory check: FAIL (Infini not measured at {max(lengths)} and {reference_length})")
    return False
  ratio = largest["peak_rss_mb"] / ref["peak_rss_mb"]
  ok = abs(ratio - 1) <= _RSS_TOLERANCE.value
  print(f"memory check: {'PASS' if ok else 'FAIL'}: Infini peak RSS {largest['peak_rss_mb']:.1f} MB at "
        f"{largest['length']} tokens vs {ref['peak_rss_mb']:.1f} MB at {reference_length} "
        f"(ratio {ratio:.3f}, allowed 1 +- {_RSS_TOLERANCE.value:g})")
  return ok


def _time_check(records: list[dict], reference_length: int) -> None:
  """Prints Infini seconds per token at every length relative to the reference (not enforced)."""
  rows = [r for r in records if r["model"] == INFINI and "time_per_token_vs_reference" in r]
  if not rows:
    print("time check: n/a (no Infini run at the reference length)")
    return
  ratios = ", ".join(f"{r['length']}: {r['time_per_token_vs_reference']:.2f}" for r in rows)
  tol = _TIME_TOLERANCE.value
  linear = all(1 / tol <= r["time_per_token_vs_reference"] <= tol for r in rows)
  verdict = "PASS (linear)" if linear else "WARN (not enforced; timings are noisy)"
  print(f"time check: {verdict}: Infini (seconds/length) / (seconds/length at {reference_length}) = {ratios}; "
        f"linear growth means ratios within [{1 / tol:.2f}, {tol:.2f}]")


def _lengths() -> list[int]:
  if _QUICK.value:
    return list(QUICK_LENGTHS)
  try:
    lengths = sorted({int(x) for x in _LENGTHS.value})
  except ValueError as error:
    raise app.UsageError(f"--lengths must be integers, got {_LENGTHS.value}.") from error
  if not lengths or lengths[0] <= 0:
    raise app.UsageError(f"--lengths must be positive, got {_LENGTHS.value}.")
  return lengths


def _check_flags() -> None:
  unknown = set(_MODELS.value) - {INFINI, DENSE}
  if unknown or not _MODELS.value:
    raise app.UsageError(f"--models must name some of {INFINI}, {DENSE}; got {_MODELS.value}.")
  for flag in (_SEGMENT_LENGTH, _CHUNK_SEGMENTS, _DENSE_CHUNK, _KEY_BLOCK, _INFINI_REPEATS, _DENSE_REPEATS,
               _WORKER_TIMEOUT_S):
    if flag.value <= 0:
      raise app.UsageError(f"--{flag.name} must be positive, got {flag.value}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _WORKER.value:
    _worker(_WORKER.value, _WORKER_LENGTH.value, _RESULT_FILE.value)
    return 0
  _check_flags()
  lengths = _lengths()
  reference_length = _REFERENCE_LENGTH.value if _REFERENCE_LENGTH.value in lengths else lengths[0]
  records = []
  for length in lengths:
    for model in (m for m in (INFINI, DENSE) if m in _MODELS.value):
      reason = _skip_reason(model, length)
      record = _empty_record(model, length, skipped=reason) if reason else _run_worker(model, length)
      records.append(record)
      note = record.get("skipped") or record.get("error") or (
          f"{record['seconds']:.2f} s, {record['tokens_per_s']:,.0f} tokens/s, peak RSS {record['peak_rss_mb']:.1f} MB")
      print(f"[{model} {length}] {note}", flush=True)
  _add_ratios(records, reference_length)

  print(f"\njax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs), batch 1, {_DTYPE.value}; "
        f"Infini segment {_SEGMENT_LENGTH.value} x {_CHUNK_SEGMENTS.value} per call; dense chunk "
        f"{_DENSE_CHUNK.value}, key block {_KEY_BLOCK.value}; seconds = fastest of {_INFINI_REPEATS.value} (Infini), "
        f"{_DENSE_REPEATS.value} (dense) timed passes, compilation excluded; peak RSS per process.")
  if reference_length != _REFERENCE_LENGTH.value:
    print(f"(--reference_length={_REFERENCE_LENGTH.value} was not run; ratios are against {reference_length}.)")
  print(_table(records, reference_length))
  print()
  memory_ok = _memory_check(records, lengths, reference_length)
  _time_check(records, reference_length)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(records, f, indent=2)
    print(f"wrote {_OUTPUT.value}")
  failed = [r for r in records if "error" in r]
  return 0 if memory_ok and not failed else 1


if __name__ == "__main__":
  app.run(main)
