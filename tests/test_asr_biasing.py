"""KMP biasing in the ASR eval launcher: the biased decoder against the plain beam search, the
anti-biasing lists against a naive word-run check, and asr_eval end to end on a tiny manifest
corpus with a randomly initialized transducer (checkpoint written directly, no training),
ending with scripts/kmp_table.py on the JSON it wrote."""

import importlib.util
import json
import os
import re

import gin
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from flax import nnx

from memlm_jax.decoding import kmp
from memlm_jax.evaluation import bias_lists
from memlm_jax.launch import asr_lib
from memlm_jax.losses.ctc_spotting import phrase_gains, phrase_spots
from memlm_jax.decoding.transducer_beam import TransducerFns, beam_search
from memlm_jax.launch.biasing import BIAS_LISTS, CtcSpotter, CtcWordSpotting, KmpBiasing, NamBiasing, kmp_sweep
from memlm_jax.models.transducer import Transducer
from memlm_jax.runtime.checkpoints import Checkpointer
from memlm_jax.evaluation import kmp_table
from scripts import kmp_table as kmp_table_script
from tests import lm_runs

TINY = ["ConformerEncoder.model_dim = 16", "ConformerEncoder.num_heads = 2", "ConformerEncoder.num_layers = 1",
        "ConformerEncoder.conv_kernel = 5", "ConformerEncoder.dropout_rate = 0.0", "LstmPredictor.embed_dim = 8",
        "LstmPredictor.hidden_dim = 8", "JointNetwork.joint_dim = 8", "SpecAugment.num_time_masks = 1"]
HUGE_DELTA = 1000.0  # dwarfs any log-prob of a random model: the search follows the phrases


def _contains(tokens, phrase) -> bool:
  """Naive: phrase (list of ids) is a contiguous run of tokens."""
  return any(list(tokens[i:i + len(phrase)]) == list(phrase) for i in range(len(tokens) - len(phrase) + 1))


def _word_run(phrase: str, text: str) -> bool:
  """Naive: the words of phrase occur consecutively in text."""
  p, t = phrase.split(), text.split()
  return any(t[i:i + len(p)] == p for i in range(len(t) - len(p) + 1))


# ----------------------------------------------------------------------------- settings and names


