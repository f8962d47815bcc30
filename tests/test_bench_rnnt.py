"""scripts/bench_rnnt.py: its naive baseline against brute force, and the --quick run's JSON."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_REPO_ROOT, "scripts", "bench_rnnt.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_rnnt", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _brute_force_nll(logits, labels, blank_id=0):
  """-log of the summed probability of every alignment; logits [T, U + 1, V] float64, labels [U]."""
  frames, u1, _ = logits.shape
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total = 0.0
  for label_slots in itertools.combinations(range(frames + u1 - 2), u1 - 1):
    t = u = 0
    log_p = 0.0
    for i in range(frames + u1 - 2):
      if i in label_slots:
        log_p, u = log_p + lp[t, u, labels[u]], u + 1
      else:
        log_p, t = log_p + lp[t, u, blank_id], t + 1
    total += np.exp(log_p + lp[t, u, blank_id])
  return -np.log(total)


def test_naive_baseline_matches_brute_force_on_a_padded_batch():
  bench = _load_script()
  rng = np.random.default_rng(0)
  lengths = [(4, 3), (3, 1), (1, 2), (2, 0)]
  b, t_max, u_max, vocab = len(lengths), 4, 3, 5
  logits = rng.normal(size=(b, t_max, u_max + 1, vocab)).astype(np.float32)
  labels = rng.integers(1, vocab, size=(b, u_max)).astype(np.int32)
  logit_pad = np.array([[float(i >= t) for i in range(t_max)] for t, _ in lengths], np.float32)
  label_pad = np.array([[float(i >= u) for i in range(u_max)] for _, u in lengths], np.float32)
  got = np.asarray(jax.jit(bench.naive_rnnt_loss)(logits, logit_pad, labels, label_pad))
  want = [_brute_force_nll(logits[i, :t, :u + 1].astype(np.float64), labels[i, :u])
          for i, (t, u) in enumerate(lengths)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _run(tmp_path, *flags):
  out = tmp_path / "bench_rnnt.json"
  result = subprocess.run([sys.executable, _SCRIPT, "--quick", f"--output={out}", *flags], cwd=_REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text())


def test_bench_rnnt_quick_writes_one_record_per_path(tmp_path):
  stdout, records = _run(tmp_path)
  assert [r["path"] for r in records] == ["lean", "plain", "naive"]
  by_path = {r["path"]: r for r in records}
  lean = by_path["lean"]
  for r in records:
    assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["rss_before_compile_mb"] <= r["peak_rss_mb"]
    assert r["seconds"] == pytest.approx(np.median(r["all_seconds"]))
    assert (r["batch"], r["frames"], r["labels"], r["vocab"]) == (2, 12, 4, 32)  # the --quick sizes
    assert r["seconds_vs_lean"] == pytest.approx(r["seconds"] / lean["seconds"])
    assert r["peak_rss_vs_lean"] == pytest.approx(r["peak_rss_mb"] / lean["peak_rss_mb"])
    if r["temp_bytes"] is not None:
      assert r["temp_bytes_vs_lean"] == pytest.approx(r["temp_bytes"] / lean["temp_bytes"])
    # All three paths compute the same loss on the same inputs.
    assert r["loss"] == pytest.approx(lean["loss"], rel=1e-5)
  assert lean["seconds_vs_lean"] == 1.0
  assert "| path |" in stdout and "ratio vs lean" in stdout


def test_bench_rnnt_skips_the_naive_path_above_its_cell_cap(tmp_path):
  _, records = _run(tmp_path, "--paths=naive", "--naive_max_cells=10")
  (record,) = records
  assert record["path"] == "naive" and record["seconds"] is None
  assert "--naive_max_cells=10" in record["skipped"] and record["seconds_vs_lean"] is None
