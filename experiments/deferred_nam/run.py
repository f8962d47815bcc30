r"""Deferred NAM on the contacts corpus, on a CPU, in one process: corpus, vocabulary, the base
transducer, the biasers (B1, D1, D2, D3, each warm-started from the base and trained with it frozen),
then every setting on the held-out-name test set with bias lists of N = 10, 100, 1000 phrases, own
and anti-biasing, printed beside the paper's claims.

  python experiments/deferred_nam/run.py [--data_dir=runs/contacts_speech] [--out_dir=runs/dnam] \
      [--list_sizes=10,100,1000] [--variants=b1,d1,d2,d3] [--kmp_delta=0.25] [--spot_delta=3] [--binding=...]

Every step resumes: an existing corpus, vocabulary or finished training is kept (a killed training
continues from its newest checkpoint), and each eval's summary is kept in OUT_DIR/results.json, so
a rerun only computes what is missing. Models: OUT_DIR/base (tiny/transducer_contacts.gin) and
OUT_DIR/<variant> (<variant>.gin beside this script). Rows (beam 4): no biasing; KMP shallow fusion
(the base model); KMP of only the phrases the base model's CTC head spots (KmpBiasing.spotter,
--spot_*); those phrases merged into the best hypothesis instead (CtcWordSpotting); B1, D1, D2, D3
(NAM only); D3 + KMP over the whole list; D3 + KMP over the K phrases NAM selected; D3S (ours: D3
reading the CTC head, d3s.gin). The tables go to stdout and OUT_DIR/table.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

import gin  # noqa: E402

from memlm_jax import gin_utils  # noqa: E402
from memlm_jax import registry  # noqa: E402,F401  (every gin configurable)
from memlm_jax.evaluation.passkey_report import markdown  # noqa: E402
from memlm_jax.launch import asr_lib, train_lib  # noqa: E402
from memlm_jax.launch.biasing import CtcSpotter, CtcWordSpotting, KmpBiasing, NamBiasing  # noqa: E402
from scripts import make_synthetic_speech, train_spm  # noqa: E402

BASE_CONFIG = "tiny/transducer_contacts.gin"
VARIANTS = ("d3", "d1", "d2", "b1", "d3s")  # trained and evaluated in this order: the paper's best first, ours last
VARIANT_LABELS = {"b1": "B1: NAM, full encoding (Dual-mode NAM)", "d1": "D1: Deferred NAM",
                  "d2": "D2: D1 + CE-PA", "d3": "D3: D2 + CE-WPA",
                  "d3s": "D3S: D3 reading the CTC head (spotting selection and attention prior)"}
# What the paper (Wu et al. 2024, arXiv 2404.10180) states; its per-row WERs come from production
# data and are not reproduced here, so only its headline claims are printed beside ours.
PAPER_CLAIMS = ("paper: D3 vs B1 up to 37.5% relative WER reduction (CE-PA + CE-WPA + the DAN pass); "
                "deferred encoding up to 16.1x faster pre-decoding, 20K phrases under 33 ms (TPU; "
                "ours: scripts/bench_nam.py).")
BEAM_SIZE = 4


def corpus_bindings(data_dir: str) -> list[str]:
  """Gin bindings pointing tiny/transducer_contacts.gin at the corpus in data_dir."""
  names = {"TRAIN_MANIFEST": "train.jsonl", "DEV_MANIFEST": "dev.jsonl", "TEST_MANIFEST": "test.jsonl",
           "SPM_MODEL": "spm.model"}
  names.update({f"TEST_N{n}_MANIFEST": f"test_n{n}.jsonl" for n in (10, 100, 1000)})
  return [f"{macro} = '{os.path.join(data_dir, name)}'" for macro, name in names.items()]


def _parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  gin_utils.parse_gin(list(files), list(bindings), [os.path.join(REPO, "configs"), REPO])


def make_data(data_dir: str, vocab_size: int) -> None:
  """The contacts corpus and its SentencePiece vocabulary, unless data_dir has them."""
  if not os.path.isfile(os.path.join(data_dir, "test_n1000.jsonl")):
    if make_synthetic_speech.main([f"--output_dir={data_dir}", "--corpus=contacts"]):
      raise ValueError(f"making the contacts corpus in {data_dir!r} failed.")
  if not os.path.isfile(os.path.join(data_dir, "spm.model")):
    if train_spm.main([f"--input={os.path.join(data_dir, 'train.jsonl')}",
                       f"--model_prefix={os.path.join(data_dir, 'spm')}", f"--vocab_size={vocab_size}"]):
      raise ValueError(f"training the SentencePiece vocabulary in {data_dir!r} failed.")


def _config(variant: str) -> str:
  return BASE_CONFIG if variant == "base" else os.path.join(HERE, f"{variant}.gin")


def train(variant: str, out_dir: str, common: Sequence[str]) -> None:
  """Trains (or resumes) OUT_DIR/<variant>; the biasers warm-start from OUT_DIR/base."""
  model_dir = os.path.join(out_dir, variant)
  _parse(["runs/train.gin", _config(variant)],
         [*common, f"MODEL_DIR = {model_dir!r}", f"BASE_MODEL_DIR = {os.path.join(out_dir, 'base')!r}"])
  train_lib.train(model_dir)


@dataclasses.dataclass(frozen=True)
class Spotting:
  """The CTC-spotting rows (launch/biasing.py): the `top_k` phrases the base model's CTC head spots, each
  losing at most `threshold` nats per token, either boosted by KMP at `delta` (0: no such row) or
  merged into the best hypothesis in place of the words emitted in their windows widened by `margin`
  frames, unless that is over `max_extra_words` more words than the phrase has (CTC word spotting, as
  NeMo's CTC-WS). The defaults were chosen on the validation split (runs/dnam_ctc/dev_spotting_sweep.json):
  KMP's delta by WER, the word spotting's threshold and max_extra_words by the mean of own-list and
  anti-list WER."""
  delta: float = 3.0
  top_k: int = 1
  threshold: float = 3.0
  margin: int = 0
  max_extra_words: int = 2

  @property
  def spotter(self) -> CtcSpotter:
    return CtcSpotter(self.top_k, self.threshold)

  @property
  def kmp_label(self) -> str:
    return (f"KMP over the CTC-spotted phrases (top {self.top_k}, {self.threshold:g} nats/token), "
            f"delta={self.delta:g}")

  @property
  def word_spotting_label(self) -> str:
    return (f"CTC word spotting (top {self.top_k}, {self.threshold:g} nats/token), margin {self.margin}, "
            f"<= {self.max_extra_words} extra words")


def _settings(variant: str, kmp_delta: float, spotting: Spotting = Spotting()) -> dict[str, Any]:
  """{row label: biasing setting} evaluated on `variant`'s model (the spotting row needs a CTC head:
  Transducer.ctc_weight > 0)."""
  if variant == "base":
    rows = {"no biasing": None, f"KMP shallow, delta={kmp_delta:g}": KmpBiasing(delta=kmp_delta)}
    if gin.query_parameter("Transducer.ctc_weight"):
      if spotting.delta:
        rows[spotting.kmp_label] = KmpBiasing(delta=spotting.delta, spotter=spotting.spotter)
      rows[spotting.word_spotting_label] = CtcWordSpotting(spotting.spotter, spotting.margin, spotting.max_extra_words)
    return rows
  rows = {VARIANT_LABELS[variant]: NamBiasing()}
  if variant == "d3":
    booster = KmpBiasing(delta=kmp_delta)
    rows[f"D3 + KMP (all phrases), delta={kmp_delta:g}"] = NamBiasing(kmp=booster)
    rows[f"D3 + KMP (NAM's top K), delta={kmp_delta:g}"] = NamBiasing(kmp=booster, kmp_phrases="nam_top_k")
  return rows


def _anti(setting: Any) -> Any:
  if setting is None:
    return None
  if isinstance(setting, (KmpBiasing, CtcWordSpotting)):
    return dataclasses.replace(setting, bias_lists="anti")
  return NamBiasing(bias_lists="anti", kmp=setting.kmp, kmp_phrases=setting.kmp_phrases)


def evaluate(variant: str, out_dir: str, common: Sequence[str], list_sizes: Sequence[int], kmp_delta: float,
             results: dict[str, Any], save, spotting: Spotting = Spotting()) -> None:
  """Every setting of `variant` on test_n<N>, own and anti lists, into results[row][N] (skips what is there)."""
  model_dir = os.path.join(out_dir, variant)
  for size in list_sizes:
    done = results.get("no biasing", {})
    if variant == "base" and done and str(size) not in done:  # without biasing the list changes nothing
      done[str(size)] = next(iter(done.values()))
    _parse(["runs/asr_eval.gin", _config(variant)],
           [*common, f"MODEL_DIR = {model_dir!r}", f"speech_dataset.max_phrases = {max(size, 32)}"])
    todo = {label: s for label, s in _settings(variant, kmp_delta, spotting).items()
            if str(size) not in results.get(label, {})}
    if not todo:
      continue
    labels, settings = [], []
    for label, setting in todo.items():
      labels.append(label)
      settings += [setting, _anti(setting)] if setting is not None else [None]
    runs = iter(asr_lib.asr_eval(model_dir, split=f"test_n{size}", beam_size=BEAM_SIZE, biasing=settings)["runs"])
    for label, setting in todo.items():
      own = next(runs)
      anti = next(runs) if setting is not None else own
      results.setdefault(label, {})[str(size)] = {"own": _summary(own), "anti": _summary(anti)}
    save()


def _summary(payload: dict) -> dict[str, float]:
  return {k: payload[k] for k in ("wer", "b_wer", "u_wer", "phrase_cer", "reference_words", "step") if k in payload}


ROW_ORDER = ("no biasing", "KMP", "KMP over", "CTC word", "B1", "D1", "D2", "D3:", "D3 + KMP (all", "D3 + KMP (NAM",
             "D3S")


def _row_rank(label: str) -> tuple[int, str]:
  return max((i for i, prefix in enumerate(ROW_ORDER) if label.startswith(prefix)), default=len(ROW_ORDER)), label


def tables(results: dict[str, Any], list_sizes: Sequence[int]) -> str:
  """One markdown table per list size: WER, B-WER, U-WER, the spoken names' CER (own lists), WER on the
  anti-biasing lists, and the relative WER / B-WER reduction against no biasing; then the paper's claims."""
  out = []
  for size in list_sizes:
    base = results.get("no biasing", {}).get(str(size))
    rows = []
    for label, by_size in sorted(results.items(), key=lambda item: _row_rank(item[0])):
      if str(size) not in by_size:
        continue
      own, anti = by_size[str(size)]["own"], by_size[str(size)]["anti"]
      relative = lambda key: ("-" if base is None or not base["own"].get(key) else  # noqa: E731
                              f"{100 * (1 - own[key] / base['own'][key]):+.1f}%")
      rows.append([label, *(f"{100 * own[k]:.2f}" if own.get(k) is not None else "-"
                            for k in ("wer", "b_wer", "u_wer", "phrase_cer")),
                   f"{100 * anti['wer']:.2f}", relative("wer"), relative("b_wer")])
    if rows:
      out.append(f"Held-out-name test set, bias lists of N = {size} phrases, beam {BEAM_SIZE} (values in %)\n\n" +
                 markdown(["setting", "WER", "B-WER", "U-WER", "name CER", "anti WER", "WER reduction",
                           "B-WER reduction"],
                          rows))
  return "\n\n".join(out + [PAPER_CLAIMS])