def test_settings_are_checked_before_anything_runs_and_every_setting_has_its_own_file_name():
  for bad, match in ((dict(mode="deep"), "mode must be one of"),
                     (dict(bias_lists="others"), "bias_lists must be one of"),
                     (dict(delta=-1.0), "delta must be"),
                     (dict(mode="rescore", top_k=4), "top_k=4 needs"),
                     (dict(chain_width=0), "chain_width must be >= 1"),
                     (dict(backend="trie"), "backend must be one of"),
                     (dict(fanout_width=0), "fanout_width must be >= 1")):
    with pytest.raises(ValueError, match=match):
      KmpBiasing(**{"delta": 1.0, **bad})
  required = dict(model=None, task_name="t", vocabulary=None, max_audio_samples=1, max_target_length=1)
  for bad, match in ((dict(beam_size=0), "beam_size must be >= 1"), (dict(beam_method="x"), "beam_method must be"),
                     (dict(ilm_weight=-1.0), "ilm_weight must be a finite number >= 0")):
    with pytest.raises(ValueError, match=match):
      asr_lib.asr_eval("/nonexistent/model_dir", **required, **bad)
  # A gin binding is checked when gin builds the object, before asr_eval reads anything.
  gin.parse_config("asr_eval.biasing = @KmpBiasing()\nKmpBiasing.delta = -1.0")
  with pytest.raises(ValueError, match="delta must be"):
    asr_lib.asr_eval("/nonexistent/model_dir", **required)

  settings = [KmpBiasing(delta, mode, top_k, lists)
              for delta in (0.5, 1.0, 2.0, 4.0) for lists in BIAS_LISTS
              for mode, top_k in (("shallow", None), ("shallow", 8), ("rescore", None))]
  names = [s.name for s in settings]
  assert len(set(names)) == len(names) and "" not in names
  assert KmpBiasing(0.5).name == "_kmp0.5shallow"
  assert KmpBiasing(0.5, backend="aho_corasick").name == "_kmp0.5shallow_ac"
  with pytest.raises(ValueError, match="needs KmpBiasing.backend 'kmp'"):
    NamBiasing(kmp=KmpBiasing(0.5, backend="aho_corasick"), kmp_phrases="nam_top_k")
  assert KmpBiasing(0.0, "rescore", bias_lists="anti").name == ""  # off: the unbiased file
  assert KmpBiasing(2.0, spotter=CtcSpotter(1, 0.5)).name == "_kmp2shallow_ctcspot1t0.5"
  for bad, match in ((dict(top_k=0), "top_k must be an integer >= 1"), (dict(threshold=-1.0), "threshold must be")):
    with pytest.raises(ValueError, match=match):
      CtcSpotter(**bad)
  with pytest.raises(ValueError, match="needs backend 'kmp'"):
    KmpBiasing(1.0, backend="aho_corasick", spotter=CtcSpotter())
  with pytest.raises(ValueError, match="with a CtcSpotter is not supported"):
    NamBiasing(kmp=KmpBiasing(1.0, spotter=CtcSpotter()))
  assert CtcWordSpotting(CtcSpotter(2, 2.5), margin=1, bias_lists="anti").name == "_ctcws2t2.5m1x2_anti"
  assert CtcWordSpotting(max_extra_words=None).name == "_ctcws1t3m0"
  assert CtcWordSpotting().summary()["ctc_word_spotting"] == {"top_k": 1, "threshold": 3.0, "margin": 0,
                                                               "max_extra_words": 2}
  for bad, match in ((dict(margin=-1), "margin must be an integer"), (dict(bias_lists="x"), "bias_lists must be"),
                     (dict(max_extra_words=-1), "max_extra_words must be None or an integer"),
                     (dict(spotter=None), "spotter must be a CtcSpotter")):
    with pytest.raises(ValueError, match=match):
      CtcWordSpotting(**bad)


def test_merging_spotted_phrases_best_first_skipping_overlaps_and_empty_slots():
  starts_word = np.array([False, True, True, True, True, True, True, True, True, True])
  # One-piece words 1 2 3 4 at frames 0 3 6 9; phrases 7 8 | 9 | 5 6.
  phrases = np.array([[7, 8], [9, 0], [5, 6]])
  merged = asr_lib.merge_spotted_phrases([1, 2, 3, 4], [0, 3, 6, 9], phrases, indices=np.array([1, 0, -1, 2]),
                                         starts=np.array([3, 4, 0, 9]), ends=np.array([3, 6, 0, 9]),
                                         starts_word=starts_word, margin=0)
  # Phrase 1 (window 3..3) replaces word 2; phrase 0 (window 4..6, clear of 3..3) replaces word 3; the
  # -1 slot is skipped; phrase 2 (window 9..9) replaces word 4.
  assert merged == [1, 9, 7, 8, 5, 6]
  # With a margin of 1 the second window (3..7) overlaps the first (2..4): left out.
  assert asr_lib.merge_spotted_phrases([1, 2, 3, 4], [0, 3, 6, 9], phrases, np.array([1, 0]), np.array([3, 4]),
                                       np.array([3, 6]), starts_word, margin=1) == [1, 9, 3, 4]
  # A one-word phrase over three words: refused with max_extra_words 1, so the next spot is merged.
  assert asr_lib.merge_spotted_phrases([1, 2, 3, 4], [0, 3, 6, 9], phrases, np.array([1, 2]), np.array([0, 9]),
                                       np.array([6, 9]), starts_word, margin=0, max_extra_words=1) == [1, 2, 3, 5, 6]


