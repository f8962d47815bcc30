"""Passkey report (Infini-attention Table 3 layout, heatmap) against hand-worked numbers, and the script."""

import copy
import json
import os
import subprocess
import sys

import pytest

from memlm_jax.evaluation import passkey_report as pk

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_1M = 1_048_576


def _example(length, depth, bucket, right, token_accuracy):
  return {"length": length, "depth": depth, "bucket": bucket, "key": 12345,
          "predicted": "12345" if right else "12845", "exact_match": right, "token_accuracy": token_accuracy}


def _infini():
  """2K: start 2 of 3 right, middle 1 of 2, end 1 of 1; 1M exceeds context in every bucket."""
  results = [
      _example(2048, 0.05, "start", True, 1.0), _example(2048, 0.20, "start", True, 1.0),
      _example(2048, 0.30, "start", False, 0.4),  # token accuracy (1 + 1 + 0.4) / 3 = 0.8
      _example(2048, 0.40, "middle", True, 1.0), _example(2048, 0.60, "middle", False, 0.5),  # 0.75
      _example(2048, 0.90, "end", True, 1.0),
  ]
  summary = [
      {"length": 2048, "bucket": "start", "examples": 3, "exact_match": 2 / 3, "token_accuracy": 0.8,
       "status": "ok"},
      {"length": 2048, "bucket": "middle", "examples": 2, "exact_match": 0.5, "token_accuracy": 0.75,
       "status": "ok"},
      {"length": 2048, "bucket": "end", "examples": 1, "exact_match": 1.0, "token_accuracy": 1.0, "status": "ok"},
  ] + [{"length": _1M, "bucket": b, "examples": 0, "status": "exceeds_context",
        "reason": "dense baseline holds at most 8192 tokens"} for b in pk.BUCKETS]
  return {"model": "tiny Infini (linear+delta)", "step": 1200, "metric_note": "greedy, 5 digits",
          "summary": summary, "results": results}


def _other():
  """Only 2K start was run: 1 of 4 right."""
  results = [_example(2048, 0.1 * i, "start", i == 0, 0.25) for i in range(4)]
  summary = [{"length": 2048, "bucket": "start", "examples": 4, "exact_match": 0.25, "token_accuracy": 0.25,
              "status": "ok"}]
  return {"model": "other", "step": 7, "summary": summary, "results": results}