def run(data_dir: str, out_dir: str, list_sizes: Sequence[int], variants: Sequence[str], kmp_delta: float,
        bindings: Sequence[str] = (), vocab_size: int = 128, spotting: Spotting = Spotting()) -> str:
  make_data(data_dir, vocab_size)
  common = [*corpus_bindings(data_dir), *bindings]
  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, "results.json")
  results = json.load(open(results_path)) if os.path.isfile(results_path) else {}

  def save():
    with open(results_path + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(results_path + ".tmp", results_path)

  for variant in ("base", *variants):  # each model's rows as soon as it is trained
    train(variant, out_dir, common)
    evaluate(variant, out_dir, common, list_sizes, kmp_delta, results, save, spotting)
  table = tables(results, list_sizes)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  return table


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="runs/contacts_speech", help="where the corpus and spm.model go")
  parser.add_argument("--out_dir", default="runs/dnam", help="the models (base, b1, d1, ...) and the tables")
  parser.add_argument("--list_sizes", default="10,100,1000", help="bias list sizes N (test_n<N> manifests)")
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"biasers to train and evaluate, of {VARIANTS}")
  parser.add_argument("--kmp_delta", type=float, default=0.25, help="KMP bonus per matched token")
  parser.add_argument("--spot_delta", type=float, default=Spotting.delta,
                      help="KMP bonus of the CTC-spotting row (0 = no such row)")
  parser.add_argument("--spot_top_k", type=int, default=Spotting.top_k, help="phrases the CTC head spots per utterance")
  parser.add_argument("--spot_threshold", type=float, default=Spotting.threshold,
                      help="most nats per token a spotted phrase may lose against the CTC head's best labels")
  parser.add_argument("--spot_margin", type=int, default=Spotting.margin,
                      help="frames added on each side of a spotted window (CTC word spotting row)")
  parser.add_argument("--spot_max_extra_words", type=int, default=Spotting.max_extra_words,
                      help="most words a spotted phrase may replace beyond its own count")
  parser.add_argument("--vocab_size", type=int, default=128)
  parser.add_argument("--binding", action="append", default=[],
                      help="extra gin binding for every training and eval, e.g. --binding='TRAIN_STEPS = 500'")
  args = parser.parse_args(argv)
  try:
    list_sizes = [int(n) for n in args.list_sizes.split(",") if n]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or any(n not in (10, 100, 1000) for n in list_sizes):
      raise ValueError(f"--variants must be of {VARIANTS} (got {unknown}) and --list_sizes of 10, 100, 1000 "
                       f"(got {list_sizes}).")
    spotting = Spotting(args.spot_delta, args.spot_top_k, args.spot_threshold, args.spot_margin,
                        args.spot_max_extra_words)
    print(run(args.data_dir, args.out_dir, list_sizes, variants, args.kmp_delta, args.binding, args.vocab_size,
              spotting))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