def test_a_sweep_lists_no_biasing_then_every_delta_of_each_mode_for_each_list_kind():
  gin.parse_config("KmpBiasing.top_k = 8\nKmpBiasing.anti_seed = 3")
  settings = kmp_sweep(shallow_deltas=[0.5, 1.0], rescore_deltas=[2.0])
  assert settings[0] is None
  assert [s.name for s in settings[1:]] == ["_kmp0.5shallow_top8", "_kmp1shallow_top8", "_kmp2rescore",
                                            "_kmp0.5shallow_top8_anti", "_kmp1shallow_top8_anti", "_kmp2rescore_anti"]
  assert {s.anti_seed for s in settings[1:]} == {3}
  gin.parse_config("KmpBiasing.backend = 'aho_corasick'")  # the KMP experiment with the other backend
  assert {s.name[-3:] for s in kmp_sweep(shallow_deltas=[0.5], rescore_deltas=[2.0])[1:]} == {"_ac"}
  assert len({s.decoder_key for s in settings[1:]}) == 2  # one compiled decoder per mode


# ----------------------------------------------------------------------------- anti-biasing lists


def test_anti_lists_hold_only_other_utterances_phrases_absent_from_the_transcript_and_are_deterministic():
  rng = np.random.default_rng()
  words = [f"w{i}" for i in range(12)]
  phrases = sorted({" ".join(rng.choice(words, size=rng.integers(1, 3))) for _ in range(30)})
  count = 25
  ids = [f"utt{i}" for i in rng.permutation(1000)[:count]]
  texts = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(count)]
  lists = [list(rng.choice(phrases, size=rng.integers(0, 5), replace=False)) for _ in range(count)]
  anti = bias_lists.anti_bias_lists(ids, texts, lists, seed=3)

  for u in range(count):
    others = {p for v in range(count) if v != u for p in lists[v]}
    allowed = {p for p in others if not _word_run(p, texts[u])}
    assert set(anti[u]) <= allowed and len(set(anti[u])) == len(anti[u])
    assert len(anti[u]) == min(len(set(lists[u])), len(allowed))
  assert any(anti)  # the draw is not vacuous
  # Same lists whatever the order of the utterances, and on every call.
  order = rng.permutation(count)
  shuffled = bias_lists.anti_bias_lists([ids[i] for i in order], [texts[i] for i in order],
                                     [lists[i] for i in order], seed=3)
  assert [shuffled[list(order).index(u)] for u in range(count)] == anti
  assert bias_lists.anti_bias_lists(ids, texts, lists, seed=3) == anti
  with pytest.raises(ValueError, match="distinct utterance ids"):
    bias_lists.anti_bias_lists(["a", "a"], ["x", "y"], [["p"], ["q"]])


class WordVocabulary:
  """A tiny word-level vocabulary with an unknown id (duck-types seqio.Vocabulary)."""
  words = ["<pad>", "<eos>", "<unk>", "call", "mom", "play"]
  unk_id, vocab_size = 2, 6

  def encode(self, text):
    return [self.words.index(w) if w in self.words else self.unk_id for w in text.lower().split()]

  def decode(self, ids):
    return " ".join(self.words[i] for i in ids)


def test_phrases_whose_tokens_do_not_spell_them_are_refused():
  vocabulary = WordVocabulary()
  bias_lists.check_spelling("call  mom", vocabulary.encode("call mom"), vocabulary)
  with pytest.raises(ValueError, match="'call bob'.*unknown"):
    bias_lists.check_spelling("call bob", vocabulary.encode("call bob"), vocabulary)
  with pytest.raises(ValueError, match="'Call Mom'.*decodes back"):
    bias_lists.check_spelling("Call Mom", vocabulary.encode("Call Mom"), vocabulary)


# ----------------------------------------------------------------------------- the biased decoder


