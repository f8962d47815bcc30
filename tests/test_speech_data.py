"""Speech data: the espeak-ng corpus generator, manifests, seqio speech tasks, fixed-shape batches, SentencePiece.

References are written here independently: audio read straight with soundfile and padded by
hand, transcripts encoded with the vocabulary, name occurrences found by substring search.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import seqio
import soundfile
import tensorflow as tf

from memlm_jax.data import pipeline, speech, speech_features
from memlm_jax.data.vocabularies import byte_vocabulary, sentencepiece_vocabulary
from memlm_jax.evaluation import bias_lists
from scripts import make_synthetic_speech as synth
from scripts import train_spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = byte_vocabulary()
NUM_UTTERANCES = 5
SEED = 7


def _require_espeak():
  if shutil.which("espeak-ng") is None:
    pytest.fail("espeak-ng is not installed, and the speech tests synthesize their corpus with it: run `make` "
                "(it installs espeak-ng with apt) or `sudo apt-get install -y espeak-ng`.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  _require_espeak()
  out = str(tmp_path_factory.mktemp("synth"))
  synth.make_corpus(out, num_utterances=NUM_UTTERANCES, seed=SEED, workers=1)
  return out


def _lines(manifest):
  with open(manifest) as f:
    return [json.loads(line) for line in f]


def _all_lines(corpus):
  return [line for split in synth.SPLITS for line in _lines(os.path.join(corpus, f"{split}.jsonl"))]


def _reference_audio(corpus, line):
  audio, rate = soundfile.read(os.path.join(corpus, line["audio"]), dtype="float32")
  assert rate == 16000
  return audio


def _write_manifest(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return str(path)


# ----------------------------------------------------------------------------- corpus generator


def test_corpus_is_16khz_mono_speech_with_rare_names_and_bias_lists(corpus):
  lines = _all_lines(corpus)
  assert len(lines) == NUM_UTTERANCES
  assert [len(_lines(os.path.join(corpus, f"{s}.jsonl"))) for s in synth.SPLITS] == [3, 1, 1]
  assert len({line["id"] for line in lines}) == NUM_UTTERANCES
  names = set(synth.RARE_NAMES)
  for split in synth.SPLITS:
    for line in _lines(os.path.join(corpus, f"{split}.jsonl")):
      info = soundfile.info(os.path.join(corpus, line["audio"]))
      assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
      assert 0.5 < info.duration < 15.0
      audio = _reference_audio(corpus, line)
      assert np.sqrt(np.mean(audio ** 2)) > 0.01  # speech, not silence
      spoken = [n for n in names if n in line["text"]]
      assert line["text"] == line["text"].lower() and line["text"] == " ".join(line["text"].split())
      assert set(spoken) <= set(line["bias"]) and len(line["bias"]) == len(spoken) + 5
      assert set(line["bias"]) <= names and len(set(line["bias"])) == len(line["bias"])


def test_held_out_names_are_spoken_only_in_dev_and_test():
  plan = synth.plan_corpus(400, seed=int(np.random.default_rng().integers(1000)), heldout_names=8)
  spoken = {split: {n for spec in plan if spec.split == split for n in synth.RARE_NAMES if n in spec.text}
            for split in synth.SPLITS}
  assert len(spoken["train"]) == len(synth.RARE_NAMES) - 8
  assert len((spoken["dev"] | spoken["test"]) - spoken["train"]) > 0


def test_corpus_is_a_function_of_the_seed_with_or_without_a_process_pool(corpus, tmp_path):
  again, other = tmp_path / "again", tmp_path / "other"
  run = lambda out, seed: subprocess.run(  # noqa: E731
      [sys.executable, "scripts/make_synthetic_speech.py", f"--output_dir={out}", f"--num_utterances={NUM_UTTERANCES}",
       f"--seed={seed}", "--workers=2"], cwd=REPO, capture_output=True, text=True, check=True)
  printed = run(again, SEED).stdout
  assert f"total {NUM_UTTERANCES:6d} utterances" in printed
  for split in synth.SPLITS:
    name = f"{split}.jsonl"
    assert (again / name).read_bytes() == open(os.path.join(corpus, name), "rb").read()
  for line in _all_lines(corpus):
    assert (again / line["audio"]).read_bytes() == open(os.path.join(corpus, line["audio"]), "rb").read()
  seconds = sum(soundfile.info(os.path.join(corpus, line["audio"])).duration for line in _all_lines(corpus))
  assert f"({seconds:.1f} s)" in printed
  run(other, SEED + 1)
  assert [line["text"] for line in _all_lines(str(other))] != [line["text"] for line in _all_lines(corpus)]


def test_resampling_22050_to_16000_keeps_a_tone():
  rng = np.random.default_rng()
  freq, phase = rng.uniform(100.0, 4000.0), rng.uniform(0.0, 2 * np.pi)
  seconds = 0.5
  source = np.sin(2 * np.pi * freq * np.arange(int(22050 * seconds)) / 22050 + phase)
  result = synth.resample(source, 22050, 16000)
  expected = np.sin(2 * np.pi * freq * np.arange(int(16000 * seconds)) / 16000 + phase)
  assert result.dtype == np.float32 and result.shape == expected.shape
  interior = slice(200, -200)  # the filter's edges see zeros beyond the signal
  np.testing.assert_allclose(result[interior], expected[interior], atol=2e-3)


def test_generator_says_how_to_install_espeak_when_it_is_missing(monkeypatch):
  monkeypatch.setenv("PATH", "")
  with pytest.raises(RuntimeError, match="run `make`"):
    synth.require_espeak()


# ----------------------------------------------------------------------------- manifests


def test_read_manifest_returns_the_files_audio_and_the_lines_fields(corpus):
  manifest = os.path.join(corpus, "train.jsonl")
  utterances = speech.read_manifest(manifest)
  lines = _lines(manifest)
  assert [u.id for u in utterances] == [line["id"] for line in lines]
  for utterance, line in zip(utterances, lines):
    np.testing.assert_array_equal(utterance.audio, _reference_audio(corpus, line))
    assert utterance.audio.dtype == np.float32 and np.max(np.abs(utterance.audio)) <= 1.0
    assert utterance.text == line["text"] and utterance.bias == tuple(line["bias"])


def test_transcripts_are_normalized_and_ids_default_to_the_audio_path(corpus, tmp_path):
  line = _lines(os.path.join(corpus, "train.jsonl"))[0]
  audio = os.path.join(corpus, line["audio"])  # absolute path: not resolved against the manifest's directory
  manifest = _write_manifest(tmp_path / "m.jsonl", [{"audio": audio, "text": "  Hello\tThere  WORLD ",
                                                     "bias": [" Zanzibar  Quimby "]}])
  [utterance] = speech.read_manifest(manifest)
  assert (utterance.text, utterance.id, utterance.bias) == ("hello there world", audio, ("zanzibar quimby",))
  [kept] = speech.read_manifest(manifest, lowercase=False)
  assert kept.text == "Hello There WORLD"


def _bad_file(kind, tmp_path, corpus):
  """(manifest lines, file or phrase the error must name, what else it must say) for one kind of bad input."""
  good = _lines(os.path.join(corpus, "train.jsonl"))[0]
  good = dict(good, audio=os.path.join(corpus, good["audio"]))
  rng = np.random.default_rng()
  path = str(tmp_path / f"{kind}.wav")
  if kind == "rate":
    soundfile.write(path, rng.uniform(-0.5, 0.5, 2205), 22050, subtype="PCM_16")
    return [good, {"audio": path, "text": "hi"}], path, "22050 Hz, expected 16000 Hz"
  if kind == "stereo":
    soundfile.write(path, rng.uniform(-0.5, 0.5, (1600, 2)), 16000, subtype="PCM_16")
    return [good, {"audio": path, "text": "hi"}], path, "2 channels, expected mono"
  if kind == "empty_audio":
    soundfile.write(path, np.zeros(0), 16000, subtype="PCM_16")
    return [good, {"audio": path, "text": "hi"}], path, "empty"
  if kind == "missing":
    return [good, {"audio": path, "text": "hi"}], path, "does not exist"
  if kind == "truncated":  # a copy cut short: the header still declares 16000 samples
    soundfile.write(path, rng.uniform(-0.5, 0.5, 16000), 16000, subtype="PCM_16")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 4)
    return [good, {"audio": path, "text": "hi"}], path, "truncated: its header declares 16000 samples"
  if kind == "loud_float":
    soundfile.write(path, np.r_[rng.uniform(-0.5, 0.5, 1599), 1.5].astype(np.float32), 16000, subtype="FLOAT")
    return [good, {"audio": path, "text": "hi"}], path, "outside [-1, 1]"
  assert kind == "empty_text"
  return [good, {"audio": good["audio"], "text": "  \t "}], good["audio"], "empty transcript"


@pytest.mark.parametrize("kind", ["rate", "stereo", "empty_audio", "missing", "empty_text", "truncated", "loud_float"])
def test_bad_audio_or_transcript_is_refused_naming_file_and_line(kind, tmp_path, corpus):
  lines, named, reason = _bad_file(kind, tmp_path, corpus)
  manifest = _write_manifest(tmp_path / "bad.jsonl", lines)
  for register in (lambda: speech.manifest_task("bad_speech", manifest, VOCAB), lambda: speech.read_manifest(manifest)):
    with pytest.raises(ValueError) as error:
      register()
    assert named in str(error.value) and reason in str(error.value) and "line 2" in str(error.value)
  if kind != "empty_text":
    with pytest.raises(ValueError, match=re.escape(reason)):
      speech.read_audio(named)


def test_a_long_file_is_refused_from_its_header_and_a_non_utf8_manifest_names_its_line(tmp_path, corpus, monkeypatch):
  good = _lines(os.path.join(corpus, "train.jsonl"))[0]
  good = dict(good, audio=os.path.join(corpus, good["audio"]))
  frames = soundfile.info(good["audio"]).frames
  manifest = _write_manifest(tmp_path / "m.jsonl", [good, good | {"id": "second"}])

  def refuse_decoding(*args, **kwargs):
    raise AssertionError(f"decoded {args}: the length should have been refused from the header")

  monkeypatch.setattr(speech.soundfile, "read", refuse_decoding)
  with pytest.raises(ValueError, match=rf"line 1\).* has {frames} samples .*over the {frames - 1} "):
    speech.manifest_task("long_speech", manifest, VOCAB, max_audio_samples=frames - 1)
  with pytest.raises(ValueError, match=rf"has {frames} samples"):
    speech.read_audio(good["audio"], max_samples=frames - 1)
  monkeypatch.undo()
  with open(tmp_path / "latin1.jsonl", "wb") as f:
    f.write((json.dumps(good) + "\n").encode() + b'{"audio": "x.wav", "text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin1.jsonl' line 2 is not UTF-8 text \(byte 0xe9 at column 32\)"):
    speech.parse_manifest(str(tmp_path / "latin1.jsonl"))


def test_a_file_changed_after_registration_fails_the_pipeline_naming_it(tmp_path, corpus):
  lines, named, _ = _bad_file("rate", tmp_path, corpus)
  manifest = _write_manifest(tmp_path / "bad.jsonl", lines)
  name = speech.manifest_task("unchecked_speech", manifest, VOCAB, check_audio=False)
  with pytest.raises(ValueError, match="22050 Hz, expected 16000 Hz") as error:
    list(speech_features.speech_batches(name, "train", 1, 200_000, 200, shuffle=False))
  assert named in str(error.value)


def test_configurable_rate_and_the_other_manifest_errors(tmp_path):
  path = str(tmp_path / "a.wav")
  audio = np.random.default_rng().uniform(-0.9, 0.9, 800).astype(np.float32)
  soundfile.write(path, audio, 8000, subtype="FLOAT")
  np.testing.assert_array_equal(speech.read_audio(path, sample_rate=8000), audio)
  soundfile.write(path, audio * 2, 8000, subtype="FLOAT")
  with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
    speech.read_audio(path, sample_rate=8000)
  for lines, message in (([{"audio": "a.wav"}], "'audio' and 'text'"), ([{"audio": "a.wav", "text": "x", "bias": "y"}],
                                                                          "'bias' must be a list"),
                         ([{"audio": "a.wav", "text": "x", "id": "u"}, {"audio": "a.wav", "text": "y", "id": "u"}],
                          "id 'u' already used on line 1"), ([], "no utterances")):
    manifest = _write_manifest(tmp_path / "m.jsonl", lines)
    with pytest.raises(ValueError, match=message):
      speech.parse_manifest(manifest)


# ----------------------------------------------------------------------------- tasks and batches


def _register_corpus(corpus, vocabulary=VOCAB, name="synth_speech"):
  return speech.manifest_task(name, {s: os.path.join(corpus, f"{s}.jsonl") for s in synth.SPLITS}, vocabulary)


def _rows(batches):
  """Non-padding rows of batches as (audio, targets, text) with the padding checked against the lengths."""
  rows = []
  for batch in batches:
    arrays = {"audio", "audio_paddings", "targets", "target_paddings", "bias_tokens", "bias_paddings"}
    assert arrays | {"text"} <= set(batch) <= arrays | {"text", "id", "bias"}
    for i in range(batch["audio"].shape[0]):
      n_audio = int(np.sum(batch["audio_paddings"][i] == 0))
      n_targets = int(np.sum(batch["target_paddings"][i] == 0))
      if n_audio == 0:  # a filler row of the last batch
        assert n_targets == 0 and batch["text"][i] == b"" and not batch["audio"][i].any()
        continue
      np.testing.assert_array_equal(batch["audio_paddings"][i], np.arange(batch["audio"].shape[1]) >= n_audio)
      np.testing.assert_array_equal(batch["target_paddings"][i], np.arange(batch["targets"].shape[1]) >= n_targets)
      assert not batch["audio"][i, n_audio:].any() and not batch["targets"][i, n_targets:].any()
      rows.append((batch["audio"][i, :n_audio], batch["targets"][i, :n_targets], batch["text"][i].decode()))
  return rows


def test_manifest_task_batches_hold_the_audio_and_the_encoded_transcripts(corpus):
  name = _register_corpus(corpus)
  lines = _lines(os.path.join(corpus, "train.jsonl"))
  max_audio = max(_reference_audio(corpus, line).size for line in lines) + 123
  batches = list(speech_features.speech_batches(name, "train", 2, max_audio, 96, shuffle=False, include_text=True))
  assert len(batches) == 2  # 3 utterances: one full batch and one with a filler row
  for batch in batches:
    assert batch["audio"].shape == batch["audio_paddings"].shape == (2, max_audio)
    assert batch["targets"].shape == batch["target_paddings"].shape == (2, 96)
    assert batch["audio"].dtype == batch["audio_paddings"].dtype == batch["target_paddings"].dtype == np.float32
    assert batch["targets"].dtype == np.int32
  rows = _rows(batches)
  assert len(rows) == len(lines)
  ids = [i.decode() for b in batches for i in b["id"] if i]
  biases = [[p.decode() for p in row if p] for b in batches for row, i in zip(b["bias"], b["id"]) if i]
  assert ids == [line["id"] for line in lines] and biases == [line["bias"] for line in lines]
  for (audio, targets, text), line in zip(rows, lines):
    np.testing.assert_array_equal(audio, _reference_audio(corpus, line))
    assert text == line["text"]
    np.testing.assert_array_equal(targets, VOCAB.encode(line["text"]))  # no EOS
    assert VOCAB.decode(targets.tolist()) == line["text"]
  # Each row's phrases as token arrays, row b spelling bias[b]; padding slots empty.
  for batch in batches:
    assert batch["bias_tokens"].shape == batch["bias_paddings"].shape == (2, 32, 32)
    assert batch["bias"].shape == (2, 32) and batch["bias_tokens"].dtype == np.int32
    for tokens, paddings, phrases in zip(batch["bias_tokens"], batch["bias_paddings"], batch["bias"]):
      lengths = (paddings == 0).sum(-1)
      np.testing.assert_array_equal(paddings, np.arange(32) >= lengths[:, None])
      assert not tokens[paddings > 0].any()
      for phrase, phrase_tokens, n in zip(phrases, tokens, lengths):
        np.testing.assert_array_equal(phrase_tokens[:n], VOCAB.encode(phrase.decode()))
  # The task's examples also carry each line's id and bias phrases.
  examples = seqio.get_mixture_or_task(name).get_dataset(split="train", shuffle=False).as_numpy_iterator()
  assert [(e["id"].decode(), [p.decode() for p in e["bias"]]) for e in examples] == [
      (line["id"], line["bias"]) for line in lines]


def test_batches_are_deterministic_given_the_seed_and_shuffled_across_epochs(corpus):
  name = _register_corpus(corpus)
  texts = lambda seed, epochs=1: [r[2] for r in _rows(speech_features.speech_batches(  # noqa: E731
      name, "train", 1, 200_000, 96, seed=seed, num_epochs=epochs, include_text=True))]
  first = texts(3, epochs=6)
  assert first == texts(3, epochs=6)
  in_file_order = [line["text"] for line in _lines(os.path.join(corpus, "train.jsonl"))]
  expected = sorted(in_file_order)
  epochs = [first[i:i + 3] for i in range(0, 18, 3)]
  assert all(sorted(epoch) == expected for epoch in epochs)  # each epoch is a permutation
  assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled: 6 alike has chance 1/6^5
  assert first != texts(4, epochs=6)
  # The host shards partition each epoch.
  shards = [[r[2] for r in _rows(speech_features.speech_batches(
      name, "train", 1, 200_000, 96, seed=3, include_text=True, shard_info=seqio.ShardInfo(i, 2)))] for i in range(2)]
  assert sorted(shards[0] + shards[1]) == expected


def test_iterator_checkpoint_resumes_with_the_same_batches(corpus, tmp_path):
  name = _register_corpus(corpus)
  make = lambda: pipeline.TfDataIterator(speech_features.speech_dataset(  # noqa: E731
      name, "train", 1, 200_000, 96, seed=5, num_epochs=None, filter_long=True))
  iterator = make()
  next(iterator)
  iterator.save(str(tmp_path / "ckpt"))
  expected = [next(iterator)["targets"] for _ in range(4)]
  resumed = make()
  resumed.restore(str(tmp_path / "ckpt"))
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["targets"], want)


def test_long_utterances_are_refused_or_dropped_with_a_logged_count(corpus, caplog):
  name = _register_corpus(corpus)
  lines = _lines(os.path.join(corpus, "train.jsonl"))
  lengths = sorted(_reference_audio(corpus, line).size for line in lines)
  limit = lengths[1]  # the longest utterance(s) do not fit
  too_long = [line for line in lines if _reference_audio(corpus, line).size > limit]
  with pytest.raises(ValueError, match=r"longer than the batch allows.*max_audio_samples") as error:
    list(speech_features.speech_batches(name, "train", 2, limit, 96, shuffle=False))
  assert too_long[0]["id"] in str(error.value) and "never truncated" in str(error.value)
  shortest_text = min(len(VOCAB.encode(line["text"])) for line in lines)
  with pytest.raises(ValueError, match="max_target_length"):
    list(speech_features.speech_batches(name, "train", 2, 200_000, shortest_text, shuffle=False))

  with caplog.at_level(logging.WARNING):
    rows = _rows(speech_features.speech_batches(name, "train", 2, limit, 96, shuffle=False, filter_long=True,
                                       include_text=True))
  assert [r[2] for r in rows] == [line["text"] for line in lines if line not in too_long]
  dropped = [m for m in caplog.messages if "dropped utterance" in m]
  assert len(dropped) == len(too_long) and f"{len(too_long)} dropped so far" in dropped[-1]
  assert too_long[-1]["id"] in dropped[-1]


def test_training_batches_carry_the_same_bias_arrays_and_repeated_phrases_count_once(corpus, tmp_path):
  lines = _lines(os.path.join(corpus, "train.jsonl"))
  lines[0]["bias"] = lines[0]["bias"] + lines[0]["bias"][:2]  # repeats: kept once, first occurrences in order
  name = _register_corpus_lines(corpus, tmp_path, lines)
  config = pipeline.DatasetConfig(mixture_or_task_name=name, sequence_length=200_000, targets_length=96,
                                    batch_size=len(lines), shuffle=False, pack=False, feature_converter="speech")
  train = next(pipeline.get_dataset(config).as_numpy_iterator())
  [evaluation] = speech_features.speech_batches(name, "train", len(lines), 200_000, 96, shuffle=False,
                                                include_text=True)
  assert set(train) == set(evaluation) - {"text", "id", "bias"}
  for key, value in train.items():
    np.testing.assert_array_equal(value, evaluation[key])
  assert [p.decode() for p in evaluation["bias"][0] if p] == _lines(os.path.join(corpus, "train.jsonl"))[0]["bias"]


def _register_corpus_lines(corpus, tmp_path, lines, vocabulary=VOCAB, name="edited_speech"):
  """A task over `lines` (manifest lines of the corpus, audio paths made absolute)."""
  lines = [dict(line, audio=os.path.join(corpus, line["audio"])) for line in lines]
  return speech.manifest_task(name, _write_manifest(tmp_path / f"{name}.jsonl", lines), vocabulary)


def test_too_many_or_too_long_bias_phrases_are_refused_naming_the_utterance(corpus, tmp_path):
  lines = _lines(os.path.join(corpus, "train.jsonl"))
  name = _register_corpus_lines(corpus, tmp_path, lines)
  most = max(len(line["bias"]) for line in lines)
  crowded = next(line for line in lines if len(line["bias"]) == most)
  with pytest.raises(ValueError, match=rf"utterance {crowded['id']} has {most} bias phrases.*max_phrases={most - 1}"):
    list(speech_features.speech_batches(name, "train", 2, 200_000, 96, shuffle=False, max_phrases=most - 1))
  longest = max((p for line in lines for p in line["bias"]), key=len)
  with pytest.raises(ValueError, match=rf"bias phrase '{longest}' has {len(longest)} tokens.*max_phrase_length"):
    list(speech_features.speech_batches(name, "train", 2, 200_000, 96, shuffle=False,
                                        max_phrase_length=len(longest) - 1))


def test_a_bias_phrase_the_vocabulary_cannot_spell_is_batched_as_encoded_and_refused_by_the_spelling_check(
    corpus, tmp_path):
  texts = [line["text"] for line in _all_lines(corpus)]
  vocab_size = len(set("".join(texts))) + 3 + 8
  prefix = str(tmp_path / "spm")
  assert train_spm.main([f"--input={os.path.join(corpus, 'train.jsonl')}", f"--model_prefix={prefix}",
                         f"--vocab_size={vocab_size}"]) == 0
  vocabulary = sentencepiece_vocabulary(model_file=prefix + ".model")
  lines = _lines(os.path.join(corpus, "train.jsonl"))[:1]
  lines[0]["bias"] = ["zé quimby"]  # no 'é' in the transcripts: the unknown piece
  name = _register_corpus_lines(corpus, tmp_path, lines, vocabulary, name="unspellable_speech")
  [batch] = speech_features.speech_batches(name, "train", 1, 200_000, 96, shuffle=False, include_text=True)
  tokens = batch["bias_tokens"][0, 0][batch["bias_paddings"][0, 0] == 0]
  np.testing.assert_array_equal(tokens, vocabulary.encode("zé quimby"))  # training reads it as it encodes
  assert vocabulary.unk_id in tokens
  with pytest.raises(ValueError, match="cannot encode the bias phrase 'zé quimby'.*unknown id 2"):
    bias_lists.check_spelling("zé quimby", tokens, vocabulary)


def test_tokenize_text_encodes_each_bias_phrase_once_and_drops_blank_ones():
  features = {"targets": seqio.Feature(VOCAB, add_eos=False)}
  example = {"audio": np.zeros(4, np.float32), "text": "call mom", "id": "u1",
             "bias": ["call mom", "   ", "play", "", "call mom"]}
  [tokenized] = speech.tokenize_text(tf.data.Dataset.from_tensors(example), features).as_numpy_iterator()
  assert [p.decode() for p in tokenized["bias"]] == ["call mom", "play"]
  assert [list(ids) for ids in tokenized["bias_tokens"]] == [VOCAB.encode("call mom"), VOCAB.encode("play")]
  np.testing.assert_array_equal(tokenized["targets"], VOCAB.encode("call mom"))


def test_batch_speech_rejects_bad_arguments():
  examples = tf.data.Dataset.from_tensors({"audio": tf.zeros([4]), "targets": tf.zeros([2], tf.int64)})
  with pytest.raises(ValueError, match="'targets' as a rank-1 int32"):
    speech_features.batch_speech(examples, 1, 8, 8)
  with pytest.raises(ValueError, match="batch_size must be positive"):
    speech_features.batch_speech(examples, 0, 8, 8)
  with pytest.raises(ValueError, match="max_phrases must be positive"):
    speech_features.batch_speech(examples, 1, 8, 8, max_phrases=0)


# ----------------------------------------------------------------------------- SentencePiece


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_train_spm_on_the_transcripts_round_trips_them(corpus, tmp_path, model_type, capsys):
  texts = [line["text"] for line in _all_lines(corpus)]
  vocab_size = len(set("".join(texts))) + 3 + 8  # every character (with '▁' for the space), specials, a few merges
  prefix = str(tmp_path / "spm")
  source = os.path.join(corpus, "train.jsonl") if model_type == "bpe" else str(tmp_path / "all.txt")
  if source.endswith(".txt"):
    with open(source, "w") as f:
      f.write("\n".join(t.upper() for t in texts) + "\n\n")  # upper case: the script lower-cases
    texts_seen = texts
  else:
    texts_seen = [line["text"] for line in _lines(source)]
  assert train_spm.main([f"--input={source}", f"--model_prefix={prefix}", f"--vocab_size={vocab_size}",
                         f"--model_type={model_type}"]) == 0
  assert f"wrote {prefix}.model" in capsys.readouterr().out
  vocabulary = sentencepiece_vocabulary(model_file=prefix + ".model")
  assert vocabulary.vocab_size == vocab_size
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
  for text in texts_seen:
    ids = vocabulary.encode(text)
    assert 0 not in ids and 1 not in ids and 2 not in ids
    assert vocabulary.decode(ids) == text
  # The manifest task encodes its targets with it.
  name = _register_corpus(corpus, vocabulary, name=f"synth_spm_{model_type}")
  for _, targets, text in _rows(speech_features.speech_batches(name, "test", 1, 200_000, 96, shuffle=False,
                                                      include_text=True)):
    np.testing.assert_array_equal(targets, vocabulary.encode(text))
    assert vocabulary.decode(targets.tolist()) == text


def test_train_spm_explains_a_vocabulary_too_large_for_the_text(corpus, tmp_path, capsys):
  code = train_spm.main([f"--input={os.path.join(corpus, 'dev.jsonl')}", f"--model_prefix={tmp_path / 'x'}",
                         "--vocab_size=5000"])
  assert code == 1 and "vocab_size=5000 failed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- LibriSpeech


def test_librispeech_task_reads_tfds_and_preprocesses_an_in_memory_example():
  name = speech.librispeech_task(name="librispeech_test", vocabulary=VOCAB)
  task = seqio.get_mixture_or_task(name)
  assert isinstance(task.source, seqio.TfdsDataSource)
  assert set(speech.LIBRISPEECH_SPLITS) | {"train", "validation", "test"} == set(task.splits)
  assert task.source.tfds_dataset.name == "librispeech:2.1.1"  # tfds's default config (decoded int16 speech)

  rng = np.random.default_rng()
  speech_int16 = [rng.integers(-32768, 32768, n).astype(np.int16) for n in (1600, 2400)]
  raw_texts = ["HE HOPED THERE WOULD BE  STEW FOR DINNER", " STUFF IT INTO YOU HIS BELLY COUNSELLED HIM"]
  ids = ["1089-134686-0000", "1089-134686-0001"]
  examples = tf.data.Dataset.from_tensor_slices({
      "speech": tf.ragged.constant(speech_int16, dtype=tf.int16), "text": raw_texts, "id": ids,
      "speaker_id": [1089, 1089], "chapter_id": [134686, 134686]})
  processed = task.preprocess_postcache(task.preprocess_precache(examples), sequence_length=None)
  got = list(processed.as_numpy_iterator())
  assert len(got) == 2
  for example, audio, raw, ident in zip(got, speech_int16, raw_texts, ids):
    text = " ".join(raw.split()).lower()
    np.testing.assert_array_equal(example["audio"], audio.astype(np.float32) / 32768.0)
    assert example["audio"].dtype == np.float32 and np.max(np.abs(example["audio"])) <= 1.0
    assert example["text"].decode() == text and example["id"].decode() == ident
    np.testing.assert_array_equal(example["targets"], VOCAB.encode(text))
  batches = list(speech_features.batch_speech(processed, 4, 3000, 64, include_text=True).as_numpy_iterator())
  rows = _rows(batches)
  assert [r[2] for r in rows] == [" ".join(t.split()).lower() for t in raw_texts]
  assert batches[0]["audio"].shape == (4, 3000)
