r"""Infini-attention paper Table 4 in miniature: summarizing long inputs, ROUGE, on a CPU.

  python experiments/infini_booksum/run.py                  # corpus, vocabulary, 3 models, the table
  python experiments/infini_booksum/run.py --variants=delta,no_memory --train_steps=300 --out_dir=runs/booksum_quick

The corpus (scripts/make_long_documents.py --corpus=summarization) is ~400-word stories whose summary
names each main character with the role and town the story states once, far apart ("The story
follows A, the potter from X; B, the sailor from Y; and C, ..."); the test stories' names never occur
in training. A model must carry facts from across the whole input to write the summary. Each model
is fine-tuned in the prefix-LM format (configs/tiny/infini_summarization.gin: story, EOS, summary;
the loss on the summary) and evaluated by streaming each test story through its memory and decoding
the summary greedily (runs/summarization_eval.gin): ROUGE-1/2/L F1 x 100, best over references, and
their geometric mean. Variants:
  delta      Infini-attention, linear + delta memory update
  linear     Infini-attention, linear update
  no_memory  the same model without its memory: when the summary is written it sees only the last
             64-token segment

Everything resumes: an existing corpus, vocabulary, finished training or written eval is reused. The
paper's rows (BookSum, 8B model, 500K-token inputs) are printed beside ours; the numbers are not
comparable, the ordering is what the miniature tests.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gin  # noqa: E402

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (every gin configurable)
from memlm_jax.launch import summarization_lib, train_lib  # noqa: E402
from experiments import variant_runs  # noqa: E402
from scripts import make_long_documents, train_spm  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEARCH_PATHS = [os.path.join(REPO, "configs"), REPO]
CONFIG = "tiny/infini_summarization.gin"

VARIANTS = {  # variant -> (bindings, label)
    "delta": ([], "Infini (linear + delta)"),
    "linear": (["InfiniTransformerLM.update_rule = 'linear'"], "Infini (linear)"),
    "no_memory": (["InfiniTransformerLM.use_memory = False"], "no memory (64-token segments)"),
}
# Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143) Table 4, BookSum test: ROUGE-1, -2, -L, overall,
# as transcribed from the paper (the baselines' rows are Unlimiformer's, Bertsch et al. 2023).
PAPER_ROWS = (("BART", 36.4, 7.6, 15.3, 16.2), ("BART + Unlimiformer", 36.8, 8.3, 15.7, 16.9),
              ("PRIMERA", 38.6, 7.2, 15.6, 16.3), ("PRIMERA + Unlimiformer", 37.9, 8.2, 16.3, 17.2),
              ("Infini-Transformers (Linear)", 37.9, 8.7, 17.6, 18.0),
              ("Infini-Transformers (Linear + Delta)", 40.0, 8.8, 17.9, 18.5))
CORPUS_FLAGS = ("--corpus=summarization", "--num_train=1500", "--num_validation=10", "--num_test=40",
                "--words_per_document=400", "--num_entities=3", "--seed=0")
VOCAB_SIZE = 512
FACT = re.compile(r"the (\w+) from (\w+)")  # a summary's "the potter from Greyhaven"


def _parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin(list(files), list(bindings), SEARCH_PATHS)


def make_data(data_dir: str) -> None:
  """The generated corpus and a SentencePiece vocabulary of its training stories, unless data_dir has them."""
  if not os.path.isfile(os.path.join(data_dir, "test.jsonl")):
    if make_long_documents.main([f"--output_dir={data_dir}", *CORPUS_FLAGS]):
      raise ValueError(f"making the summarization corpus in {data_dir!r} failed.")
  if not os.path.isfile(os.path.join(data_dir, "spm.model")):
    sentences = os.path.join(data_dir, "spm_input.txt")  # train_spm reads a .jsonl as a speech manifest
    with open(os.path.join(data_dir, "train.jsonl")) as f, open(sentences, "w") as out:
      for line in f:
        example = json.loads(line)
        text = example["text"]
        out.writelines(text[start:end] + "\n" for start, end in make_long_documents.sentence_spans(text))
        out.write(example["summary"] + "\n")
    if train_spm.main([f"--input={sentences}", f"--vocab_size={VOCAB_SIZE}",
                       f"--model_prefix={os.path.join(data_dir, 'spm')}", "--nolowercase"]):
      raise ValueError(f"training the SentencePiece vocabulary in {data_dir!r} failed.")


def run_variant(variant: str, out_dir: str, data_dir: str, extra: Sequence[str]) -> dict[str, Any]:
  """Trains (or resumes) OUT_DIR/<variant> and scores its test summaries (reusing a written eval)."""
  model_dir = os.path.join(out_dir, variant)
  common = [*VARIANTS[variant][0], f"DATA_DIR = {data_dir!r}", f"SPM_MODEL = {os.path.join(data_dir, 'spm.model')!r}",
            f"MODEL_DIR = {model_dir!r}", *extra]
  _parse(["runs/train.gin", CONFIG], common)
  train_lib.train(model_dir)
  steps = gin.query_parameter("%TRAIN_STEPS")
  written = sorted(glob.glob(os.path.join(model_dir, "eval", f"summarization_*_test_*_step{steps}.json")))
  if not written:
    _parse(["runs/summarization_eval.gin", CONFIG], [*common, "EVAL_SPLIT = 'test'"])
    summarization_lib.summarization_eval(model_dir)
    written = sorted(glob.glob(os.path.join(model_dir, "eval", f"summarization_*_test_*_step{steps}.json")))
  with open(written[-1]) as f:
    scores = json.load(f)
  with open(os.path.join(model_dir, "eval", scores["generations"])) as f:
    scores.update(fact_accuracy([json.loads(line) for line in f]))
  return scores


def fact_accuracy(generations: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Of the reference summaries' "the ROLE from TOWN" pairs, the fraction each generated summary states (in
  any order): whole pairs, roles, towns. The facts a summary can only get from the memory."""
  hit = roles = towns = total = 0
  for generation in generations:
    reference = FACT.findall(generation["references"][0])
    predicted = FACT.findall(generation["prediction"])
    total += len(reference)
    hit += sum(pair in predicted for pair in reference)
    roles += sum(role in {r for r, _ in predicted} for role, _ in reference)
    towns += sum(town in {t for _, t in predicted} for _, town in reference)
  total = max(total, 1)
  return {"pairs_right": hit / total, "roles_right": roles / total, "towns_right": towns / total}