@pytest.fixture(scope="module")
def random_transducer():
  vocab_size = 24
  lm_runs.parse(["models/transducer.gin"], TINY + [f"VOCAB_SIZE = {vocab_size}"])
  with nnx.use_eager_sharding(False):
    model = Transducer(rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  sizes = dict(beam_size=3, max_symbols_per_frame=3, max_output_length=12)
  plain = asr_lib.make_decoder(graphdef, **sizes)
  return graphdef, params, vocab_size, sizes, plain


@pytest.mark.parametrize("mode,top_k", [("shallow", None), ("shallow", 4), ("rescore", None)])
def test_delta_zero_is_the_plain_beam_search_and_a_huge_shallow_bonus_spells_an_own_phrase(random_transducer, mode,
                                                                                          top_k):
  graphdef, params, vocab_size, sizes, plain = random_transducer
  rng = np.random.default_rng()
  batch = 3
  audio = jnp.asarray(rng.normal(scale=0.1, size=(batch, 4000)), jnp.float32)
  paddings = jnp.zeros_like(audio).at[2, 2500:].set(1.0)
  # Two phrases of 3 distinct tokens per utterance, no token shared between utterances.
  tokens = rng.permutation(np.arange(1, vocab_size))[:batch * 6].reshape(batch, 2, 3)
  table = kmp.make_batched_phrase_table(tokens.tolist(), vocab_size, max_phrases=4, max_phrase_length=5,
                                        chain_width=5)
  biased = asr_lib.make_decoder(graphdef, biasing=KmpBiasing(1.0, mode, top_k), **sizes)

  want = plain(params, audio, paddings)
  got = biased(params, audio, paddings, table, 0.0)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])

  out, lengths = map(np.asarray, biased(params, audio, paddings, table, HUGE_DELTA))
  spells = lambda u, o, n, lists: any(_contains(o[u, :n[u]], p) for p in lists[u])  # noqa: E731
  plain_out, plain_lengths = map(np.asarray, want)
  own_hits = sum(spells(u, out, lengths, tokens) for u in range(batch))
  assert own_hits >= sum(spells(u, plain_out, plain_lengths, tokens) for u in range(batch))
  if mode == "shallow" and top_k is None:
    # The bonus reaches every label, so each utterance spells one of its own phrases (the lists
    # share no token, so this also shows row u of the table biases utterance u).
    assert own_hits == batch

  # The Aho-Corasick backend: the same phrases from the pipeline's padded arrays, the same decoding.
  automaton_biasing = KmpBiasing(1.0, mode, top_k, backend="aho_corasick")
  padded = np.zeros((batch, 4, 5), np.int32)
  padded[:, :2, :3] = tokens
  automaton = automaton_biasing.phrase_table(padded, (padded == 0).astype(np.float32), vocab_size)
  with_automaton = asr_lib.make_decoder(graphdef, biasing=automaton_biasing, **sizes)
  for delta in (0.5, HUGE_DELTA):
    for a, b in zip(with_automaton(params, audio, paddings, automaton, delta), biased(params, audio, paddings, table,
                                                                                        delta)):
      np.testing.assert_array_equal(a, b)


