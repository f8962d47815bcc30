r"""RNN-T loss value + gradient: the memory-lean path against full-logit baselines.

  python scripts/bench_rnnt.py                        # batch 8, 200 frames, 50 labels, vocab 1024
  python scripts/bench_rnnt.py --quick                # tiny sizes (smoke test)
  python scripts/bench_rnnt.py --vocab=4096 --paths=lean,plain --output=/tmp/bench_rnnt.json

Every path computes the batch-mean NLL and its gradient with respect to the encoder
output [batch, frames, dim], the predictor output [batch, labels + 1, dim] and the joint
parameters, with the same joint network: logits = tanh(enc W_e + pred W_p) W_o + b
([batch, frames, labels + 1, vocab]; hidden size --joint_dim). Example i of the batch has
frames - i * frames // (2 * batch) frames and labels - i * labels // (2 * batch) labels.

  lean   memlm_jax.losses.rnnt.rnnt_loss_from_joint: logits one chunk of --frame_chunk
         frames at a time, recomputed in the backward pass; lattice gradient from the beta
         recursion (custom VJP).
  plain  memlm_jax.losses.rnnt.rnnt_loss on the full logits, autodiff (anti-diagonal scan).
  naive  written here: the full [batch, frames, labels + 1, vocab] log-softmax, then the
         alpha recursion as a scan over frames with an inner scan over labels (one cell
         per step), differentiated by autodiff. Skipped (with the reason in the table)
         when frames * (labels + 1) exceeds --naive_max_cells.

Each path runs in a fresh subprocess (this script with --_worker), so peak RSS (getrusage
ru_maxrss at the end of the worker) is that path's alone; it includes the Python + JAX
baseline (`rss_before_compile_mb` is the peak just before compiling), the inputs and
compilation. `temp_bytes` is XLA's compiled memory_analysis() temporary allocation for
the jitted value-and-gradient (None if the backend does not report it). `seconds` is the
median of --repeats timed calls after one untimed warm-up call (compilation excluded).
The ratio columns divide by the lean path's figures; on a shared CPU the absolute times
are not performance claims. `loss` lets the paths be checked against each other.

JSON (--output) is a list of records with keys path, seconds, peak_rss_mb, temp_bytes,
seconds_vs_lean, peak_rss_vs_lean, temp_bytes_vs_lean, loss and extras.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from memlm_jax.losses import rnnt  # noqa: E402

LEAN, PLAIN, NAIVE = "lean", "plain", "naive"
PATHS = (LEAN, PLAIN, NAIVE)
QUICK_SIZES = dict(batch=2, frames=12, labels=4, vocab=32, dim=16, joint_dim=16, frame_chunk=4, repeats=2)

_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_FRAMES = flags.DEFINE_integer("frames", 200, "Encoder frames (longest example).")
_LABELS = flags.DEFINE_integer("labels", 50, "Labels (longest example).")
_VOCAB = flags.DEFINE_integer("vocab", 1024, "Vocabulary size, blank included (blank id 0).")
_DIM = flags.DEFINE_integer("dim", 256, "Encoder and predictor output size.")
_JOINT_DIM = flags.DEFINE_integer("joint_dim", 256, "Joint hidden size.")
_FRAME_CHUNK = flags.DEFINE_integer("frame_chunk", 16, "Frames per joint evaluation on the lean path.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per path (the median counts).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Inputs, parameters and logits.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for inputs and parameters.")
_QUICK = flags.DEFINE_bool("quick", False, f"Smoke test sizes {QUICK_SIZES} (override the size flags).")
_PATHS = flags.DEFINE_list("paths", list(PATHS), f"Which of {', '.join(PATHS)} to run.")
_NAIVE_MAX_CELLS = flags.DEFINE_integer("naive_max_cells", 100_000,
                                        "Skip the naive path when frames * (labels + 1) is larger.")
_WORKER_TIMEOUT_S = flags.DEFINE_integer("worker_timeout_s", 1800, "Seconds before a path is abandoned.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_rnnt.json", "Where the JSON records go ('' for none).")
_WORKER = flags.DEFINE_enum("_worker", None, list(PATHS), "Internal: run one path in this process.")
_RESULT_FILE = flags.DEFINE_string("_result_file", None, "Internal: where the worker writes its record.")

_SIZE_FLAGS = (_BATCH, _FRAMES, _LABELS, _VOCAB, _DIM, _JOINT_DIM, _FRAME_CHUNK, _REPEATS)
_PASS_THROUGH = _SIZE_FLAGS + (_DTYPE, _SEED)


def _sizes() -> dict:
  """The size flags, or the --quick sizes."""
  if _QUICK.value:
    return dict(QUICK_SIZES)
  return {flag.name: flag.value for flag in _SIZE_FLAGS}


# The problem: inputs, joint network and the three losses.

def _example_lengths(batch: int, frames: int, labels: int) -> tuple[np.ndarray, np.ndarray]:
  """Frames [batch] and labels [batch] per example, the first one full length."""
  i = np.arange(batch)
  return frames - i * frames // (2 * batch), labels - i * labels // (2 * batch)


def _problem(sizes: dict, dtype, seed: int) -> tuple[tuple, tuple]:
  """((params, enc, pred), (logit_paddings, labels, label_paddings)) with random values."""
  rng = np.random.default_rng(seed)
  b, t, u, v = sizes["batch"], sizes["frames"], sizes["labels"], sizes["vocab"]
  d, h = sizes["dim"], sizes["joint_dim"]
  frame_len, label_len = _example_lengths(b, t, u)
  logit_paddings = (np.arange(t)[None, :] >= frame_len[:, None]).astype(np.float32)
  label_paddings = (np.arange(u)[None, :] >= label_len[:, None]).astype(np.float32)
  labels = rng.integers(1, v, size=(b, u)).astype(np.int32)
  params = {"enc": rng.normal(size=(d, h)) / np.sqrt(d), "pred": rng.normal(size=(d, h)) / np.sqrt(d),
            "out": rng.normal(size=(h, v)) / np.sqrt(h), "bias": np.zeros(v)}
  params = {k: jnp.asarray(x, dtype) for k, x in params.items()}
  enc = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
  pred = jnp.asarray(rng.normal(size=(b, u + 1, d)), dtype)
  return (params, enc, pred), tuple(jnp.asarray(x) for x in (logit_paddings, labels, label_paddings))


def joint(params: dict, enc: jax.Array, pred: jax.Array) -> jax.Array:
  """Broadcastable enc [batch, frames, 1, dim], pred [batch, 1, labels + 1, dim] -> logits [batch, frames,
  labels + 1, vocab] (the calling convention of rnnt_loss_from_joint's joint_fn)."""
  return jnp.tanh(enc @ params["enc"] + pred @ params["pred"]) @ params["out"] + params["bias"]


def naive_rnnt_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array,
                    label_paddings: jax.Array, blank_id: int = rnnt.BLANK_ID) -> jax.Array:
  """Per-example NLL [batch]: full log-softmax, alpha by a scan over frames and an inner scan over labels.

  Args:
    logits: [batch, frames, labels + 1, vocab]; logit_paddings [batch, frames];
    labels, label_paddings: [batch, labels]. Every example needs at least one frame.
  """
  batch, frames, u1, _ = logits.shape
  t_len = jnp.sum(1 - logit_paddings, axis=1).astype(jnp.int32)
  u_len = jnp.sum(1 - label_paddings, axis=1).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # the whole [b, T, U + 1, V]
  blank = log_probs[..., blank_id]  # [b, T, U + 1]
  label = jnp.take_along_axis(log_probs[:, :, :-1], labels[:, None, :, None], axis=-1)[..., 0]  # [b, T, U]
  very_negative = jnp.float32(-1e30)  # finite, so that autodiff sees no inf - inf

  def frame_row(alpha_prev, t):  # alpha_prev = alpha(t - 1, :) [b, U + 1]
    from_below = alpha_prev + blank[:, jnp.maximum(t - 1, 0)]

    def cell(alpha_left, u):  # alpha_left = alpha(t, u - 1) [b]
      from_left = jnp.where(u > 0, alpha_left + label[:, t, jnp.maximum(u - 1, 0)], very_negative)
      below = jnp.where(t > 0, from_below[:, u], very_negative)
      alpha = jnp.where((t == 0) & (u == 0), 0.0, jnp.logaddexp(below, from_left))
      return alpha, alpha

    _, row = jax.lax.scan(cell, jnp.full((batch,), very_negative), jnp.arange(u1))
    return row.T, row.T

  _, alphas = jax.lax.scan(frame_row, jnp.full((batch, u1), very_negative), jnp.arange(frames))  # [T, b, U + 1]
  batch_idx = jnp.arange(batch)
  return -(alphas[t_len - 1, batch_idx, u_len] + blank[batch_idx, t_len - 1, u_len])