def table(results: dict[str, dict[str, Any]]) -> str:
  lines = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | overall | (role, town) pairs right | roles right | towns right |",
           "|---|---|---|---|---|---|---|---|"]
  for variant, scores in results.items():
    facts = " | ".join(f"{100 * scores[k]:.1f}%" if k in scores else "-"
                       for k in ("pairs_right", "roles_right", "towns_right"))
    lines.append(f"| {VARIANTS[variant][1]} | {scores['rouge1']:.1f} | {scores['rouge2']:.1f} | "
                 f"{scores['rougeL']:.1f} | {scores['overall']:.1f} | {facts} |")
  examples = next(iter(results.values()))["examples"] if results else 0
  lines.append(f"\nOurs: {examples} generated test stories (~400 words, held-out names), greedy decoding. "
               "Paper (BookSum test, 8B model, inputs up to 500K tokens):")
  lines.append("\n| paper model | ROUGE-1 | ROUGE-2 | ROUGE-L | overall |\n|---|---|---|---|---|")
  lines += [f"| {name} | {r1:.1f} | {r2:.1f} | {rl:.1f} | {overall:.1f} |" for name, r1, r2, rl, overall in PAPER_ROWS]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parsed = variant_runs.parse_args(argv, __doc__, tuple(VARIANTS), out_dir="runs/infini_booksum", data_dir="runs/summaries")
  if parsed is None:
    return 1
  args, extra = parsed
  make_data(args.data_dir)
  results = {variant: run_variant(variant, args.out_dir, args.data_dir, extra) for variant in args.variants}
  keys = ("rouge1", "rouge2", "rougeL", "rougeLsum", "overall", "examples", "pairs_right", "roles_right",
          "towns_right")
  variant_runs.write_table(args.out_dir, table(results), {v: {k: r[k] for k in keys} for v, r in results.items()})
  return 0

if __name__ == "__main__":
  sys.exit(main())
