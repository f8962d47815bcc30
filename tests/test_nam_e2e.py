"""Deferred NAM end to end on a tiny manifest corpus: a base transducer trained by the launcher, a
biaser warm-started from it with the base frozen (CLAS-style training lists in the batches), then
the ASR eval with NAM alone, NAM + KMP over its top K, and anti-biasing lists."""

import json
import os

import gin
import jax
import numpy as np
import pytest
import soundfile

from memlm_jax.data import pipeline
from memlm_jax.launch import asr_lib, train_lib
from memlm_jax.launch.biasing import KmpBiasing, NamBiasing
from memlm_jax.runtime.checkpoints import Checkpointer
from memlm_jax.runtime.optimizers import param_paths
from tests import lm_runs

NAMES = ["zix vup", "qod fam", "kel zor", "mib tas", "yun pol", "wex rud", "jaf lob", "tep gos"]
TEMPLATES = ["call {} now", "ask {} to go", "i saw {}", "{} is here"]
TINY = ["ConformerEncoder.model_dim = 16", "ConformerEncoder.num_heads = 2", "ConformerEncoder.num_layers = 2",
        "ConformerEncoder.conv_kernel = 5", "ConformerEncoder.dropout_rate = 0.0", "LstmPredictor.embed_dim = 8",
        "LstmPredictor.hidden_dim = 8", "JointNetwork.joint_dim = 8", "SpecAugment.num_time_masks = 1",
        "SPEECH_VOCABULARY = @byte_vocabulary()", "VOCAB_SIZE = 259", "MAX_AUDIO_SAMPLES = 8000",
        "MAX_TARGET_LENGTH = 24", "BATCH_SIZE = 8", "EVAL_BATCH_SIZE = 8", "speech_dataset.max_phrases = 8",
        "speech_dataset.max_phrase_length = 16", "Checkpointer.save_interval_steps = 2",
        "warmup_cosine_schedule.warmup_steps = 1"]
NAM_TINY = ["ConformerEncoder.context_layers = [1]", "NAM_CONTEXT_DIM = 16", "NamBiaser.num_heads = 2",
            "NamBiaser.filter_dim = 8", "NamBiaser.top_k = 2", "BiasingAttention.attention_dim = 8",
            "NamBiaser.phrase_attention_weight = 1.0", "NamBiaser.wordpiece_attention_weight = 1.0",
            "TrainingBiasLists.num_distractors = 3", "TrainingBiasLists.max_ngram_words = 1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """8 training and 6 test utterances of noise audio, each naming one of NAMES with a 2-phrase list."""
  root = tmp_path_factory.mktemp("nam")
  rng = np.random.default_rng(0)
  os.makedirs(root / "audio")
  for split, count in (("train", 8), ("test", 6)):
    with open(root / f"{split}.jsonl", "w") as f:
      for i in range(count):
        name, distractor = (NAMES[j] for j in rng.permutation(len(NAMES))[:2])
        path = root / "audio" / f"{split}{i}.wav"
        soundfile.write(path, rng.uniform(-0.3, 0.3, size=int(rng.integers(5000, 8000))), 16000, subtype="PCM_16")
        f.write(json.dumps({"audio": str(path), "text": TEMPLATES[i % 4].format(name), "id": f"{split}{i}",
                            "bias": [name, distractor]}) + "\n")
  manifests = [f"TRAIN_MANIFEST = '{root}/train.jsonl'", f"DEV_MANIFEST = '{root}/test.jsonl'",
               f"TEST_MANIFEST = '{root}/test.jsonl'"] + [f"TEST_N{n}_MANIFEST = '{root}/test.jsonl'" for n in (10, 100, 1000)]
  return root, manifests


def _saved_params(model_dir):
  """The newest checkpoint's parameters, as saved."""
  checkpointer = Checkpointer(os.path.join(model_dir, "checkpoints"))
  step = checkpointer.latest_step()
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), checkpointer._saved_tree(step)["params"])
  params, _ = checkpointer.restore_params(step, abstract)
  checkpointer.close()
  return {path: np.asarray(leaf) for path, leaf in zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params))}


def test_base_then_frozen_biaser_then_nam_eval(corpus):
  root, manifests = corpus
  base_dir, nam_dir = str(root / "base"), str(root / "nam")
  lm_runs.parse(["runs/train.gin", "tiny/transducer_synthetic.gin"],
                TINY + manifests + ["TRAIN_STEPS = 2", f"MODEL_DIR = '{base_dir}'", "Transducer.ctc_weight = 0.3"])
  train_lib.train(base_dir)

  nam_config = ["runs/train.gin", "experiments/deferred_nam/d3.gin"]
  nam_bindings = TINY + NAM_TINY + manifests + [f"BASE_MODEL_DIR = '{base_dir}'", f"MODEL_DIR = '{nam_dir}'",
                                                "TRAIN_STEPS = 2", "manifest_task.name = 'nam_e2e'"]
  # The training batches carry lists drawn from each transcript: its name, maybe n-grams, distractors.
  lm_runs.parse(nam_config, nam_bindings)
  with gin.config_scope("train"):
    config = pipeline.DatasetConfig()
  assert config.bias_sampler is not None
  batch = next(iter(pipeline.get_dataset(config, shard=(0, 1))))
  lengths = (np.asarray(batch["bias_paddings"]) == 0).sum(-1)
  assert (lengths > 0).sum(axis=1).min() >= 2  # the spoken name and at least one other phrase per utterance

  train_lib.train(nam_dir)
  flat_base, flat_nam = _saved_params(base_dir), _saved_params(nam_dir)
  assert set(flat_base) < set(flat_nam)
  assert any(p.startswith("ctc_head/") for p in flat_base)  # the hybrid base (as tiny/transducer_contacts.gin)
  for path, value in flat_base.items():  # the frozen base model, CTC head too, is exactly the one it started from
    np.testing.assert_array_equal(flat_nam[path], value, err_msg=path)
  assert any(p.startswith("biaser/") for p in flat_nam) and any(p.startswith("encoder/context_modules/")
                                                                for p in flat_nam)

  lm_runs.parse(["runs/asr_eval.gin", "experiments/deferred_nam/d3.gin"],
                TINY + NAM_TINY + manifests + [f"MODEL_DIR = '{nam_dir}'", "asr_eval.beam_size = 2",
                                               "manifest_task.name = 'nam_e2e'"])
  settings = [None, NamBiasing(), NamBiasing(bias_lists="anti"),
              NamBiasing(kmp=KmpBiasing(delta=0.5), kmp_phrases="nam_top_k")]
  runs = asr_lib.asr_eval(nam_dir, biasing=settings)["runs"]
  assert [r["utterances"] for r in runs] == [6] * 4
  assert [r.get("nam", False) for r in runs] == [False, True, True, True]
  assert runs[2]["bias_lists"] == "anti" and runs[3]["nam_kmp_phrases"] == "nam_top_k"
  names = sorted(os.listdir(os.path.join(nam_dir, "eval")))
  for part in ("_nam_", "_nam_anti_", "_nam_kmp0.5shallow_namtopk_"):
    assert any(part in n and n.endswith(".json") for n in names), (part, names)
