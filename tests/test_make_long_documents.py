"""scripts/make_long_documents.py: the generated structure checked against the text (back-references far
from their definitions, held-out names, summaries drawing on the whole input), the refused flags, and
main() end to end into a temporary directory."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from scripts import make_long_documents as mld

DISTANCE = 150  # the default --min_reference_distance
SMALL = ["--num_train=3", "--num_validation=2", "--num_test=2", "--words_per_document=400"]


def _invented_words(document: mld.LongDocument) -> set[str]:
  names = [*(e.name for e in document.entities), *(e.pet_name for e in document.entities), *document.distractors]
  return {word for name in names for word in name.split()}


def _tree(directory: str) -> dict[str, bytes]:
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def test_same_seed_same_text_other_seed_different():
  for make in (mld.lm_document, mld.summarization_example):
    first = make(np.random.default_rng(5), 400)
    assert make(np.random.default_rng(5), 400) == first
    assert make(np.random.default_rng(6), 400) != first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_back_references_recall_a_definition_far_back(seed):
  document = mld.generate_document(mld.document_rng(seed, "train", 0))
  text = document.text
  assert mld.parse_entities(text) == document.entities  # the text alone gives the cast
  words = len(text.split())
  assert 1500 <= words < 1540 and "\n" not in text
  cast = {e.name: e for e in document.entities}
  for (start, end), entity in zip(document.definitions, document.entities):
    assert text[start:end].startswith(f"{entity.name} is ")
    assert mld.word_distance(text, 0, start) < 0.3 * words  # lm: the cast is defined early

  references = mld.back_references(text)
  assert len(references) >= 2 * len(cast)
  for reference in references:
    entity = cast[reference.entity]
    assert text[reference.start:reference.end] == reference.mention in (entity.name, entity.pet_name)
    definition = document.definitions[document.entities.index(entity)]
    assert definition[0] < reference.definition_end <= definition[1] < reference.start
    assert reference.mention in text[definition[0]:reference.definition_end]
    assert mld.word_distance(text, reference.definition_end, reference.start) >= DISTANCE
  # The parsed mentions are exactly the generator's reference sentences, each person's far from its previous mention.
  sentences = {(r.sentence_start, r.sentence_end, document.entities.index(cast[r.entity])) for r in references}
  assert sentences == set(document.references)
  for index, entity in enumerate(document.entities):
    mentions = [document.definitions[index]] + [(s, e) for s, e, i in document.references if i == index]
    assert len(mentions) >= 3
    for (_, previous_end), (start, _) in zip(mentions, mentions[1:]):
      assert mld.word_distance(text, previous_end, start) >= DISTANCE
    assert text.count(entity.name) == text.count(entity.name.split()[0])  # filler never uses a cast word


def test_validation_and_test_names_are_held_out_and_names_rarely_repeat():
  words = {}
  full_names = []
  for split in mld.SPLITS:
    words[split] = set()
    for index in range(25):
      document = mld.generate_document(mld.document_rng(3, split, index), 150, 6, split)
      words[split] |= _invented_words(document)
      full_names += [e.name for e in document.entities]
    assert all(mld.held_out_split(word) == split for word in words[split])
  assert not words["train"] & words["validation"] and not words["train"] & words["test"]
  assert not words["validation"] & words["test"]
  assert len(set(full_names)) == len(full_names)
  for split in mld.SPLITS:  # 5 invented words per (person, pet, distractor); a held-out tenth has few short surnames
    assert len(words[split]) > 0.85 * 25 * 6 * 5


def test_the_vocabulary_is_modest():
  seen = set()
  for index in range(10):
    document = mld.generate_document(mld.document_rng(0, "train", index), 1000)
    invented = {w.lower() for w in _invented_words(document)}
    seen |= {w for w in re.findall(r"[a-z]+", document.text.lower()) if w not in invented}
  assert seen <= mld.vocabulary() and 250 < len(mld.vocabulary()) < 400


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_summary_facts_are_spread_across_the_input(seed):
  example = mld.summarization_example(mld.document_rng(seed, "test", 0))
  text, summary = example["text"], example["summary"]
  assert set(example) == {"text", "summary"} and 15 <= len(summary.split()) <= 40
  cast = mld.parse_entities(text)
  assert summary == mld.summary(cast) and len(cast) == 4
  listed = re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+), the ([a-z]+) from ([A-Z][a-z]+)", summary)
  assert listed == [(e.name, e.occupation, e.town) for e in cast]
  positions = [text.index(f"{name} is a") / len(text) for name, _, _ in listed]
  assert positions == sorted(positions) and positions[0] < 1 / 3 and positions[-1] > 2 / 3
  for name, occupation, town in listed:
    assert re.search(rf"{name} is an? {occupation} from {town}\.", text)
  distractors = re.findall(r"named ([A-Z][a-z]+ [A-Z][a-z]+) ", text)
  assert len(distractors) == 4 and not any(name in summary for name in distractors)


@pytest.mark.parametrize("flags, message", [
    (["--num_train=0"], "--num_train must be positive"),
    (["--num_test=-2"], "--num_test must be positive"),
    (["--corpus=poetry"], "--corpus must be one of"),
    (["--words_per_document=50"], "--words_per_document must be at least 100"),
    (["--num_entities=0"], "--num_entities must be in [1, 10]"),
    (["--num_entities=11"], "--num_entities must be in [1, 10]"),
    (["--num_distractors=-1"], "--num_distractors must be in [0, 10]"),
    (["--min_reference_distance=0"], "--min_reference_distance must be positive"),
    (["--seed=-1"], "--seed must be non-negative"),
])
def test_bad_flags_are_refused_before_writing(tmp_path, capsys, flags, message):
  output = tmp_path / "out"
  assert mld.main([f"--output_dir={output}", *SMALL, *flags]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not os.listdir(tmp_path)


def test_an_existing_directory_is_replaced_only_with_overwrite_and_only_if_ours(tmp_path, capsys):
  output = tmp_path / "out"
  output.mkdir()
  (output / "notes.txt").write_text("mine")
  for extra in ([], ["--overwrite"]):
    assert mld.main([f"--output_dir={output}", *SMALL, *extra]) == 1
    assert (output / "notes.txt").read_text() == "mine" and os.listdir(output) == ["notes.txt"]
  assert "pass --overwrite" in capsys.readouterr().err
  (tmp_path / "file").write_text("x")
  assert mld.main([f"--output_dir={tmp_path / 'file'}", *SMALL]) == 1
  assert "is not a directory" in capsys.readouterr().err

  (output / "notes.txt").unlink()  # an empty directory is fine, and ours may be overwritten
  assert mld.main([f"--output_dir={output}", *SMALL]) == 0
  first = _tree(output)
  assert mld.main([f"--output_dir={output}", *SMALL, "--seed=1", "--overwrite"]) == 0
  assert _tree(output) != first and sorted(os.listdir(tmp_path)) == ["file", "out"]


def test_a_failed_run_leaves_no_output(tmp_path, monkeypatch):
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) > 2:
      raise RuntimeError("killed")
    return generate(*args, **kwargs)

  generate = mld.generate_document
  monkeypatch.setattr(mld, "generate_document", failing)
  with pytest.raises(RuntimeError):
    mld.main([f"--output_dir={tmp_path / 'out'}", *SMALL])
  assert not os.listdir(tmp_path)


def test_main_writes_the_lm_corpus(tmp_path, capsys):
  output = tmp_path / "lm"
  assert mld.main([f"--output_dir={output}", *SMALL, "--seed=4", "--num_entities=3"]) == 0
  line = capsys.readouterr().out
  assert line.startswith(f"wrote lm corpus to {output}: 7 documents,") and line.count("\n") == 1
  assert "mean definition-to-reference distance" in line
  assert sorted(os.listdir(output)) == ["corpus.json", "spm_input.txt", "test", "train", "validation"]
  sentences = []
  for split, count in (("train", 3), ("validation", 2), ("test", 2)):
    assert sorted(os.listdir(output / split)) == [f"doc_{i:05d}.txt" for i in range(count)]
    for index in range(count):
      text = mld.lm_document(mld.document_rng(4, split, index), 400, 3, split)
      assert (output / split / f"doc_{index:05d}.txt").read_text(encoding="utf-8") == text + "\n"
      if split == "train":
        sentences += [text[start:end] for start, end in mld.sentence_spans(text)]
  assert (output / "spm_input.txt").read_text(encoding="utf-8").splitlines() == sentences
  assert json.loads((output / "corpus.json").read_text())["num_entities"] == 3

  again, other = tmp_path / "again", tmp_path / "other"
  assert mld.main([f"--output_dir={again}", *SMALL, "--seed=4", "--num_entities=3"]) == 0
  assert mld.main([f"--output_dir={other}", *SMALL, "--seed=5", "--num_entities=3"]) == 0
  assert _tree(again) == _tree(output) and _tree(other) != _tree(output)
  assert sorted(os.listdir(tmp_path)) == ["again", "lm", "other"]  # no temporary directory left behind


def test_main_writes_the_summarization_corpus(tmp_path, capsys):
  output = tmp_path / "summ"
  assert mld.main([f"--output_dir={output}", "--corpus=summarization", *SMALL]) == 0
  assert "summary facts defined" in capsys.readouterr().out
  assert sorted(os.listdir(output)) == ["corpus.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
  for split, count in (("train", 3), ("validation", 2), ("test", 2)):
    lines = (output / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        mld.summarization_example(mld.document_rng(0, split, i), 400, 4, split) for i in range(count)]
