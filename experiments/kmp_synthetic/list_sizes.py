r"""Phrase boosting against the size of the bias list, both backends (KMP and Aho-Corasick): WER,
B-WER, U-WER and decoding time per utterance for lists of 10 .. 20,000 phrases.

  python experiments/kmp_synthetic/list_sizes.py [--data_dir=runs/contacts_speech] \
      [--model_dir=runs/dnam/base] [--sizes=10,100,1000,5000,20000] [--delta=0.25] \
      [--backends=kmp,aho_corasick] [--kmp_max_size=5000] [--binding=...]

Needs the contacts corpus and its base transducer (experiments/deferred_nam/run.py makes both).
Each test utterance's list of N phrases is the entities it speaks plus N - k distractors: the
corpus's other entities, then invented names (scripts/make_synthetic_speech.invent_word, never a
word of any transcript), in one order fixed per utterance by --seed, so a shorter list is a prefix
of a longer one. The lists go to DATA_DIR/list_sizes/test_list<N>.jsonl and are decoded as the
split 'list<N>' (speech_dataset.max_phrases = N). For every N: no biasing (once: the list changes
nothing), then KMP shallow fusion at --delta with each backend (KMP only up to --kmp_max_size: its
per-step cost grows with N). Beam 4 (tsd).

Time per utterance: asr_eval's `timing` (launch/asr_lib.py: phrase tables built on the host, the
search, detokenizing; not reading the data) without the first batch (which compiles the decoder),
over the other batches' utterances. Results: MODEL_DIR/eval/list_sizes.json and list_sizes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import gin  # noqa: E402
import numpy as np  # noqa: E402

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (every gin configurable)
from memlm_jax.evaluation.passkey_report import markdown  # noqa: E402
from memlm_jax.launch import asr_lib  # noqa: E402
from memlm_jax.launch.biasing import BOOSTING_BACKENDS, KmpBiasing  # noqa: E402
from memlm_jax.runtime import files  # noqa: E402
from scripts import make_synthetic_speech  # noqa: E402

BASE_CONFIG = "tiny/transducer_contacts.gin"
BEAM_SIZE = 4
BACKEND_LABELS = {"kmp": "KMP", "aho_corasick": "Aho-Corasick"}


def _manifest_rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_lists(data_dir: str, sizes: Sequence[int], seed: int = 0) -> dict[int, str]:
  """Writes DATA_DIR/list_sizes/test_list<N>.jsonl for each N (the test manifest with each row's
  "bias" replaced by its spoken entities plus distractors to exactly N); returns {N: path}."""
  test = _manifest_rows(os.path.join(data_dir, "test.jsonl"))
  if not test or any("entities" not in row for row in test):
    raise ValueError(f"{data_dir}/test.jsonl needs rows with 'entities' (the contacts corpus: "
                     "scripts/make_synthetic_speech.py --corpus=contacts).")
  largest = max(sizes)
  spoken_most = max(len(row["entities"]) for row in test)
  if min(sizes) < spoken_most:
    raise ValueError(f"--sizes must each be at least {spoken_most} (the most entities one test utterance speaks), "
                     f"got {sorted(sizes)}.")
  entities, words = [], set()
  for split in ("train", "dev", "test"):
    for row in _manifest_rows(os.path.join(data_dir, f"{split}.jsonl")):
      entities += row.get("bias", []) + row.get("entities", [])
      words |= set(row["text"].split())
  pool = list(dict.fromkeys(entities))  # every phrase once, in the corpus's order
  words |= {w for phrase in pool for w in phrase.split()}
  rng = np.random.default_rng([seed, 7])
  while len(pool) < largest + spoken_most:  # invented names, two words each, no word used anywhere
    phrase = []
    while len(phrase) < 2:
      word = make_synthetic_speech.invent_word(rng, int(rng.choice((2, 3))))
      if word not in words:
        words.add(word)
        phrase.append(word)
    pool.append(" ".join(phrase))
  out_dir = os.path.join(data_dir, "list_sizes")
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  orders = [np.random.default_rng([seed, 8, index]).permutation(len(pool)) for index in range(len(test))]
  for size in sizes:
    lines = []
    for row, order in zip(test, orders):
      spoken = list(row["entities"])
      distractors = [pool[i] for i in order[:size + len(spoken)] if pool[i] not in spoken][:size - len(spoken)]
      audio = row["audio"] if os.path.isabs(row["audio"]) else os.path.relpath(os.path.join(data_dir, row["audio"]),
                                                                               out_dir)  # relative to the new manifest
      lines.append(json.dumps({**row, "audio": audio, "bias": spoken + distractors}) + "\n")
    paths[size] = os.path.join(out_dir, f"test_list{size}.jsonl")
    files.write_atomic(paths[size], "".join(lines))
  return paths


def _bindings(data_dir: str, model_dir: str, paths: dict[int, str], size: int) -> list[str]:
  manifests = {"train": os.path.join(data_dir, "train.jsonl"), "validation": os.path.join(data_dir, "dev.jsonl"),
               "test": os.path.join(data_dir, "test.jsonl"), **{f"list{n}": p for n, p in paths.items()}}
  return [f"SPM_MODEL = {os.path.join(data_dir, 'spm.model')!r}", f"manifest_task.manifest = {manifests!r}",
          f"MODEL_DIR = {model_dir!r}", f"speech_dataset.max_phrases = {max(size, 32)}"]


def per_utterance_seconds(payload: dict, batch_size: int) -> Optional[float]:
  """Decoding seconds per utterance after the first batch (None with a single batch)."""
  timing = payload["timing"]
  rest = payload["utterances"] - batch_size
  if timing["batches"] < 2 or rest <= 0:
    return None
  return (timing["decode_seconds"] - timing["first_batch_seconds"]) / rest


def run(data_dir: str, model_dir: str, sizes: Sequence[int], delta: float, backends: Sequence[str],
        kmp_max_size: int, bindings: Sequence[str] = (), seed: int = 0) -> str:
  paths = write_lists(data_dir, sizes, seed)
  results_path = os.path.join(model_dir, "eval", "list_sizes.json")
  results: dict[str, Any] = json.loads(files.read_text(results_path)) if files.exists(results_path) else {}

  def save():
    files.write_atomic(results_path, json.dumps(results, indent=1))

  for size in sorted(sizes):
    settings = {"no biasing": None} if "no biasing" not in results else {}
    settings.update({BACKEND_LABELS[b]: KmpBiasing(delta=delta, backend=b) for b in backends
                     if not (b == "kmp" and size > kmp_max_size)})
    todo = {label: s for label, s in settings.items() if str(size) not in results.get(label, {})}
    if not todo:
      continue
    gin.clear_config()
    gin_utils.parse_gin(["runs/asr_eval.gin", BASE_CONFIG], [*_bindings(data_dir, model_dir, paths, size), *bindings],
                        [os.path.join(REPO, "configs"), REPO])
    runs = asr_lib.asr_eval(model_dir, split=f"list{size}", beam_size=BEAM_SIZE, biasing=list(todo.values()))["runs"]
    for (label, _), payload in zip(todo.items(), runs):
      summary = {k: payload.get(k) for k in ("wer", "b_wer", "u_wer", "utterances", "reference_words")}
      summary["seconds_per_utterance"] = per_utterance_seconds(payload, payload["settings"]["batch_size"])
      summary["first_batch_seconds"] = payload["timing"]["first_batch_seconds"]
      results.setdefault(label, {})[str(size)] = summary
    save()
  table = list_size_table(results, sizes, delta, kmp_max_size)
  files.write_atomic(os.path.join(model_dir, "eval", "list_sizes.md"), table + "\n")
  return table


def list_size_table(results: dict[str, Any], sizes: Sequence[int], delta: float, kmp_max_size: int) -> str:
  """One row per (list size, setting): WER, B-WER, U-WER (%), ms per utterance."""
  rows = []
  for size in sorted(sizes):
    for label in ("no biasing", *BACKEND_LABELS.values()):
      entry = results.get(label, {}).get(str(size)) or (results.get(label, {}).get(str(min(sizes)))
                                                        if label == "no biasing" else None)
      if entry is None:
        if label == "KMP" and size > kmp_max_size:
          rows.append([f"{size:,}", label, "-", "-", "-", f"not run (> --kmp_max_size={kmp_max_size})"])
        continue
      seconds = entry["seconds_per_utterance"]
      rows.append([f"{size:,}", label if label == "no biasing" else f"{label}, delta={delta:g}",
                   *(f"{100 * entry[m]:.2f}" for m in ("wer", "b_wer", "u_wer")),
                   "-" if seconds is None else f"{1000 * seconds:.0f}"])
  return markdown(["phrases", "setting", "WER", "B-WER", "U-WER", "ms / utterance"], rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="runs/contacts_speech", help="the contacts corpus and its spm.model")
  parser.add_argument("--model_dir", default="runs/dnam/base", help="the base transducer's MODEL_DIR")
  parser.add_argument("--sizes", default="10,100,1000,5000,20000", help="bias list sizes N")
  parser.add_argument("--delta", type=float, default=0.25, help="bonus per matched token")
  parser.add_argument("--backends", default="kmp,aho_corasick", help=f"of {BOOSTING_BACKENDS}")
  parser.add_argument("--kmp_max_size", type=int, default=5000, help="no KMP run above this list size")
  parser.add_argument("--seed", type=int, default=0, help="seed of the distractors")
  parser.add_argument("--binding", action="append", default=[], help="extra gin binding (repeatable)")
  args = parser.parse_args(argv)
  try:
    sizes = [int(n) for n in args.sizes.split(",") if n]
    backends = [b for b in args.backends.split(",") if b]
    if not sizes or any(n < 1 for n in sizes) or not set(backends) <= set(BOOSTING_BACKENDS) or not args.delta > 0:
      raise ValueError(f"--sizes must be positive integers (got {args.sizes!r}), --backends of {BOOSTING_BACKENDS} "
                       f"(got {args.backends!r}) and --delta > 0 (got {args.delta}).")
    if not os.path.isdir(os.path.join(args.model_dir, "checkpoints")):
      raise ValueError(f"no trained model in {args.model_dir}: run experiments/deferred_nam/run.py first.")
    print(run(args.data_dir, args.model_dir, sizes, args.delta, backends, args.kmp_max_size, args.binding,
              args.seed))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