def test_the_ctc_spotter_boosts_exactly_the_phrases_it_spots():
  """A hybrid model's decoder with a CtcSpotter equals the plain KMP decoder given a table of only the
  phrases that fit best by the CTC head's gain per token (phrase_gains is tested against brute force)."""
  vocab_size, batch, phrases = 24, 3, 4
  lm_runs.parse(["models/transducer.gin"], TINY + [f"VOCAB_SIZE = {vocab_size}", "Transducer.ctc_weight = 0.3"])
  with nnx.use_eager_sharding(False):
    model = Transducer(rngs=nnx.Rngs(2))
  graphdef, params = nnx.split(model)
  sizes = dict(beam_size=3, max_symbols_per_frame=3, max_output_length=12)
  rng = np.random.default_rng(11)
  audio = jnp.asarray(rng.normal(scale=0.1, size=(batch, 4000)), jnp.float32)
  paddings = jnp.zeros_like(audio).at[1, 3000:].set(1.0)
  tokens = np.zeros((batch, phrases, 4), np.int32)
  lengths = rng.integers(1, 5, size=(batch, phrases))
  lengths[2, 3] = 0  # an empty slot is never spotted
  for u in range(batch):
    for b in range(phrases):
      tokens[u, b, :lengths[u, b]] = rng.integers(1, vocab_size, size=lengths[u, b])
  bias_paddings = (np.arange(4) >= lengths[..., None]).astype(np.float32)
  encoder_out, encoder_paddings = model.encode(audio, paddings)
  per_token = np.asarray(phrase_gains(model.ctc_log_probs(encoder_out), encoder_paddings, jnp.asarray(tokens),
                                      jnp.asarray(bias_paddings))) / np.maximum(lengths, 1)
  delta = 3.0
  for top_k, threshold in ((1, 100.0), (2, 100.0), (1, float(np.median(-per_token[lengths > 0])))):
    chosen = [[b for b in np.argsort(-per_token[u], kind="stable")[:top_k]
               if lengths[u, b] and per_token[u, b] >= -threshold] for u in range(batch)]
    table = kmp.make_batched_phrase_table([[tokens[u, b, :lengths[u, b]].tolist() for b in rows] for u, rows in
                                           enumerate(chosen)], vocab_size, max_phrases=top_k, max_phrase_length=4,
                                          chain_width=4)
    want = asr_lib.make_decoder(graphdef, biasing=KmpBiasing(1.0), **sizes)(params, audio, paddings, table, delta)
    spotting = KmpBiasing(1.0, spotter=CtcSpotter(top_k, threshold))
    full_table = spotting.phrase_table(tokens, bias_paddings, vocab_size)
    got = asr_lib.make_decoder(graphdef, biasing=spotting, **sizes)(
        params, audio, paddings, full_table, delta, jnp.asarray(tokens), jnp.asarray(bias_paddings))
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)

  # CtcWordSpotting: the plain beam search's best hypothesis with its frames, and the spotted phrases' windows.
  spotter = CtcSpotter(2, 100.0)
  out = asr_lib.make_decoder(graphdef, biasing=CtcWordSpotting(spotter), **sizes)(
      params, audio, paddings, None, None, jnp.asarray(tokens), jnp.asarray(bias_paddings))
  best = beam_search(TransducerFns.from_model(model), encoder_out, encoder_paddings, beam_size=3,
                     max_symbols_per_frame=3, max_output_length=12)
  for a, b in zip(out[:3], (best.tokens[:, 0], best.lengths[:, 0], best.frames[:, 0])):
    np.testing.assert_array_equal(a, b)
  spots = phrase_spots(model.ctc_log_probs(encoder_out), encoder_paddings, jnp.asarray(tokens),
                       jnp.asarray(bias_paddings))
  indices = np.asarray(out[3])
  for u in range(batch):
    expected = [b for b in np.argsort(-per_token[u], kind="stable")[:2] if lengths[u, b]]
    assert sorted(indices[u][indices[u] >= 0].tolist()) == sorted(expected)
    for j, b in enumerate(indices[u]):
      if b >= 0:
        assert (int(out[4][u, j]), int(out[5][u, j])) == (int(spots.start[u, b]), int(spots.end[u, b]))


# ----------------------------------------------------------------------------- asr_eval end to end