def _loss_fn(path: str, frame_chunk: int, paddings: tuple):
  """Batch-mean NLL as a function of (params, enc, pred) on the given path."""
  logit_paddings, labels, label_paddings = paddings

  def loss(params, enc, pred):
    if path == LEAN:
      nll = rnnt.rnnt_loss_from_joint(enc, pred, joint, params, logit_paddings, labels, label_paddings,
                                      frame_chunk=frame_chunk)
    elif path == PLAIN:
      nll = rnnt.rnnt_loss(joint(params, enc[:, :, None], pred[:, None]), logit_paddings, labels, label_paddings)
    else:
      nll = naive_rnnt_loss(joint(params, enc[:, :, None], pred[:, None]), logit_paddings, labels, label_paddings)
    return jnp.mean(nll)

  return loss


# Worker side: one path per process.

def _peak_rss_mb() -> float:
  """Peak resident set size of this process so far, in MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _worker(path: str, result_file: str) -> None:
  """Compiles, warms up and times one path's value + gradient; writes its record to result_file."""
  sizes = _sizes()
  args, paddings = _problem(sizes, jnp.dtype(_DTYPE.value), _SEED.value)
  step = jax.jit(jax.value_and_grad(_loss_fn(path, sizes["frame_chunk"], paddings), argnums=(0, 1, 2)))
  rss_before_compile = _peak_rss_mb()
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  loss, grads = jax.block_until_ready(compiled(*args))  # warm-up
  del grads
  times = []
  for _ in range(sizes["repeats"]):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  record = {"path": path, "seconds": statistics.median(times), "all_seconds": times, "compile_s": compile_s,
            "temp_bytes": None if stats is None else int(stats.temp_size_in_bytes),
            "argument_bytes": None if stats is None else int(stats.argument_size_in_bytes),
            "rss_before_compile_mb": rss_before_compile, "loss": float(loss), **sizes,
            "dtype": _DTYPE.value, "backend": jax.default_backend()}
  record["peak_rss_mb"] = _peak_rss_mb()
  with open(result_file, "w") as f:
    json.dump(record, f)


