"""Two JAX processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives), launched
as a user would with `tpu/pod.py --local 2`, against one process x 8 devices in the test itself:
the same losses and eval results, checkpoints restored across the two topologies, each host
reading a disjoint shard, and a killed process that stops its peer instead of hanging it.

The data make the comparison exact: every example is one short line, read in order (no packing,
no shuffle), so host h's k-th batch holds rows h, h+2, ... of the one-process batch k, and a
global step sees the same examples in either topology.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from memlm_jax.launch import eval_lib, infer_lib, train_lib
from memlm_jax.runtime.summaries import read_jsonl
from tests import lm_runs

POD = [sys.executable, os.path.join(lm_runs.REPO, "tpu", "pod.py")]
WORDS = "the a red blue cat dog sat ran on under mat hat big small one two".split()
LM = ["runs/train.gin", "tiny/lm_demo.gin"]
INFINI = ["runs/train.gin", "tiny/infini_lm_demo.gin"]
IN_ORDER = ["train/DatasetConfig.pack = False", "train/DatasetConfig.shuffle = False",
            "warmup_cosine_schedule.warmup_steps = 2", "train.log_every_steps = 1", "BATCH_SIZE = 8",
            "EVAL_BATCH_SIZE = 8"]


def short_lines(directory, rng, train=200, validation=20, max_chars=30) -> str:
  """A corpus of one-line documents of at most max_chars bytes (one example each)."""
  os.makedirs(directory, exist_ok=True)
  for split, count in (("train", train), ("validation", validation)):
    with open(os.path.join(directory, f"{split}.txt"), "w") as f:
      for _ in range(count):
        words = []
        while len(" ".join(words + ["x"])) < max_chars - 6:
          words.append(WORDS[rng.integers(len(WORDS))])
        f.write(" ".join(words) + "\n")
  return str(directory)


def pod_local(tmp_path, module: str, args: list[str], processes: int = 2, timeout: float = 300,
              extra: list[str] = ()) -> subprocess.CompletedProcess:
  """`tpu/pod.py --local N launch --module M -- args` (8 / N CPU devices per process)."""
  argv = POD + ["--local", str(processes), "--local_devices", str(8 // processes), "--log_dir",
                str(tmp_path / "pod_logs"), *extra, "launch", "--module", module, "--", *args]
  return subprocess.run(argv, cwd=lm_runs.REPO, capture_output=True, text=True, timeout=timeout)


def gin_flags(files: list[str], bindings: list[str]) -> list[str]:
  return lm_runs.launcher("train", files, bindings)[3:]


def run_in_process(kind: str, files: list[str], bindings: list[str], model_dir: str):
  lm_runs.parse(files, bindings + [f"MODEL_DIR = {model_dir!r}"])
  return {"train": train_lib.train, "eval": eval_lib.run_eval, "infer": infer_lib.infer}[kind](model_dir)


def losses(model_dir: str, steps) -> np.ndarray:
  rows = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  return np.array([rows[s]["loss"] for s in steps])


def _without_timings(result):
  """result without the host's own wall-clock figures (throughputs, asr_eval's "timing")."""
  if isinstance(result, dict):
    return {k: _without_timings(v) for k, v in result.items() if "per_sec" not in k and k != "timing"}
  if isinstance(result, list):
    return [_without_timings(v) for v in result]
  return result


def _assert_ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_text_shards_are_disjoint_and_cover_the_one_host_stream(tmp_path):
  """A one-file corpus over 3 hosts: seqio splits it at the examples (what the tests' and the
  demo's corpora rely on for the 1-vs-2-process equality)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from memlm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  data = short_lines(tmp_path, np.random.default_rng(), train=37)
  task = seqio.get_mixture_or_task(tasks.text_lm_task(
      name="shard_test_text", split_files={"train": "train.txt", "validation": "validation.txt"}, data_dir=data))
  for shuffle in (False, True):
    def rows(shard):
      dataset = task.get_dataset(None, split="train", shuffle=shuffle, seed=5, shard_info=shard, num_epochs=1)
      return [tuple(x["targets"].tolist()) for x in dataset.as_numpy_iterator()]
    one = rows(None)
    shards = [rows(seqio.ShardInfo(i, 3)) for i in range(3)]
    assert [len(s) for s in shards] == [13, 12, 12]
    if shuffle:  # each host shuffles its own shard: disjoint and complete
      assert sorted(sum(shards, [])) == sorted(one)
    else:  # in order: host i reads examples i, i+3, ...
      assert [one[i::3] for i in range(3)] == shards


def test_generated_passkey_shards_are_disjoint_and_cover_the_one_host_stream():
  import seqio  # pylint: disable=g-import-not-at-top
  from memlm_jax.data import passkey  # pylint: disable=g-import-not-at-top
  name = passkey.passkey_task(name="passkey_shard_test", lengths=[300, 400], seed=int(np.random.default_rng().integers(99)))
  source = seqio.get_mixture_or_task(name).source

  def first(shard, count):
    dataset = source.get_dataset("train", shard_info=None if shard is None else seqio.ShardInfo(*shard))
    return [tuple(x["inputs"]) + tuple(x["targets"]) for x in dataset.take(count).as_numpy_iterator()]

  one = first(None, 12)
  assert [first((i, 3), 4) for i in range(3)] == [one[i::3] for i in range(3)]


def _speech_corpus(root, rng, utterances=10):
  os.makedirs(root / "audio")
  names = ["anna", "boris", "clara", "dmitri", "elena"]
  with open(root / "speech.jsonl", "w") as f:
    for i in range(utterances):
      soundfile.write(root / "audio" / f"{i}.wav", rng.uniform(-0.3, 0.3, size=int(rng.integers(3000, 6000))),
                      16000, subtype="PCM_16")
      f.write(json.dumps({"audio": f"audio/{i}.wav", "text": f"call {names[i % 5]} now", "id": f"u{i}",
                          "bias": [names[i % 5], names[(i + 2) % 5]]}) + "\n")
  return f"'{root}/speech.jsonl'"


@pytest.mark.multihost
def test_two_processes_train_and_evaluate_like_one(tmp_path):
  """LM, Infini LM and transducer through every launcher: training losses, perplexity eval, infer
  outputs, passkey results, per-book long-document perplexity, and ASR eval (WER and every hypothesis,
  with KMP biasing) equal between
  2 processes x 4 devices and 1 process x 8, and every process returns the same metrics; then each
  topology continues the other's LM checkpoint with the losses of an uninterrupted run."""
  rng = np.random.default_rng()
  data = short_lines(tmp_path / "data", rng)
  manifest = _speech_corpus(tmp_path, rng)
  text = IN_ORDER + [f"DATA_DIR = {data!r}", "TRAIN_STEPS = 4", "SEQUENCE_LENGTH = 32",
                     "Checkpointer.save_interval_steps = 4", "warmup_cosine_schedule.decay_steps = 10"]
  continued = text + ["TRAIN_STEPS = 6", "Checkpointer.data_on_topology_change = 'fast_forward'"]
  infini = IN_ORDER + [f"DATA_DIR = {data!r}", "TRAIN_STEPS = 4", "SEQUENCE_LENGTH = 64",
                       "InfiniTransformerLM.segment_length = 16", "Checkpointer.save_interval_steps = 4"]
  from tests.test_asr_biasing import TINY  # pylint: disable=g-import-not-at-top
  speech_files = ["runs/train.gin", "tiny/transducer_synthetic.gin"]
  speech = IN_ORDER + TINY + [
      f"TRAIN_MANIFEST = {manifest}", f"DEV_MANIFEST = {manifest}", f"TEST_MANIFEST = {manifest}",
      "SPEECH_VOCABULARY = @byte_vocabulary()", "VOCAB_SIZE = 259", "MAX_AUDIO_SAMPLES = 6000",
      "MAX_TARGET_LENGTH = 24", "TRAIN_STEPS = 3", "SpecAugment.num_time_masks = 0", "SpecAugment.num_freq_masks = 0",
      "speech_dataset.max_phrases = 4", "speech_dataset.max_phrase_length = 8"]
  asr = [b for b in speech if not b.startswith("train")] + [
      "asr_eval.beam_size = 2", "asr_eval.batch_size = 8", "asr_eval.biasing = [None, @KmpBiasing(), @anti/KmpBiasing()]",
      "KmpBiasing.delta = 5.0", "anti/KmpBiasing.bias_lists = 'anti'"]
  from tests.test_long_documents import write_documents  # pylint: disable=g-import-not-at-top
  write_documents(str(tmp_path / "docs"), [int(n) for n in rng.integers(1, 40, 11)], seed=int(rng.integers(1 << 30)))
  docs = ["train/DatasetConfig.shuffle = False", "warmup_cosine_schedule.warmup_steps = 2", "BATCH_SIZE = 8",
          "EVAL_BATCH_SIZE = 8", "TRAIN_STEPS = 3", "SEQUENCE_LENGTH = 32", "InfiniTransformerLM.segment_length = 16",
          "MIXTURE_OR_TASK_NAME = @text_directory_task()", "text_directory_task.name = 'multihost_docs'",
          f"text_directory_task.split_dirs = {{'train': '{tmp_path}/docs/train', 'test': '{tmp_path}/docs/train'}}",
          "train/DatasetConfig.feature_converter = 'long_document'", "Checkpointer.save_interval_steps = 3"]
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the red cat\na dog ran on\nsmall\n")
  steps = [("lm", "train", LM, text), ("lm_eval", "eval", ["runs/eval.gin", "tiny/lm_demo.gin"], text),
           ("lm_infer", "infer", ["runs/infer.gin", "tiny/lm_demo.gin"],
            text + [f"INPUT_FILE = '{prompts}'", "infer.max_decode_length = 6"]),
           ("infini", "train", INFINI, infini),
           ("infini_passkey", "eval", ["runs/passkey_eval.gin", "tiny/infini_lm_demo.gin"],
            infini + ["PASSKEY_LENGTHS = [400]", "passkey_eval.examples_per_bucket = 1",
                      "passkey_eval.chunk_segments = 8"]),
           ("docs", "train", ["runs/train.gin", "tiny/infini_lm.gin"], docs),
           ("docs_eval", "eval", ["runs/long_document_eval.gin", "tiny/infini_lm.gin"], docs),
           ("asr", "train", speech_files, speech),
           ("asr_eval", "eval", ["runs/asr_eval.gin", "tiny/transducer_synthetic.gin"], asr)]
  model_dirs = {"lm": "lm", "lm_eval": "lm", "lm_infer": "lm", "infini": "infini", "infini_passkey": "infini",
                "docs": "docs", "docs_eval": "docs", "asr": "asr", "asr_eval": "asr"}
  results = {}
  for name, kind, files, bindings in steps:
    results[name] = run_in_process(kind, files, bindings, str(tmp_path / "one" / model_dirs[name]))
  # ... and last, the two processes continue the one-process LM checkpoint (1x8 -> 2x4).
  plan = {"out": str(tmp_path / "out"), "steps": [
      {"name": name, "kind": kind, "files": files, "bindings": bindings,
       "model_dir": str(tmp_path / "two" / model_dirs[name])} for name, kind, files, bindings in steps] + [
      {"name": "lm_continued", "kind": "train", "files": LM, "bindings": continued,
       "model_dir": str(tmp_path / "one" / "lm")},
      # Whole documents per host: the two processes read other books in other lanes, so they evaluate the
      # one-process checkpoint, which must give every book the NLL it has in one process.
      {"name": "docs_eval_of_one", "kind": "eval", "files": ["runs/long_document_eval.gin", "tiny/infini_lm.gin"],
       "bindings": docs, "model_dir": str(tmp_path / "one" / "docs")}]}
  os.makedirs(plan["out"])
  with open(tmp_path / "plan.json", "w") as f:
    json.dump(plan, f)
  started = time.time()
  _assert_ok(pod_local(tmp_path, "tests.multihost_driver", [str(tmp_path / "plan.json")]))
  print(f"two processes: {time.time() - started:.0f} s")
  run_in_process("train", LM, continued, str(tmp_path / "two" / "lm"))  # 2x4 -> 1x8
  run_in_process("train", LM, continued, str(tmp_path / "reference"))
  for model_dir in (tmp_path / "one" / "lm", tmp_path / "two" / "lm"):
    np.testing.assert_allclose(losses(str(model_dir), [5, 6]), losses(str(tmp_path / "reference"), [5, 6]),
                               rtol=2e-5, err_msg=str(model_dir))
  for name, want in results.items():
    got = [_without_timings(json.load(open(os.path.join(plan["out"], f"{name}.process{i}.json")))) for i in (0, 1)]
    assert got[0] == got[1], name  # every process ends with the same (reduced) metrics
  for run, count in (("lm", 6), ("infini", 4), ("asr", 3)):
    np.testing.assert_allclose(losses(str(tmp_path / "two" / run), range(1, count + 1)),
                               losses(str(tmp_path / "one" / run), range(1, count + 1)), rtol=2e-5, err_msg=run)
  for i in (0, 1):
    by_title = lambda result: {d["title"]: d for d in result["documents"]}  # noqa: E731
    two_docs = by_title(json.load(open(os.path.join(plan["out"], f"docs_eval_of_one.process{i}.json"))))
    one_docs = by_title(results["docs_eval"])
    assert sorted(two_docs) == sorted(one_docs) and len(one_docs) == 11  # every book once, none twice
    for title, doc in one_docs.items():
      np.testing.assert_allclose(two_docs[title]["nll"], doc["nll"], rtol=2e-5, err_msg=title)
      assert two_docs[title]["tokens"] == doc["tokens"] and two_docs[title]["words"] == doc["words"]
  lm_eval = json.load(open(os.path.join(plan["out"], "lm_eval.process0.json")))
  assert lm_eval.keys() == results["lm_eval"].keys()
  np.testing.assert_allclose([lm_eval[k] for k in sorted(lm_eval)],
                             [results["lm_eval"][k] for k in sorted(lm_eval)], rtol=2e-5)
  passkey = json.load(open(os.path.join(plan["out"], "infini_passkey.process0.json")))
  assert passkey["results"] == results["infini_passkey"]["results"]
  infer_files = [os.path.join(tmp_path, d, "lm", "infer", "prompts_step4.jsonl") for d in ("two", "one")]
  assert open(infer_files[0]).read() == open(infer_files[1]).read()
  asr_two = json.load(open(os.path.join(plan["out"], "asr_eval.process0.json")))["runs"]
  assert len(asr_two) == len(results["asr_eval"]["runs"]) == 3
  for two, one in zip(asr_two, results["asr_eval"]["runs"]):
    assert two["utterances"] == one["utterances"] == 10
    assert {k: two[k] for k in ("wer", "b_wer", "u_wer", "substitutions")} == \
        {k: one[k] for k in ("wer", "b_wer", "u_wer", "substitutions")}
  for subdir in ("two", "one"):  # the per-utterance rows: same ids in the split's order, same hypotheses
    rows = {}
    for name in sorted(os.listdir(tmp_path / subdir / "asr" / "eval")):
      if name.endswith(".jsonl"):
        rows[name] = [json.loads(line) for line in open(tmp_path / subdir / "asr" / "eval" / name)]
    results[subdir] = rows
  assert results["two"] == results["one"]
  assert [r["id"] for r in next(iter(results["two"].values()))] == [f"u{i}" for i in range(10)]


def _pod_module():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("pod", os.path.join(lm_runs.REPO, "tpu", "pod.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _steps_saved(model_dir: str) -> list[int]:
  directory = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, "commit_success.txt")))


