r"""Model errors or search errors? For the first utterances of a split, the beam search's hypothesis
and the reference scored by the same transducer: where the hypothesis is wrong but the model gives it
a higher likelihood than the reference, better search cannot help (a model error).

  python scripts/asr_errors.py --config=tiny/transducer_contacts.gin --model_dir=runs/dnam/base \
      --split=test [--batch_size=16] [--beam_size=4] [--binding="TRAIN_MANIFEST = '...'"]

Reads the newest checkpoint of --model_dir and the first batch of --split in order; prints each
utterance (reference NLL, its NLL per label, hypothesis NLL, both texts) and a summary: wrong
hypotheses, how many of them the model prefers to the reference, the mean NLL per reference label.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from memlm_jax.launch import asr_lib  # noqa: E402
from scripts.transducer_probe import restored_transducer_and_batch  # noqa: E402


def summarize(references: Sequence[str], hypotheses: Sequence[str], reference_nll: np.ndarray,
              hypothesis_nll: np.ndarray, reference_labels: np.ndarray) -> dict[str, float]:
  """Counts over utterances: reference_nll, hypothesis_nll and reference_labels are [utterances]."""
  wrong = np.array([r.split() != h.split() for r, h in zip(references, hypotheses)])
  preferred = wrong & (hypothesis_nll < reference_nll)
  return {"utterances": float(len(wrong)), "wrong hypotheses": float(wrong.sum()),
          "wrong and more likely than the reference (model errors)": float(preferred.sum()),
          "wrong and less likely (search errors)": float((wrong & ~preferred).sum()),
          "reference NLL per label": float(reference_nll.sum() / max(reference_labels.sum(), 1))}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="the model and data gin file")
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--split", default="test")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--binding", action="append", default=[])
  args = parser.parse_args(argv)
  try:
    model, host, vocabulary = restored_transducer_and_batch(args.config, args.model_dir, args.split, args.batch_size,
                                                            args.binding, include_text=True)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  max_target = host["targets"].shape[1]
  batch = {k: jnp.asarray(host[k]) for k in ("audio", "audio_paddings", "targets", "target_paddings")}
  graphdef, state = nnx.split(model)
  decode = asr_lib.make_decoder(graphdef, beam_size=args.beam_size, max_symbols_per_frame=32,
                                max_output_length=max_target)
  tokens, lengths = map(np.asarray, decode(state, batch["audio"], batch["audio_paddings"]))
  hypothesis_targets = np.zeros(batch["targets"].shape, np.int32)
  for row, length in enumerate(np.minimum(lengths, hypothesis_targets.shape[1])):
    hypothesis_targets[row, :length] = tokens[row, :length]
  hypothesis_paddings = (hypothesis_targets == 0).astype(np.float32)
  reference_nll = np.asarray(model.per_example_nll(batch))
  hypothesis_nll = np.asarray(model.per_example_nll({**batch, "targets": jnp.asarray(hypothesis_targets),
                                                     "target_paddings": jnp.asarray(hypothesis_paddings)}))
  real = np.asarray(host["audio_paddings"]).min(axis=1) < 1
  labels = (1 - np.asarray(host["target_paddings"])).sum(axis=1)
  texts = [t.decode() if isinstance(t, bytes) else str(t) for t in host["text"]]
  hypotheses = [vocabulary.decode(tokens[i, :lengths[i]].tolist()) for i in range(len(texts))]
  for i in np.nonzero(real)[0]:
    print(f"reference {reference_nll[i]:7.2f} ({reference_nll[i] / max(labels[i], 1):.2f}/label)  hypothesis "
          f"{hypothesis_nll[i]:7.2f}  {texts[i]!r} -> {hypotheses[i]!r}")
  for name, value in summarize([texts[i] for i in np.nonzero(real)[0]], [hypotheses[i] for i in np.nonzero(real)[0]],
                               reference_nll[real], hypothesis_nll[real], labels[real]).items():
    print(f"{name:56s} {value:g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
