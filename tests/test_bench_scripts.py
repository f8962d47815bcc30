"""The benchmark scripts still run and write the JSON their readers expect."""

import json
import subprocess
import sys
import pytest

from tests import lm_runs


@pytest.mark.slow  # CI time budget; run by make test-all
def test_bench_infini_quick_writes_one_record_per_model_and_length(tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run([sys.executable, "scripts/bench_infini.py", "--quick", f"--output={out}"], cwd=lm_runs.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.loads(out.read_text())
  assert {(r["model"], r["length"]) for r in records} == {(m, n) for m in ("infini", "dense") for n in (2048, 8192)}
  for record in records:
    assert record["seconds"] > 0 and record["peak_rss_mb"] > 0
    assert abs(record["tokens_per_s"] - record["length"] / record["seconds"]) < 1e-6 * record["tokens_per_s"]
  assert "memory check: PASS" in result.stdout