NAMES = ["zix vup", "qod fam", "kel zor", "mib tas", "yun pol", "wex rud", "jaf lob", "tep gos"]
TEMPLATES = ["call {} now", "ask {} to go", "i saw {}", "{} is here"]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
  """A 6-utterance manifest (noise audio, byte vocabulary, each utterance naming one of NAMES with
  a 2-phrase bias list), a random transducer checkpoint at step 7, and the gin (files, bindings)
  to parse in the test (conftest clears gin around every test)."""
  root = tmp_path_factory.mktemp("biasing")
  rng = np.random.default_rng()
  os.makedirs(root / "audio")
  spoken = rng.permutation(len(NAMES))[:6]
  with open(root / "test.jsonl", "w") as f:
    for i, name_index in enumerate(spoken):
      name = NAMES[name_index]
      distractor = NAMES[rng.choice([j for j in range(len(NAMES)) if j != name_index])]
      soundfile.write(root / "audio" / f"{i}.wav", rng.uniform(-0.3, 0.3, size=int(rng.integers(5000, 8000))),
                      16000, subtype="PCM_16")
      f.write(json.dumps({"audio": f"audio/{i}.wav", "text": TEMPLATES[i % 4].format(name), "id": f"u{i}",
                          "bias": [name, distractor]}) + "\n")
  manifest = f"'{root}/test.jsonl'"
  model_dir = str(root / "model")
  config = (["runs/asr_eval.gin", "tiny/transducer_synthetic.gin"], TINY + [
      f"TRAIN_MANIFEST = {manifest}", f"DEV_MANIFEST = {manifest}", f"TEST_MANIFEST = {manifest}",
      "SPEECH_VOCABULARY = @byte_vocabulary()", "VOCAB_SIZE = 259", "MAX_AUDIO_SAMPLES = 8000",
      "MAX_TARGET_LENGTH = 24", "EVAL_BATCH_SIZE = 8", "asr_eval.beam_size = 2", "speech_dataset.max_phrases = 4",
      "speech_dataset.max_phrase_length = 8"])
  lm_runs.parse(*config)
  with nnx.use_eager_sharding(False):
    params = nnx.state(Transducer(rngs=nnx.Rngs(1)), nnx.Param).to_pure_dict()
  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"))
  ckpt.save(7, {"params": params}, force=True)
  ckpt.close()
  return root, model_dir, config


def _results(model_dir, name):
  pattern = re.compile(re.escape(f"asr_test_beam2{name}_") + r"[0-9a-f]{8}_step7\.json")
  [file] = [n for n in os.listdir(os.path.join(model_dir, "eval")) if pattern.fullmatch(n)]
  base = os.path.join(model_dir, "eval", file[:-len(".json")])
  return json.load(open(base + ".json")), [json.loads(line) for line in open(base + ".jsonl")]


def test_asr_eval_boosts_own_or_anti_lists_names_each_run_apart_and_the_table_reads_them(eval_setup):
  root, model_dir, config = eval_setup
  lm_runs.parse(*config)
  references = {json.loads(line)["id"]: json.loads(line) for line in open(root / "test.jsonl")}
  # One process, one restore: the unbiased decoder and one biased decoder for both lists.
  runs = asr_lib.asr_eval(model_dir, biasing=[None, KmpBiasing(HUGE_DELTA), KmpBiasing(HUGE_DELTA, bias_lists="anti"),
                                              KmpBiasing(HUGE_DELTA, backend="aho_corasick")])

  plain, plain_rows = _results(model_dir, "")
  own, own_rows = _results(model_dir, "_kmp1000shallow")
  anti, anti_rows = _results(model_dir, "_kmp1000shallow_anti")
  assert plain["biasing_delta"] == 0.0 and plain["bias_lists"] is None
  assert (own["biasing_delta"], own["biasing_mode"], own["biasing_top_k"], own["bias_lists"]) == (
      HUGE_DELTA, "shallow", None, "utterance")
  assert anti["bias_lists"] == "anti"
  automaton, automaton_rows = _results(model_dir, "_kmp1000shallow_ac")
  assert automaton["biasing_backend"] == "aho_corasick" and own["biasing_backend"] == "kmp"
  assert [r["hypothesis"] for r in automaton_rows] == [r["hypothesis"] for r in own_rows]
  assert runs == {"runs": json.loads(json.dumps([plain, own, anti, automaton]))}
  for payload in (plain, own, anti):
    assert payload["utterances"] == len(references) and {"b_wer", "u_wer"} <= set(payload)

  # Every utterance's hypothesis spells a phrase of the list it was biased with: its own list,
  # or its anti list, which never holds a phrase of its transcript and comes from the others' lists.
  for row in own_rows:
    assert any(p in row["hypothesis"] for p in references[row["id"]]["bias"]), row
  for row in anti_rows:
    reference = references[row["id"]]
    others = {p for r in references.values() if r["id"] != row["id"] for p in r["bias"]}
    assert row["bias"] == reference["bias"] and len(row["biasing_phrases"]) == 2
    assert set(row["biasing_phrases"]) <= others
    assert not any(_word_run(p, reference["text"]) for p in row["biasing_phrases"])
    assert any(p in row["hypothesis"] for p in row["biasing_phrases"]), row
  assert sum(any(p in r["hypothesis"] for p in r["bias"]) for r in plain_rows) < len(plain_rows)

  # The table: one row per setting, both list kinds, values from the JSON in %.
  rows = kmp_table.table_rows(kmp_table.load_results(os.path.join(model_dir, "eval"), "test", 2))
  assert [r[0] for r in rows] == ["no biasing", "KMP shallow, delta=1000", "KMP shallow, delta=1000 (Aho-Corasick)"]
  assert rows[0][1:4] == rows[0][4:] == [f"{100 * plain[m]:.2f}" for m in kmp_table.METRICS]
  assert rows[1][1:] == [f"{100 * p[m]:.2f}" for p in (own, anti) for m in kmp_table.METRICS]
  assert kmp_table_script.main([os.path.join(model_dir, "eval"), "--beam_size=2"]) == 0
  assert kmp_table_script.main([os.path.join(model_dir, "eval"), "--beam_size=3"]) == 1