# Parent side: one subprocess per path, then the ratios and the table.

def _empty_record(path: str, **why) -> dict:
  return {"path": path, "seconds": None, "peak_rss_mb": None, "temp_bytes": None, "loss": None, **why}


def _run_worker(path: str) -> dict:
  """Runs one path in a fresh Python process; an error record if it fails."""
  with tempfile.TemporaryDirectory() as tmp:
    result_file = os.path.join(tmp, "record.json")
    command = [sys.executable, os.path.abspath(__file__), f"--_worker={path}", f"--_result_file={result_file}",
               f"--quick={_QUICK.value}"] + [f"--{flag.name}={flag.value}" for flag in _PASS_THROUGH]
    try:
      proc = subprocess.run(command, capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S.value)
    except subprocess.TimeoutExpired:
      return _empty_record(path, error=f"timed out after {_WORKER_TIMEOUT_S.value} s")
    if proc.returncode != 0 or not os.path.exists(result_file):
      tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
      return _empty_record(path, error=f"worker exit status {proc.returncode}: {tail}")
    with open(result_file) as f:
      return json.load(f)


def _skip_reason(path: str, sizes: dict) -> str | None:
  cells = sizes["frames"] * (sizes["labels"] + 1)
  if path == NAIVE and cells > _NAIVE_MAX_CELLS.value:
    return f"frames * (labels + 1) = {cells} > --naive_max_cells={_NAIVE_MAX_CELLS.value}"
  return None


