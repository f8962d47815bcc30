"""Infini-attention Table 1 footprints against hand-worked numbers, and the make_tables script."""

import os
import subprocess
import sys

import pytest

from memlm_jax.evaluation import memory_footprint as mf

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(**knobs):
  base = dict(num_layers=2, num_heads=3, d_key=4, d_value=5, d_model=12, segment_length=10, num_segments=6)
  return mf.MemoryConfig(**{**base, **knobs})


def _by_model(cfg):
  return {r.model: r for r in mf.memory_footprints(cfg)}


def test_small_config_by_hand():
  rows = _by_model(_small(compressed_memory_size=7, compression_rate=3, knn_memory_length=50, knn_layers=1,
                          rmt_memory_tokens=4, autocompressor_summary_tokens=3, autocompressor_accumulations=3))
  # (floats, context): l=2 H=3 dk=4 dv=5 dm=12 N=10 S=6 c=7 r=3 M=50 k=1 p_rmt=4 p_ac=3 m=3
  want = {
      "Transformer-XL": (9 * 3 * 10 * 2, 20),  # 540
      "Compressive Transformer": (12 * 17 * 2, (7 * 3 + 10) * 2),  # 408, 62
      "Memorizing Transformers": (9 * 3 * (20 + 50), 60),  # 1890
      "RMT": (12 * 4 * 2 * 2, 60),  # 192
      "AutoCompressors": (12 * 3 * 4 * 2, 60),  # 288
      "Infini-Transformer": (4 * 6 * 3 * 2, 60),  # 144
  }
  assert list(rows) == list(want)
  assert {m: (r.floats, r.context_length) for m, r in rows.items()} == want
  assert want["Compressive Transformer"] == (408, 62) and want["Memorizing Transformers"][0] == 1890


def test_small_config_defaults():
  rows = _by_model(_small())
  assert rows["Compressive Transformer"].floats == 12 * (10 + 10) * 2  # c = N
  assert rows["Compressive Transformer"].context_length == (10 * 4 + 10) * 2  # r = 4
  assert rows["AutoCompressors"].floats == 12 * 50 * 6 * 2  # p = 50, m = S-1 = 5
  assert rows["RMT"].floats == 12 * 100 * 2 * 2  # p = 100
  assert rows["Memorizing Transformers"].floats == 9 * 3 * (20 + 65_000)


def test_paper_config_sizes():
  cfg = mf.paper_lm_config()
  assert (cfg.num_layers, cfg.num_heads, cfg.d_key, cfg.d_value, cfg.d_model, cfg.segment_length,
          cfg.num_segments) == (12, 8, 128, 128, 1024, 2048, 32)
  rows = _by_model(cfg)
  assert rows["Infini-Transformer"].floats == 1_585_152
  assert rows["Transformer-XL"].floats == 50_331_648
  assert rows["RMT"].floats == 2_457_600
  assert rows["Memorizing Transformers"].floats == 2048 * (24_576 + 65_000) == 183_451_648
  assert rows["Transformer-XL"].context_length == 24_576
  assert rows["Infini-Transformer"].context_length == 65_536
  for model, (size, _) in mf.PAPER_TABLE2.items():
    assert mf.format_count(rows[model].floats) == size


def test_paper_config_ratios():
  rows = mf.memory_footprints(mf.paper_lm_config())
  rounded = mf.compression_ratios(rows, rounded=True)
  exact = mf.compression_ratios(rows)
  assert rounded["Infini-Transformer"] == pytest.approx(183 / 1.6)
  for model, (_, ratio) in mf.PAPER_TABLE2.items():
    assert mf.format_ratio(rounded[model]) == ratio
    assert exact[model] == pytest.approx(float(ratio[:-1]), rel=0.05)
  assert exact["Infini-Transformer"] == pytest.approx(183_451_648 / 1_585_152)


def test_65536_reading_does_not_give_183m():
  rows = _by_model(mf.paper_lm_config(knn_memory_length=65_536))
  assert rows["Memorizing Transformers"].floats == 184_549_376
  assert mf.format_count(rows["Memorizing Transformers"].floats) == "185M"


def test_formatting():
  assert mf.format_count(1_585_152) == "1.6M" and mf.round_count(1_585_152) == 1.6e6
  assert mf.format_count(2_457_600) == "2.5M" and mf.format_count(999) == "999"
  assert mf.format_ratio(183 / 50) == "3.7x" and mf.format_ratio(1.0) == "1x" and mf.format_ratio(73.2) == "73x"


@pytest.mark.parametrize("field", ["num_layers", "num_heads", "d_key", "d_value", "d_model", "segment_length",
                                   "num_segments", "compressed_memory_size", "compression_rate",
                                   "knn_memory_length", "rmt_memory_tokens"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_raises(field, value):
  with pytest.raises(ValueError, match=field):
    _small(**{field: value})


def test_other_bad_configs():
  with pytest.raises(ValueError, match="autocompressor_accumulations"):
    _small(autocompressor_accumulations=-1)
  _small(autocompressor_accumulations=0)
  with pytest.raises(ValueError, match="knn_layers"):
    _small(knn_layers=3)
  with pytest.raises(ValueError, match="d_key"):
    _small(d_key=2.5)
  with pytest.raises(ValueError, match="context_length"):
    mf.paper_lm_config(context_length=0)
  with pytest.raises(ValueError, match="head_dim"):
    mf.paper_lm_config(head_dim=-1)


def _run_script(*args):
  return subprocess.run([sys.executable, os.path.join(_REPO_ROOT, "scripts", "make_tables.py"), *args],
                        capture_output=True, text=True, timeout=60, cwd=_REPO_ROOT)


def test_script_memory():
  proc = _run_script("memory")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  infini = next(l for l in lines if l.startswith("| Infini-Transformer"))
  memorizing = next(l for l in lines if l.startswith("| Memorizing Transformers"))
  assert "1,585,152" in infini and "1.6M" in infini and "114x" in infini and "1.6M / 114x" in infini
  assert "183,451,648" in memorizing and "183M / 1x" in memorizing


def test_script_memory_overrides_and_errors():
  proc = _run_script("memory", "--num_layers", "24", "--context_length", "1048576")
  assert proc.returncode == 0, proc.stderr
  infini = next(l for l in proc.stdout.splitlines() if l.startswith("| Infini-Transformer"))
  assert f"{128 * 129 * 8 * 24:,}" in infini and "1,048,576" in infini
  assert "Paper Table 2 |" not in proc.stdout and "column omitted" in proc.stdout
  proc = _run_script("memory", "--num_heads", "0")
  assert proc.returncode == 2 and "num_heads" in proc.stderr
