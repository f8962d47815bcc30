r"""Infini-attention paper Table 2 in miniature: word-level perplexity over whole long documents, on a CPU.

  python experiments/infini_lm/run.py                       # corpus, vocabulary, 4 models, the table
  python experiments/infini_lm/run.py --variants=delta,no_memory --train_steps=300 --out_dir=runs/infini_lm_quick

The corpus (scripts/make_long_documents.py --corpus=lm) is documents of ~800 words that define a cast
of invented people early and recall their attributes hundreds of words later, beyond one training
step (256 tokens): only a model that carries a memory across the document can predict a recalled
name or attribute. Every model reads each document in order (8 lanes, feature_converter
'long_document', configs/tiny/infini_long_docs.gin) for the same steps, and is evaluated by
streaming every test document to its end (runs/long_document_eval.gin): token-level and PG19's
word-level perplexity. Variants:
  delta      Infini-attention, linear + delta memory update (the paper's best on passkey)
  linear     Infini-attention, linear update
  no_memory  the same model without its memory: attention within each 64-token segment only
  dense      a dense Transformer of the same size attending over each 256-token step, nothing carried

Everything resumes: an existing corpus, vocabulary, finished training or written eval is reused.
The paper's rows (PG19, 12-layer models trained on 32K-token inputs) are printed beside ours; the
numbers are not comparable, the ordering is what the miniature tests.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece  # noqa: E402
from flax import nnx  # noqa: E402

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (every gin configurable)
from memlm_jax.launch import eval_lib, long_document_lib, train_lib  # noqa: E402
from memlm_jax.runtime.partitioning import Partitioner  # noqa: E402
from experiments import variant_runs  # noqa: E402
from scripts import make_long_documents, train_spm  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEARCH_PATHS = [os.path.join(REPO, "configs"), REPO]
INFINI, DENSE = "tiny/infini_long_docs.gin", "tiny/dense_long_docs.gin"

# variant -> (gin file, bindings, label)
VARIANTS = {
    "delta": (INFINI, [], "Infini (linear + delta)"),
    "linear": (INFINI, ["InfiniTransformerLM.update_rule = 'linear'"], "Infini (linear)"),
    "no_memory": (INFINI, ["InfiniTransformerLM.use_memory = False"], "no memory (64-token segments)"),
    "dense": (DENSE, [], "dense (256-token steps)"),
}
# Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143) Table 2, PG19 column.
PAPER_ROWS = (("Transformer-XL", 11.88), ("Memorizing Transformers", 11.37), ("RMT", 13.27),
              ("Infini-Transformer (Linear)", 9.65), ("Infini-Transformer (Linear + Delta)", 9.67))
CORPUS_FLAGS = ("--corpus=lm", "--num_train=300", "--num_validation=10", "--num_test=20",
                "--words_per_document=800", "--seed=0")
VOCAB_SIZE = 512


def _parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin(list(files), list(bindings), SEARCH_PATHS)


def make_data(data_dir: str) -> None:
  """The generated corpus and its SentencePiece vocabulary, unless data_dir has them."""
  if not os.path.isfile(os.path.join(data_dir, "spm_input.txt")):
    if make_long_documents.main([f"--output_dir={data_dir}", *CORPUS_FLAGS]):
      raise ValueError(f"making the long-document corpus in {data_dir!r} failed.")
  if not os.path.isfile(os.path.join(data_dir, "spm.model")):
    if train_spm.main([f"--input={os.path.join(data_dir, 'spm_input.txt')}", f"--vocab_size={VOCAB_SIZE}",
                       f"--model_prefix={os.path.join(data_dir, 'spm')}", "--nolowercase"]):
      raise ValueError(f"training the SentencePiece vocabulary in {data_dir!r} failed.")


def run_variant(variant: str, out_dir: str, data_dir: str, extra: Sequence[str]) -> dict[str, Any]:
  """Trains (or resumes) OUT_DIR/<variant> and evaluates it on the test documents (reusing a written eval)."""
  config, bindings, _ = VARIANTS[variant]
  model_dir = os.path.join(out_dir, variant)
  common = [*bindings, f"DATA_DIR = {data_dir!r}", f"SPM_MODEL = {os.path.join(data_dir, 'spm.model')!r}",
            f"MODEL_DIR = {model_dir!r}", *extra]
  _parse(["runs/train.gin", config], common)
  train_lib.train(model_dir)
  steps = gin.query_parameter("%TRAIN_STEPS")
  written = sorted(glob.glob(os.path.join(model_dir, "eval", f"long_document_*_test_*_step{steps}.json")))
  recall_file = os.path.join(model_dir, "eval", f"recalled_names_step{steps}.json")
  if written and os.path.isfile(recall_file):
    with open(written[-1]) as f, open(recall_file) as g:
      result = json.load(f)
      return {**result, "overall": {**result["overall"], **json.load(g)}}
  _parse(["runs/long_document_eval.gin", config], [*common, "EVAL_SPLIT = 'test'"])
  result = long_document_lib.long_document_eval(model_dir)
  recall = recalled_name_perplexity(model_dir, data_dir, gin.query_parameter("%SEQUENCE_LENGTH"))
  with open(os.path.join(model_dir, "eval", f"recalled_names_step{steps}.json"), "w") as f:
    json.dump(recall, f, indent=2)
  return {**result, "overall": {**result["overall"], **recall}}


def token_nll_fn(model_dir: str) -> Callable[[np.ndarray, int], np.ndarray]:
  """(tokens [n] of one document, step_tokens) -> each token's next-token NLL [n], read as the long-document
  eval reads it: in steps of `step_tokens` with the memory carried (the Infini LM), or each step on its own
  (the dense LM). The model of `model_dir` in the gin config in force, restored and compiled once."""
  model_fn = gin.query_parameter("%MODEL").scoped_configurable_fn
  restored = eval_lib.restore_for_inference(model_dir, model_fn, Partitioner(), None)
  graphdef, params = restored.graphdef, restored.params
  model = restored.model()
  carries_memory = hasattr(model, "init_memory")
  if carries_memory:
    apply = jax.jit(lambda p, x, memory, mask: nnx.merge(graphdef, p)(x, memory, mask))
  else:
    apply = jax.jit(lambda p, x, mask: nnx.merge(graphdef, p)(x, mask, jnp.broadcast_to(jnp.arange(x.shape[1]),
                                                                                     x.shape)))

  def token_nll(tokens: np.ndarray, step_tokens: int) -> np.ndarray:
    memory = model.init_memory(1) if carries_memory else None
    out = []
    for start in range(0, tokens.size, step_tokens):
      targets = np.zeros((1, step_tokens), np.int32)
      chunk = tokens[start:start + step_tokens]
      targets[0, :chunk.size] = chunk
      inputs = np.zeros((1, step_tokens), np.int32)
      shifted = tokens[max(start - 1, 0):start + step_tokens - 1]
      inputs[0, 1 if start == 0 else 0:][:shifted.size] = shifted
      mask = (targets != 0).astype(np.int32)
      if carries_memory:
        logits, memory = apply(params, inputs, memory, mask)
      else:
        logits = apply(params, inputs, mask)
      logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
      out.append(-np.take_along_axis(np.asarray(logp), targets[..., None], -1)[0, :chunk.size, 0])
    return np.concatenate(out)

  return token_nll


def recalled_name_perplexity(model_dir: str, data_dir: str, step_tokens: int) -> dict[str, float]:
  """Perplexity on the tokens of recalled names (a person or pet named again hundreds of words after its
  definition: predictable only from memory) and on every other token, over the test documents."""
  processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(data_dir, "spm.model"))
  sums = {"recalled": [0.0, 0], "other": [0.0, 0]}
  token_nll = token_nll_fn(model_dir)
  for path in sorted(glob.glob(os.path.join(data_dir, "test", "*.txt"))):
    with open(path) as f:
      text = f.read()
    pieces = processor.encode(text, return_type="proto").pieces
    ids = np.asarray([p.id for p in pieces] + [processor.eos_id()], np.int32)
    spans = [(r.start, r.end) for r in make_long_documents.back_references(text)]
    recalled = np.zeros(ids.size, bool)
    starts = np.asarray([p.begin for p in pieces])
    ends = np.asarray([p.end for p in pieces])
    for start, end in spans:  # a piece inside a recalled name (byte offsets = char offsets: the text is ASCII)
      recalled[:len(pieces)] |= (starts < end) & (ends > start) & (ends > starts)
    nll = token_nll(ids, step_tokens)
    for name, where in (("recalled", recalled), ("other", ~recalled)):
      sums[name][0] += float(nll[where].sum())
      sums[name][1] += int(where.sum())
  return {f"{name}_perplexity": math.exp(total / max(count, 1)) for name, (total, count) in sums.items()} | {
      "recalled_tokens": sums["recalled"][1]}


def table(results: dict[str, dict[str, Any]]) -> str:
  """Ours (token and word perplexity, the change against no memory) beside the paper's PG19 column."""
  lines = ["| model | token perplexity | word perplexity | word ppl vs no memory | recalled-name tokens: perplexity |"
           " other tokens: perplexity |", "|---|---|---|---|---|---|"]
  reference = results.get("no_memory", {}).get("overall", {}).get("word_perplexity")
  for variant, result in results.items():
    overall = result["overall"]
    word = overall["word_perplexity"]
    change = f"{100 * (word / reference - 1):+.1f}%" if reference else "-"
    recall = lambda key: f"{overall[key]:.2f}" if key in overall else "-"  # noqa: E731
    lines.append(f"| {VARIANTS[variant][2]} | {overall['token_perplexity']:.3f} | {word:.3f} | {change} | "
                 f"{recall('recalled_perplexity')} | {recall('other_perplexity')} |")
  documents = next(iter(results.values()))["overall"]["num_documents"] if results else 0
  lines.append(f"\nOurs: {documents} generated test documents of ~800 words, read whole. Paper (PG19 test, "
               "12-layer models, 32K-token training inputs; perplexity):")
  lines.append("\n| paper model | PG19 |\n|---|---|")
  lines += [f"| {name} | {value:.2f} |" for name, value in PAPER_ROWS]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parsed = variant_runs.parse_args(argv, __doc__, tuple(VARIANTS), out_dir="runs/infini_lm", data_dir="runs/long_docs")
  if parsed is None:
    return 1
  args, extra = parsed
  make_data(args.data_dir)
  results = {variant: run_variant(variant, args.out_dir, args.data_dir, extra) for variant in args.variants}
  variant_runs.write_table(args.out_dir, table(results), {v: r["overall"] for v, r in results.items()})
  return 0

if __name__ == "__main__":
  sys.exit(main())