def _add_ratios(records: list[dict]) -> None:
  """seconds / peak RSS / temp bytes of every path divided by the lean path's."""
  lean = next((r for r in records if r["path"] == LEAN and r["seconds"] is not None), None)
  for r in records:
    for key, ratio_key in (("seconds", "seconds_vs_lean"), ("peak_rss_mb", "peak_rss_vs_lean"),
                           ("temp_bytes", "temp_bytes_vs_lean")):
      ok = lean is not None and r.get(key) is not None and lean.get(key)
      r[ratio_key] = r[key] / lean[key] if ok else None


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _table(records: list[dict]) -> str:
  """Markdown table of the records."""
  header = ["path", "seconds (median)", "time ratio vs lean", "peak RSS MB", "RSS ratio vs lean", "XLA temp MB",
            "temp ratio vs lean", "loss", "note"]
  rows = [[r["path"], _fmt(r["seconds"], ".3f"), _fmt(r.get("seconds_vs_lean"), ".2f"),
           _fmt(r["peak_rss_mb"], ".0f"), _fmt(r.get("peak_rss_vs_lean"), ".2f"),
           _fmt(None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20, ".1f"),
           _fmt(r.get("temp_bytes_vs_lean"), ".2f"), _fmt(r["loss"], ".6g"),
           r.get("skipped") or r.get("error") or ""] for r in records]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _check_flags(sizes: dict) -> None:
  unknown = set(_PATHS.value) - set(PATHS)
  if unknown or not _PATHS.value:
    raise app.UsageError(f"--paths must name some of {', '.join(PATHS)}; got {_PATHS.value}.")
  for name, value in sizes.items():
    if value <= 0 and name != "labels":
      raise app.UsageError(f"--{name} must be positive, got {value}.")
  if sizes["labels"] < 0:
    raise app.UsageError(f"--labels must be non-negative, got {sizes['labels']}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _WORKER.value:
    _worker(_WORKER.value, _RESULT_FILE.value)
    return 0
  sizes = _sizes()
  _check_flags(sizes)
  records = []
  for path in (p for p in PATHS if p in _PATHS.value):
    reason = _skip_reason(path, sizes)
    record = _empty_record(path, skipped=reason) if reason else _run_worker(path)
    records.append(record)
    note = record.get("skipped") or record.get("error") or (
        f"{record['seconds']:.3f} s, peak RSS {record['peak_rss_mb']:.0f} MB, loss {record['loss']:.6g}")
    print(f"[{path}] {note}", flush=True)
  _add_ratios(records)

  print(f"\njax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs), {_DTYPE.value}; batch "
        f"{sizes['batch']}, {sizes['frames']} frames, {sizes['labels']} labels, vocab {sizes['vocab']}, dim "
        f"{sizes['dim']}, joint {sizes['joint_dim']}, lean frame_chunk {sizes['frame_chunk']}; loss value + "
        f"gradient, seconds = median of {sizes['repeats']} calls (compilation excluded), peak RSS per process, "
        "XLA temp = compiled memory_analysis. Ratios are against the lean path; absolute CPU times are not "
        "performance claims.\n")
  print(_table(records))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(records, f, indent=2)
    print(f"\nwrote {_OUTPUT.value}")
  return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
  app.run(main)
