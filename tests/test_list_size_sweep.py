"""experiments/kmp_synthetic/list_sizes.py: the lists it writes, the time it reports, its table."""

import importlib.util
import json
import os

import pytest

from tests import lm_runs


def _module():
  spec = importlib.util.spec_from_file_location("list_sizes",
                                                os.path.join(lm_runs.REPO, "experiments/kmp_synthetic/list_sizes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _corpus(root):
  rows = {"train": [{"text": "call bobo lati", "bias": ["bobo lati", "kiru sem"], "entities": ["bobo lati"]}],
          "dev": [{"text": "play zuma", "bias": ["zuma"], "entities": ["zuma"]}],
          "test": [{"text": "call mika dore", "bias": ["mika dore", "zuma"], "entities": ["mika dore"], "id": "t0"},
                   {"text": "play feno by rasi", "bias": ["feno", "rasi"], "entities": ["feno", "rasi"], "id": "t1"},
                   {"text": "what time is it", "bias": ["kiru sem"], "entities": [], "id": "t2"}]}
  for split, split_rows in rows.items():
    with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
      f.writelines(json.dumps({"audio": "a.wav", **row}) + "\n" for row in split_rows)
  return rows


def test_lists_hold_the_spoken_entities_then_distractors_and_nest(tmp_path):
  list_sizes = _module()
  rows = _corpus(tmp_path)
  paths = list_sizes.write_lists(str(tmp_path), [2, 5, 40])
  lists = {n: [json.loads(line) for line in open(p)] for n, p in paths.items()}
  transcripts = {w for split in rows.values() for r in split for w in r["text"].split()}
  for n, written in lists.items():
    assert [r["id"] for r in written] == ["t0", "t1", "t2"]
    for row, original in zip(written, rows["test"]):
      assert len(row["bias"]) == len(set(row["bias"])) == n
      assert row["bias"][:len(original["entities"])] == original["entities"]
      distractors = row["bias"][len(original["entities"]):]
      assert not set(distractors) & set(original["entities"])
      invented = [p for p in distractors if p not in {"bobo lati", "kiru sem", "zuma", "mika dore", "feno", "rasi"}]
      assert not {w for p in invented for w in p.split()} & transcripts
      assert row["text"] == original["text"] and row["entities"] == original["entities"]
      assert os.path.normpath(os.path.join(os.path.dirname(paths[n]), row["audio"])) == str(tmp_path / "a.wav")
  for small, large in ((2, 5), (5, 40)):  # a shorter list is a prefix of a longer one
    for a, b in zip(lists[small], lists[large]):
      assert b["bias"][:small] == a["bias"]
  again = list_sizes.write_lists(str(tmp_path), [40])
  assert open(again[40]).read() == open(paths[40]).read()
  with pytest.raises(ValueError, match="at least 2"):
    list_sizes.write_lists(str(tmp_path), [1, 10])


def test_time_per_utterance_leaves_out_the_first_batch_and_the_table_marks_what_did_not_run():
  list_sizes = _module()
  payload = {"utterances": 20, "timing": {"decode_seconds": 5.0, "first_batch_seconds": 3.0, "batches": 3}}
  assert list_sizes.per_utterance_seconds(payload, 8) == pytest.approx(2.0 / 12)
  assert list_sizes.per_utterance_seconds({**payload, "utterances": 8, "timing": {**payload["timing"], "batches": 1}},
                                          8) is None
  entry = {"wer": 0.25, "b_wer": 0.5, "u_wer": 0.125, "seconds_per_utterance": 0.04}
  results = {"no biasing": {"10": entry}, "Aho-Corasick": {"10": entry, "100": entry}, "KMP": {"10": entry}}
  table = list_sizes.list_size_table(results, [10, 100], 0.25, kmp_max_size=50)
  lines = table.splitlines()
  assert any("| 100" in line and "no biasing" in line and "25.00" in line for line in lines)  # shared unbiased row
  assert any("| 100" in line and "KMP" in line and "not run (> --kmp_max_size=50)" in line for line in lines)
  assert any("Aho-Corasick, delta=0.25" in line and "| 40 " in line for line in lines)
