"""scripts/make_synthetic_speech.py --corpus=contacts: the plan (pure, no espeak-ng) checked by naive
string search over the transcripts, and one tiny rendered corpus read back through the manifest task.
The names corpus (the default) is pinned by a digest of its plan: experiments depend on it.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import soundfile

from memlm_jax.data import speech
from scripts import make_synthetic_speech as synth

SEED = 11
DEFAULT_COUNTS = {"person": 400, "song": 150, "artist": 100}


@pytest.fixture(scope="module")
def plan():
  return synth.plan_contacts_corpus(seed=SEED)


def _spoken(text, phrases):
  """The phrases occurring in text as runs of whole words, by plain substring search, in text order."""
  padded = f" {text} "
  found = [(padded.find(f" {p} "), p) for p in phrases if f" {p} " in padded]
  return tuple(p for _, p in sorted(found))


def _words(phrases):
  return [w for p in phrases for w in p.split()]


def test_the_names_corpus_plan_is_unchanged():
  digest = hashlib.sha256()
  for seed in (0, 1, 7):
    for n in (5, 300, 1000):
      digest.update(repr(synth.plan_corpus(n, seed)).encode())
  digest.update(repr(synth.plan_corpus(300, 3, 0.2, 0.15, 3, 5)).encode())
  assert digest.hexdigest() == "943364e74f36647bc7a5489809916bb381c246669480af0e96b963ecdfdc074d"


def test_hundreds_of_distinct_invented_entities_sharing_no_word_with_the_templates(plan):
  assert {k: len(v) for k, v in plan.entities.items()} == DEFAULT_COUNTS
  pool = plan.eval_pool
  words = _words(pool)
  assert len(set(words)) == len(words)  # no two phrases share a word; every phrase is distinct
  sentences = synth.ENTITY_TEMPLATES + synth.MESSAGES + synth.NO_ENTITY_SENTENCES
  template_words = {w.strip("{}") for s in sentences for w in s.split()}
  assert not set(words) & (template_words | synth.COMMON_WORDS)
  assert all(w.isalpha() and w.islower() and len(w) >= 4 for w in words)
  assert all(len(p.split()) == 2 for p in plan.entities["person"])
  assert {len(p.split()) for p in plan.entities["song"]} == {1, 2, 3}
  assert {len(p.split()) for p in plan.entities["artist"]} == {1, 2}
  assert len(pool) >= 1000 + synth.EVAL_POOL_MARGIN and len(plan.extras) == len(pool) - sum(DEFAULT_COUNTS.values())


def test_held_out_entities_are_never_heard_or_listed_in_training(plan):
  specs = plan.specs
  assert [sum(s.split == split for s in specs) for split in synth.SPLITS] == [1300, 100, 100]
  assert plan.seen | plan.heldout == set(plan.eval_pool) - set(plan.extras) and not plan.seen & plan.heldout
  assert len(plan.heldout) == sum(round(0.25 * n) for n in DEFAULT_COUNTS.values())
  train_words = {w for s in specs if s.split == "train" for w in s.text.split() + _words(s.bias)}
  assert not train_words & set(_words(plan.heldout))
  for spec in specs:
    spoken = _spoken(spec.text, plan.eval_pool)
    assert spoken == spec.names  # what the plan says is spoken, in order; extras never are
    assert set(spoken) <= (plan.seen if spec.split == "train" else plan.heldout)
    assert set(spoken) <= set(spec.bias) and len(set(spec.bias)) == len(spec.bias) == len(spoken) + 5
    assert set(spec.bias) <= (plan.seen if spec.split == "train" else plan.seen | plan.heldout)
  for split in synth.SPLITS:
    in_split = [s for s in specs if s.split == split]
    assert sum(not s.names for s in in_split) == round(0.15 * len(in_split))  # commands naming no entity
  spoken_in_train = {n for s in specs if s.split == "train" for n in s.names}
  spoken_in_test = {n for s in specs if s.split == "test" for n in s.names}
  assert len(spoken_in_train) > 300 and len(spoken_in_test) > 50
  carriers = {s.text.replace(n, "X") for s in specs if s.names for n in s.names[:1]}
  assert len({c.split(" saying ")[0] for c in carriers}) >= 10  # several templates in use


def test_eval_lists_hold_exactly_n_phrases_with_the_spoken_entities(plan):
  test = [s for s in plan.specs if s.split == "test"]
  pool = set(plan.eval_pool)
  assert sorted(plan.eval_bias) == [10, 100, 1000]
  for n, lists in plan.eval_bias.items():
    assert list(lists) == [s.id for s in test]
    for spec in test:
      bias = lists[spec.id]
      assert len(bias) == len(set(bias)) == n and set(bias) <= pool
      assert _spoken(spec.text, bias) == spec.names  # the spoken entities; no distractor is spoken
  # Distractors are nested (those of N=10 among those of N=100 ...) and differ between utterances.
  for spec in test:
    assert set(plan.eval_bias[10][spec.id]) <= set(plan.eval_bias[100][spec.id]) <= set(plan.eval_bias[1000][spec.id])
  assert len({plan.eval_bias[10][s.id] for s in test}) == len(test)
  assert any(not s.names for s in test) and any(len(s.names) == 2 for s in test)


def test_the_plan_is_a_function_of_its_flags(plan):
  assert synth.plan_contacts_corpus(seed=SEED) == plan
  other = synth.plan_contacts_corpus(seed=SEED + 1)
  assert other.entities != plan.entities and [s.text for s in other.specs] != [s.text for s in plan.specs]
  small = synth.plan_contacts_corpus(40, seed=SEED, num_contacts=20, num_songs=8, num_artists=6,
                                     eval_list_sizes=(3, 50))
  assert len(small.specs) == 40 and sorted(small.eval_bias) == [3, 50]
  assert all(len(b) == 50 for b in small.eval_bias[50].values()) and len(small.eval_pool) == 150


@pytest.mark.parametrize("flags, message", [
    ({"heldout_fraction": 0.0}, "--heldout_fraction .* got 0.0"),
    ({"num_songs": 3, "heldout_fraction": 0.1}, "--heldout_fraction .*songs 3.* got 0.1"),
    ({"num_contacts": 1}, "--num_contacts must be at least 2 .*got 1"),
    ({"no_entity_fraction": 1.0}, "--no_entity_fraction must be in \\[0, 1\\), got 1.0"),
    ({"eval_list_sizes": (10, 1)}, "--eval_list_sizes .* at least 2 .* got \\[10, 1\\]"),
    ({"eval_list_sizes": (10, 10)}, "--eval_list_sizes must be distinct.* got \\[10, 10\\]"),
    ({"num_distractors": 10_000}, "--num_distractors must be in \\[0, 485\\].* got 10000"),
    ({"seed": -1}, "--seed must be non-negative, got -1"),
    ({"num_utterances": 2}, "--num_utterances must be at least 3"),
])
def test_bad_flags_are_refused_naming_the_value(flags, message):
  with pytest.raises(ValueError, match=message):
    synth.plan_contacts_corpus(**{"num_utterances": 100, **flags})


@pytest.mark.parametrize("argv, message", [
    (["--num_contacts=10"], "--num_contacts is for --corpus=contacts only"),
    (["--corpus=contacts", "--heldout_names=3"], "--heldout_names is for --corpus=names"),
    (["--corpus=contacts", "--eval_list_sizes=10,x"], "--eval_list_sizes must be comma-separated integers"),
])
def test_flags_of_the_other_corpus_are_refused(argv, message, tmp_path, capsys):
  assert synth.main([f"--output_dir={tmp_path}", *argv]) == 1
  assert message in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_a_rendered_contacts_corpus_reads_back_through_the_manifest_task(tmp_path, capsys):
  if shutil.which("espeak-ng") is None:
    pytest.fail("espeak-ng is not installed: run `make` (it installs espeak-ng with apt) or "
                "`sudo apt-get install -y espeak-ng`.")
  out = str(tmp_path)
  argv = [f"--output_dir={out}", "--corpus=contacts", "--num_utterances=3", "--workers=1", "--num_contacts=8",
          "--num_songs=4", "--num_artists=4", "--eval_list_sizes=2,6", f"--seed={SEED}"]
  assert synth.main(argv) == 0
  printed = capsys.readouterr().out
  plan = synth.plan_contacts_corpus(3, SEED, num_contacts=8, num_songs=4, num_artists=4, eval_list_sizes=(2, 6))
  names = ["train", "dev", "test", "test_n2", "test_n6"]
  assert sorted(os.listdir(out)) == sorted(["audio"] + [f"{n}.jsonl" for n in names])
  assert "total      3 utterances" in printed and synth.contacts_entity_summary(plan) in printed
  lines = {n: [json.loads(line) for line in open(os.path.join(out, f"{n}.jsonl"))] for n in names}
  for spec in plan.specs:
    (line,) = lines[spec.split]
    assert line == {"audio": f"audio/{spec.id}.wav", "text": spec.text, "id": spec.id, "bias": list(spec.bias),
                    "entities": list(spec.names)}
    info = soundfile.info(os.path.join(out, line["audio"]))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16") and 0.3 < info.duration < 10
    audio, _ = soundfile.read(os.path.join(out, line["audio"]), dtype="float32")
    assert np.sqrt(np.mean(audio ** 2)) > 0.01  # speech, not silence
  for size in (2, 6):
    (line,) = lines[f"test_n{size}"]
    assert {k: v for k, v in line.items() if k != "bias"} == {k: v for k, v in lines["test"][0].items() if k != "bias"}
    assert line["bias"] == list(plan.eval_bias[size][line["id"]]) and len(line["bias"]) == size
  entries = speech.parse_manifest(os.path.join(out, "test_n6.jsonl"))  # the task reader takes the lines as they are
  assert [e.bias for e in entries] == [tuple(line["bias"]) for line in lines["test_n6"]]
