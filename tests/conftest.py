"""Eight simulated CPU devices for every test (set before jax is imported)."""

import os

# The tests compile hundreds of small programs, and compiling dominates their time: LLVM's
# cheapest optimisation level saves about a fifth of the suite and changes no numerics that a
# test compares (both sides of every comparison, launcher subprocesses included, share these flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")  # tf.data only; keep TF off any accelerator


@pytest.fixture(autouse=True)
def _clear_gin():
  import gin
  gin.clear_config()
  yield
  gin.clear_config()


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