@pytest.mark.multihost
def test_a_killed_process_stops_its_peer_within_the_heartbeat_timeout_and_a_relaunch_resumes(tmp_path):
  """kill -9 of process 1 mid-run: process 0 exits with an error within the (gin-set) heartbeat
  timeout instead of hanging (naming process 1, unless it was inside a collective); relaunching both resumes from the newest
  complete checkpoint and ends with the losses of an uninterrupted one-process run."""
  pod = _pod_module()
  data = short_lines(tmp_path / "data", np.random.default_rng())
  model_dir = str(tmp_path / "run")
  bindings = IN_ORDER + [f"DATA_DIR = {data!r}", "TRAIN_STEPS = 400", "SEQUENCE_LENGTH = 32",
                         "Checkpointer.save_interval_steps = 3", "Checkpointer.async_save = False",
                         "warmup_cosine_schedule.decay_steps = 400"]  # the same schedule for every TRAIN_STEPS
  heartbeat = 5
  args = pod.parse_args(["--local", "2", "--local_devices", "4", "launch", "--module", "train", "--",
                         *gin_flags(LM, bindings + [f"MODEL_DIR = {model_dir!r}"]),
                         f"--gin.initialize_distributed.heartbeat_timeout_seconds={heartbeat}"])
  logs = [open(tmp_path / f"worker_{i}.log", "wb") for i in (0, 1)]
  procs = [subprocess.Popen(argv, env={**os.environ, **env}, cwd=lm_runs.REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True) for (env, argv), log in zip(pod.local_commands(args, pod.free_port()), logs)]
  try:
    deadline = time.time() + 240
    while len(_steps_saved(model_dir)) < 2 and time.time() < deadline and procs[0].poll() is None:
      time.sleep(0.5)
    assert len(_steps_saved(model_dir)) >= 2, open(tmp_path / "worker_0.log").read()[-3000:]
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    procs[0].wait(timeout=heartbeat + 60)
    waited = time.time() - killed_at
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for log in logs:
      log.close()
  survivor_log = open(tmp_path / "worker_0.log", errors="replace").read()
  assert procs[0].returncode != 0
  assert waited < heartbeat + 30, waited
  # Outside a collective, jax's coordination service names the dead process after the heartbeat
  # timeout; inside one (CPU runs collectives over gloo's TCP pairs) the broken pair aborts at once.
  heartbeat_error = re.search(r"unhealthy \(stopped sending heartbeats\):\s*\n?\s*1\b", survivor_log)
  assert heartbeat_error or "[enforce fail at external/gloo" in survivor_log, survivor_log[-3000:]
  last_saved = _steps_saved(model_dir)[-1]

  short = [f"--gin.TRAIN_STEPS={last_saved + 3}"]
  _assert_ok(pod_local(tmp_path, "train", args.passthrough + short))
  relaunch_log = open(tmp_path / "pod_logs" / "worker_0.log", errors="replace").read()
  assert f"Restored checkpoint at step {last_saved}." in relaunch_log
  reference = str(tmp_path / "reference")
  run_in_process("train", LM, bindings + [f"TRAIN_STEPS = {last_saved + 3}"], reference)
  after = range(last_saved + 1, last_saved + 4)
  np.testing.assert_allclose(losses(model_dir, after), losses(reference, after), rtol=2e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(coordinator_address="127.0.0.1:1234"), "coordinator_address set but not num_processes, process_id"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "must be 'host:port', got 'localhost'"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), "process_id must be an integer in 0..1"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0, heartbeat_timeout_seconds=0),
     "heartbeat_timeout_seconds must be an integer >= 1"),
    (dict(mode="never", coordinator_address="127.0.0.1:1", num_processes=2, process_id=0), "mode='never' but"),
])
def test_distributed_settings_are_checked_first(settings, message):
  from memlm_jax.runtime.partitioning import initialize_distributed  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=re.escape(message)):
    initialize_distributed(**settings)