def _block(text, first_header):
  """{row label: {column: cell}} of the markdown table whose header starts with `first_header`
  (row label: first cell; (setting, model) for the paper's table)."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
  split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
  header = split(lines[start])
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = split(line)
    rows[tuple(cells[:2]) if first_header == "Setting" else cells[0]] = dict(zip(header, cells))
  return rows


def test_length_labels():
  assert [pk.length_label(n) for n in (2048, 8192, 32_768, 131_072, 262_144, 524_288, _1M)] == \
      ["2K", "8K", "32K", "128K", "256K", "512K", "1M"]
  assert pk.length_label(1536) == "1.5K" and pk.length_label(3 * _1M) == "3M" and pk.length_label(1000) == "1000"


def test_table_exact_match_by_hand():
  text = pk.passkey_table([_infini(), _other()])
  rows = _block(text, "Model")
  assert list(rows) == ["tiny Infini (linear+delta)", "other"]
  infini, other = rows["tiny Infini (linear+delta)"], rows["other"]
  assert list(infini) == ["Model", "Step", "2K", "1M"]  # union of lengths, sorted
  assert infini["Step"] == "1200" and other["Step"] == "7"
  assert infini["2K"] == "67/50/100"  # 2/3, 1/2, 1/1
  assert infini["1M"] == "n/a (exceeds context)"
  assert other["2K"] == "25/-/-" and other["1M"] == "-"  # missing buckets / missing length
  assert "exact match (%)" in text
  assert "n/a (tiny Infini (linear+delta)) at 1M: exceeds context - dense baseline holds at most 8192 tokens" in text
  assert "note (tiny Infini (linear+delta)): greedy, 5 digits" in text


def test_table_token_accuracy():
  text = pk.passkey_table(_infini(), metric="token_accuracy")
  row = _block(text, "Model")["tiny Infini (linear+delta)"]
  assert row["2K"] == "80/75/100" and row["1M"] == "n/a (exceeds context)"
  assert "token accuracy (%)" in text
  with pytest.raises(ValueError, match="metric"):
    pk.passkey_table(_infini(), metric="f1")


def test_paper_rows():
  text = pk.passkey_table(_infini())
  paper = _block(text, "Setting")
  assert len(paper) == 4
  zero_linear = paper[("Zero-shot", "Infini-Transformer (Linear)")]
  assert list(zero_linear) == ["Setting", "Model (paper)", "32K", "128K", "256K", "512K", "1M"]
  assert [zero_linear[c] for c in ("32K", "128K", "256K", "512K", "1M")] == \
      ["14/13/98", "11/14/100", "6/3/100", "6/7/99", "8/6/98"]
  assert paper[("Zero-shot", "Infini-Transformer (Linear + Delta)")]["1M"] == "7/6/97"
  assert paper[("FT (400 steps)", "Infini-Transformer (Linear)")]["512K"] == "97/99/100"
  assert all(paper[("FT (400 steps)", "Infini-Transformer (Linear + Delta)")][c] == "100/100/100"
             for c in ("32K", "128K", "256K", "512K", "1M"))
  assert "Table 3" in text and "token-level" in text
  assert "Setting" not in pk.passkey_table(_infini(), paper=False)


def test_format_cell_edge_cases():
  ok = {"status": "ok", "examples": 8, "exact_match": 0.125, "token_accuracy": 0.5}
  off = {"status": "exceeds_context", "examples": 0}
  assert pk.format_cell({"start": ok, "middle": ok, "end": off}) == "13/13/n/a (end: exceeds context)"  # 12.5 -> 13
  assert pk.format_cell({"start": {**ok, "examples": 0}, "end": ok}, "token_accuracy") == "-/-/50"
  assert pk.format_cell({b: {"status": "oom", "examples": 0} for b in pk.BUCKETS}) == "n/a (oom)"
  assert pk.format_cell({}) == "-"
  data = _other()
  data["summary"].append({"length": 2048, "bucket": "end", "examples": 0, "status": "ok",
                          "exact_match": float("nan"), "token_accuracy": float("nan")})
  assert _block(pk.passkey_table(data, paper=False), "Model")["other"]["2K"] == "25/-/-"


def test_repeated_model_labels_get_step():
  late = {**_infini(), "step": 2400}
  rows = _block(pk.passkey_table([_infini(), late], paper=False), "Model")
  assert list(rows) == ["tiny Infini (linear+delta) @ step 1200", "tiny Infini (linear+delta) @ step 2400"]


def _assert_png(path):
  assert os.path.exists(path)
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_heatmap(tmp_path):
  path = pk.passkey_heatmap(_infini(), str(tmp_path / "sub" / "heat.png"))
  assert path == str(tmp_path / "sub" / "heat.png")
  _assert_png(path)
  _assert_png(pk.passkey_heatmap([_infini(), _other()], str(tmp_path / "two.png"), metric="token_accuracy",
                                 depth_bins=10))


def test_heatmap_depth_bins_and_cells():
  assert pk.choose_depth_bins(_infini()) == 3  # few examples: the paper's buckets
  many = _infini()
  many["results"] = [_example(2048, i / 29, "start", i % 2 == 0, 1.0) for i in range(30)]
  assert pk.choose_depth_bins(many) == pk.DEPTH_BINS
  values, status = pk._grid(_infini(), [2048, _1M], 3, "exact_match")
  assert values[0, 0] == (pytest.approx(2 / 3), 3) and values[1, 0] == (0.5, 2) and values[2, 0] == (1.0, 1)
  assert status == {(row, 1): "exceeds context" for row in range(3)}
  values, status = pk._grid(_other(), [2048], 3, "exact_match")
  assert values == {(0, 0): (0.25, 4)} and status == {}  # middle/end: no data, not n/a


def test_schema_errors(tmp_path):
  path = tmp_path / "bad.json"
  data = _infini()
  del data["summary"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"bad\.json.*'summary'"):
    pk.load_results(str(path))
  data = _infini()
  del data["summary"][1]["status"]
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"bad\.json: summary\[1\]: missing key 'status'"):
    pk.load_results(str(path))
  data = _infini()
  del data["summary"][0]["token_accuracy"]  # status ok needs both metrics
  with pytest.raises(ValueError, match=r"summary\[0\]: missing key 'token_accuracy'"):
    pk.validate_results(data)
  data = _infini()
  del data["results"][2]["depth"]
  with pytest.raises(ValueError, match=r"results\[2\]: missing key 'depth'"):
    pk.passkey_table(data)
  for broken, match in [({"bucket": "top"}, "bucket"), ({"length": 0}, "length"), ({"exact_match": 67}, "exact_match")]:
    data = _infini()
    data["summary"][0].update(broken)
    with pytest.raises(ValueError, match=match):
      pk.validate_results(data)
  data = _infini()
  data["summary"].append(copy.deepcopy(data["summary"][0]))
  with pytest.raises(ValueError, match="second entry"):
    pk.validate_results(data)
  path.write_text("{not json")
  with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
    pk.load_results(str(path))


def _run_script(*args):
  return subprocess.run([sys.executable, os.path.join("scripts", "make_tables.py"), *args],
                        capture_output=True, text=True, timeout=60, cwd=_REPO_ROOT)


def test_script_passkey(tmp_path):
  first, second = tmp_path / "infini.json", tmp_path / "other.json"
  first.write_text(json.dumps(_infini()))
  second.write_text(json.dumps(_other()))
  proc = _run_script("passkey", str(first), str(second))
  assert proc.returncode == 0, proc.stderr
  rows = _block(proc.stdout, "Model")
  assert rows["tiny Infini (linear+delta)"]["2K"] == "67/50/100"
  assert rows["tiny Infini (linear+delta)"]["1M"] == "n/a (exceeds context)" and rows["other"]["2K"] == "25/-/-"
  assert "| Zero-shot      | Infini-Transformer (Linear)         | 14/13/98 " in proc.stdout
  assert "heatmap" not in proc.stdout and not (tmp_path / "infini_heatmap.png").exists()

  proc = _run_script("passkey", str(first), "--metric", "token_accuracy", "--heatmap")
  assert proc.returncode == 0, proc.stderr
  assert _block(proc.stdout, "Model")["tiny Infini (linear+delta)"]["2K"] == "80/75/100"
  default = tmp_path / "infini_heatmap.png"
  assert f"wrote heatmap {default}" in proc.stdout
  _assert_png(str(default))

  proc = _run_script("passkey", str(first), "--heatmap", str(tmp_path / "mine.png"))
  assert proc.returncode == 0 and f"wrote heatmap {tmp_path / 'mine.png'}" in proc.stdout
  _assert_png(str(tmp_path / "mine.png"))


def test_script_passkey_takes_a_model_directory_and_reads_its_newest_eval(tmp_path):
  (tmp_path / "run" / "eval").mkdir(parents=True)
  older, newer = _infini(), _other()
  (tmp_path / "run" / "eval" / "passkey_step5.json").write_text(json.dumps(older))
  (tmp_path / "run" / "eval" / "passkey_step12.json").write_text(json.dumps(newer))
  (tmp_path / "run" / "eval" / "passkey_step9.json.tmp").write_text("{")
  proc = _run_script("passkey", str(tmp_path / "run"), "--no_paper", "--heatmap")
  assert proc.returncode == 0, proc.stderr
  assert list(_block(proc.stdout, "Model")) == ["other"]
  _assert_png(str(tmp_path / "run" / "eval" / "passkey_step12_heatmap.png"))
  (tmp_path / "empty").mkdir()
  proc = _run_script("passkey", str(tmp_path / "empty"))
  assert proc.returncode == 2 and "empty" in proc.stderr and "passkey_<hash>_step<N>.json" in proc.stderr


def test_script_passkey_errors(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"model": "m", "step": 1, "summary": []}))
  proc = _run_script("passkey", str(bad))
  assert proc.returncode == 2 and "bad.json" in proc.stderr and "'results'" in proc.stderr
  proc = _run_script("passkey", str(tmp_path / "missing.json"))
  assert proc.returncode == 2 and "missing.json" in proc.stderr
