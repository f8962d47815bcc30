r"""Train-step throughput of the dense Transformer LM: seconds/step, tokens/s, FLOP/s, MFU.

  python scripts/bench_train_step.py --configs=tiny,small --output=results/bench_train_step.json
  python scripts/bench_train_step.py --configs=small --dtype=bfloat16 --peak_flops=989e12

Each config is a gin file (tiny: configs/tiny/transformer_lm.gin, small:
configs/models/transformer_lm_small.gin, or a path to any gin file that sets MODEL).
The model, optimizer (make_optimizer, adamw by default), data-parallel mesh, train
state and Trainer are built the way memlm_jax/train.py builds them; batches are
synthetic random tokens (all positions weighted), made once and placed on the devices
before timing, so the numbers are the jitted step alone, not the input pipeline.

Measured per config:
  first_step_s   wall time of the first step, compilation included;
  step_s         median over --steps timed steps (after --warmup untimed ones), each
                 ended by jax.block_until_ready on the new state and metrics;
  tokens_per_s   batch_size * seq_len / step_s;
  flops_per_step model.flops_per_token(seq_len) * tokens (PaLM-style 6N + attention,
                 causal-unaware: the count the model defines, not what XLA executes);
  mfu            achieved FLOP/s / (peak_flops * num_devices), only when --peak_flops
                 is given (it is per device; there is no built-in table of peaks).
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (registers every gin configurable)
from memlm_jax.runtime import optimizers, partitioning  # noqa: E402
from memlm_jax.runtime import train_state as train_state_lib  # noqa: E402
from memlm_jax.runtime.trainer import Trainer  # noqa: E402

# name -> (gin file relative to configs/, default seq_len, default batch_size)
CONFIGS = {
    "tiny": ("tiny/transformer_lm.gin", 128, 16),
    "small": ("models/transformer_lm_small.gin", 512, 8),
}
_CONFIG_DIR = os.path.join(_REPO_ROOT, "configs")

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small"],
                             f"Configs to run: names ({', '.join(CONFIGS)}) or paths to gin files that set MODEL.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default per config: tiny 16, small 8).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default per config: tiny 128, small 512).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default 5 on CPU, 20 on an accelerator).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s of one device for MFU; 0 = unknown (MFU n/a).")
_OUTPUT = flags.DEFINE_string("output", "results/bench_train_step.json", "Where the JSON results go.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices on the data axis (default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for parameters and synthetic tokens.")


class _DropGinPathNotFound(py_logging.Filter):
  """gin logs an ERROR for every search-path prefix an `include` does not resolve under."""

  def filter(self, record):
    return not record.getMessage().startswith("Path not found:")


@contextlib.contextmanager
def _quiet_gin_includes():
  root = py_logging.getLogger()
  flt = _DropGinPathNotFound()
  root.addFilter(flt)
  try:
    yield
  finally:
    root.removeFilter(flt)


def _resolve_config(name: str) -> tuple[str, int | None, int | None]:
  if name in CONFIGS:
    rel, seq_len, batch = CONFIGS[name]
    return os.path.join(_CONFIG_DIR, rel), seq_len, batch
  if name.endswith(".gin"):
    path = name if os.path.isabs(name) or os.path.isfile(name) else os.path.join(_CONFIG_DIR, name)
    if not os.path.isfile(path):
      raise app.UsageError(f"--configs: gin file {name!r} not found (also looked in {_CONFIG_DIR}).")
    return path, None, None
  raise app.UsageError(f"--configs: unknown config {name!r}; expected one of {sorted(CONFIGS)} or a .gin path.")


def _model_factory(gin_path: str, dtype: str):
  """Parses the gin file (plus the dtype binding) and returns the MODEL factory."""
  gin.clear_config()
  gin.add_config_file_search_path(_CONFIG_DIR)
  with _quiet_gin_includes():
    gin.parse_config_files_and_bindings([gin_path], [f"TransformerLM.dtype = '{dtype}'"], finalize_config=False)
  try:
    model = gin.query_parameter("%MODEL")
  except ValueError as error:
    raise ValueError(f"{gin_path} does not set the MODEL macro.") from error
  if isinstance(model, gin.config.ConfigurableReference):
    model = model.scoped_configurable_fn
  if not callable(model):
    raise ValueError(f"MODEL in {gin_path} is {model!r}, expected a configurable model class.")
  return model


def _synthetic_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
  """Random tokens in [1, vocab) (0 is padding), targets = inputs shifted left, all weighted."""
  tokens = rng.integers(1, vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
  return {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones((batch, seq_len), np.float32),
  }


def bench_one(name: str, *, batch_size: int | None, seq_len: int | None, steps: int, warmup: int, dtype: str,
              peak_flops: float, num_devices: int | None, seed: int) -> dict:
  gin_path, default_seq, default_batch = _resolve_config(name)
  seq_len = seq_len or default_seq
  batch_size = batch_size or default_batch
  if not seq_len or not batch_size:
    raise app.UsageError(f"--configs={name}: no default sizes for a custom gin file; pass --seq_len and "
                         "--batch_size.")
  model = _model_factory(gin_path, dtype)
  model_fn = lambda rngs: model(rngs=rngs)  # noqa: E731

  mesh = partitioning.make_mesh(data=-1, fsdp=1, tensor=1, num_devices=num_devices)
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise app.UsageError(f"--batch_size={batch_size} is not divisible by the {n_dev} devices of the data axis.")
  if batch_size % jax.process_count():
    raise app.UsageError(f"--batch_size={batch_size} is not divisible by {jax.process_count()} processes.")
  parts = partitioning.Partitioner(
      gin_utils.read_binding("mesh/logical_axis_rules.gin", "Partitioner.logical_axis_rules"), mesh=mesh)
  schedule = optimizers.warmup_cosine_schedule()
  tx = optimizers.make_optimizer(schedule=schedule)

  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(seed)))
  graphdef, abstract_params = train_state_lib.abstract_model(model_fn, seed)
  _, shardings = parts.train_state_shardings(abstract_params, tx)
  trainer = Trainer(graphdef, tx, schedule, parts, shardings, accum_steps=1, dropout_seed=seed + 1)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  with parts.context():
    state = train_state_lib.init_train_state(model_fn, tx, shardings, seed)
  jax.block_until_ready(state)

  local_batch = batch_size // jax.process_count()
  rng = np.random.default_rng(seed + jax.process_index())
  batches = [parts.global_batch(_synthetic_batch(rng, local_batch, seq_len, abstract_model.vocab_size))
             for _ in range(2)]
  jax.block_until_ready(batches)

  start = time.perf_counter()
  state, metrics = trainer.train_step(state, batches[0])
  jax.block_until_ready((state, metrics))
  first_step_s = time.perf_counter() - start

  for i in range(warmup):
    state, metrics = trainer.train_step(state, batches[(i + 1) % 2])
  jax.block_until_ready((state, metrics))

  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  final = {k: float(v) for k, v in jax.device_get(metrics).items()}
  del state, batches

  step_s = statistics.median(times)
  tokens = batch_size * seq_len
  flops_per_step = abstract_model.flops_per_token(seq_len) * tokens
  achieved = flops_per_step / step_s
  return {
      "config": name,
      "gin_file": os.path.relpath(gin_path, _REPO_ROOT),
      "dtype": dtype,
      "num_params": int(num_params),
      "num_devices": int(n_dev),
      "batch_size": batch_size,
      "seq_len": seq_len,
      "tokens_per_step": tokens,
      "warmup_steps": warmup,
      "timed_steps": steps,
      "first_step_s": first_step_s,
      "step_s": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "tokens_per_s": tokens / step_s,
      "flops_per_token": float(abstract_model.flops_per_token(seq_len)),
      "flops_per_step": float(flops_per_step),
      "achieved_flops_per_s": achieved,
      "achieved_flops_per_s_per_device": achieved / n_dev,
      "peak_flops_per_device": peak_flops or None,
      "mfu": achieved / (peak_flops * n_dev) if peak_flops > 0 else None,
      "final_loss": final["loss"],
  }


def _environment(num_devices: int | None) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      "jax_version": jax.__version__,
      "flax_version": flax.__version__,
      "python_version": platform.python_version(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "devices_used": num_devices or len(devices),
      "process_count": jax.process_count(),
      "host_cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def _fmt_si(x: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.2f}"


def _table(rows: list[dict]) -> str:
  header = ["config", "dtype", "params", "devices", "batch", "seq", "first_step_s", "step_s", "tokens/s",
            "FLOPs/step", "FLOP/s", "MFU"]
  lines = [[r["config"], r["dtype"], _fmt_si(r["num_params"]), str(r["num_devices"]), str(r["batch_size"]),
            str(r["seq_len"]), f"{r['first_step_s']:.2f}", f"{r['step_s']:.4f}", f"{r['tokens_per_s']:.0f}",
            _fmt_si(r["flops_per_step"]), _fmt_si(r["achieved_flops_per_s"]),
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in rows]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
  out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
  out.append("  ".join("-" * w for w in widths))
  out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
  return "\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:  # seqio imports TensorFlow; keep it off any accelerator.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError):
    pass
  steps = _STEPS.value if _STEPS.value is not None else (5 if jax.default_backend() == "cpu" else 20)
  if steps < 1 or _WARMUP.value < 0:
    raise app.UsageError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {_WARMUP.value}.")
  if _PEAK_FLOPS.value < 0:
    raise app.UsageError(f"--peak_flops must be >= 0, got {_PEAK_FLOPS.value}.")
  for value, flag in ((_BATCH_SIZE.value, "batch_size"), (_SEQ_LEN.value, "seq_len")):
    if value is not None and value <= 0:
      raise app.UsageError(f"--{flag} must be positive, got {value}.")
  env = _environment(_NUM_DEVICES.value)
  rows = []
  for name in _CONFIGS.value:
    rows.append(bench_one(name, batch_size=_BATCH_SIZE.value, seq_len=_SEQ_LEN.value, steps=steps,
                          warmup=_WARMUP.value, dtype=_DTYPE.value, peak_flops=_PEAK_FLOPS.value,
                          num_devices=_NUM_DEVICES.value, seed=_SEED.value))
    jax.clear_caches()
  gin.clear_config()

  print(f"jax {env['jax_version']} on {env['devices_used']} of {env['device_count']} x {env['device_kind']} "
        f"({env['backend']}); median of {steps} steps after {_WARMUP.value} warm-up; "
        f"FLOPs = flops_per_token(seq_len) x tokens.")
  print(_table(rows))
  if jax.process_index() == 0 and _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump({"environment": env, "rows": rows}, f, indent=2)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