def test_joining_a_job_after_using_a_device_is_a_clear_error():
  import jax  # pylint: disable=g-import-not-at-top
  from memlm_jax.runtime.partitioning import initialize_distributed  # pylint: disable=g-import-not-at-top
  jax.devices()  # this process has used its devices (as the test session has)
  with pytest.raises(RuntimeError, match="must run before anything uses a JAX device"):
    initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1)


class _Device:
  def __init__(self, process_index: int):
    self.process_index = process_index


def _grid(processes: list[int], shape: tuple[int, int, int]) -> np.ndarray:
  devices = np.empty(len(processes), dtype=object)
  devices[:] = [_Device(p) for p in processes]
  return devices.reshape(shape)


def test_each_process_reads_the_shard_of_the_batch_rows_its_devices_hold():
  from memlm_jax.runtime.partitioning import data_shard_of  # pylint: disable=g-import-not-at-top
  # 4 processes x 2 devices, data 4 x tensor 2: each process holds one row block
  grid = _grid([0, 0, 1, 1, 2, 2, 3, 3], (4, 1, 2))
  assert [data_shard_of(grid, p) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
  # tensor 4 across two processes of 2 devices: both read the same shard, 2 shards in all
  grid = _grid([0, 0, 1, 1, 2, 2, 3, 3], (2, 1, 4))
  assert [data_shard_of(grid, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
  # two blocks per process (data 2 x fsdp 2): contiguous, so process 1 reads shard 1 of 2
  grid = _grid([0, 0, 1, 1], (2, 2, 1))
  assert data_shard_of(grid, 1) == (1, 2)
  # a process holding blocks 0 and 2 could not be fed one contiguous slice of rows
  grid = _grid([0, 1, 0, 1], (4, 1, 1))
  with pytest.raises(ValueError, match="overlap or are not contiguous"):
    data_shard_of(grid, 0)