def test_asr_eval_names_the_ilm_search_and_refuses_a_spotter_without_a_ctc_head(eval_setup):
  _, model_dir, config = eval_setup
  lm_runs.parse(*config)
  with pytest.raises(ValueError, match="spots phrases with a CTC head .* has none"):
    asr_lib.asr_eval(model_dir, biasing=KmpBiasing(1.0, spotter=CtcSpotter()))
  with pytest.raises(ValueError, match="needs a SentencePiece vocabulary; got ByteVocabulary"):
    asr_lib.asr_eval(model_dir, biasing=CtcWordSpotting())
  payload = asr_lib.asr_eval(model_dir, ilm_weight=0.5)
  written, rows = _results(model_dir, "_ilm0.5")
  assert written == json.loads(json.dumps(payload)) and payload["ilm_weight"] == 0.5 and len(rows) == 6


@pytest.mark.slow  # a second sweep over the fixture (about a minute on 2 CPU cores)
def test_the_kmp_experiment_script_runs_its_sweep_in_one_process_and_prints_the_table(eval_setup):
  _, model_dir, (_, bindings) = eval_setup
  spec = importlib.util.spec_from_file_location("kmp_run",
                                                os.path.join(lm_runs.REPO, "experiments/kmp_synthetic/run.py"))
  kmp_run = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(kmp_run)
  eval_dir = os.path.join(model_dir, "eval")
  for name in os.listdir(eval_dir):  # the Aho-Corasick run of the test above is not part of this sweep
    if "_ac_" in name:
      os.remove(os.path.join(eval_dir, name))
  tables = kmp_run.run_sweep(model_dir, ["test"], bindings + [f"kmp_sweep.shallow_deltas = [{HUGE_DELTA}]",
                                                             "kmp_sweep.rescore_deltas = [2.0]"])
  assert tables["test"] == kmp_table.format_table(kmp_table.load_results(eval_dir, "test", 2))
  assert open(os.path.join(eval_dir, "kmp_table_test.md")).read() == tables["test"] + "\n"
  assert [row[0] for row in kmp_table.table_rows(kmp_table.load_results(eval_dir, "test", 2))] == [
      "no biasing", "KMP shallow, delta=1000", "KMP rescore, delta=2"]
