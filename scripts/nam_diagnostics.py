r"""What a trained Deferred-NAM biaser does on one batch of a split: how much it moves the encoder, where
its phrase and wordpiece attention go at the frames that emit phrase wordpieces, and whether its
filter ranks a spoken phrase first (experiments/deferred_nam/README.md, the diagnosis).

  python scripts/nam_diagnostics.py --config=experiments/deferred_nam/d3.gin --model_dir=runs/dnam/d3 \
      --split=test_n10 [--batch_size=16] [--binding='NamBiaser.phrase_attention_frames = "emitting"']

Reads the newest checkpoint of --model_dir (all its parameters) and the first batch of --split, in
order, with the manifests' own lists; prints one line per measure.
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

from memlm_jax.models import nam  # noqa: E402
from memlm_jax.models.transducer import Transducer  # noqa: E402
from scripts.transducer_probe import restored_transducer_and_batch  # noqa: E402

ARRAYS = ("audio", "audio_paddings", "targets", "target_paddings", "bias_tokens", "bias_paddings")


def diagnose(model: Transducer, batch: dict[str, jnp.ndarray]) -> dict[str, float]:
  """The measures of the module docstring on one batch (arrays as the speech batches hold them)."""
  plain, paddings = model.encode(batch["audio"], batch["audio_paddings"])
  biased, _, _ = model.encode_biased(batch["audio"], batch["audio_paddings"], batch["bias_tokens"],
                                     batch["bias_paddings"])
  valid = (paddings <= 0)[..., None]
  moved = jnp.sqrt(jnp.sum(jnp.where(valid, biased - plain, 0) ** 2) / jnp.sum(jnp.where(valid, plain, 0) ** 2))
  model.encode(batch["audio"], batch["audio_paddings"], bias_tokens=batch["bias_tokens"],
               bias_paddings=batch["bias_paddings"])
  sown = model._pop_biasing_intermediates()
  selected = sown["selected_phrases"]
  top_k = selected.shape[1]
  tokens, phrase_paddings = nam._padded_to(batch["bias_tokens"], batch["bias_paddings"], top_k)
  pick = lambda a: jnp.take_along_axis(a, selected[:, :, None], axis=1)  # noqa: E731
  emit = model.forced_alignment(biased, paddings, batch["targets"], batch["target_paddings"])
  label_phrase, label_position = nam.label_phrases(batch["targets"], batch["target_paddings"], pick(tokens),
                                                   pick(phrase_paddings) <= 0)
  phrase_target, wordpieces = nam.frame_targets(emit, label_phrase, label_position, paddings, top_k,
                                                tokens.shape[-1])
  phrase_frames = jnp.sum(wordpieces, axis=(-2, -1)) > 0
  silent = (paddings <= 0) & ~phrase_frames
  phrase_p = jnp.exp(sown["phrase_log_attention"][0])
  wordpiece_p = jnp.exp(sown["wordpiece_log_attention"][0])
  target = nam.filter_targets(tokens, phrase_paddings, batch["targets"], batch["target_paddings"])
  spoken = jnp.sum(target[:, :-1], axis=-1) > 0
  first = jnp.argmax(sown["filter_logits"], axis=-1)
  first_spoken = jnp.take_along_axis(target, first[:, None], axis=1)[:, 0] > 0
  count = jnp.maximum(jnp.sum(phrase_frames), 1)
  labels = jnp.maximum(jnp.sum(batch["target_paddings"] <= 0), 1)
  nll_plain = jnp.sum(model.nll_of_encoding(plain, paddings, batch)) / labels
  nll_biased = jnp.sum(model.nll_of_encoding(biased, paddings, batch)) / labels
  return {
      "reference NLL per label, unbiased encoding": float(nll_plain),
      "reference NLL per label, biased encoding": float(nll_biased),
      "relative change of the encoding |Delta| / |x|": float(moved),
      "frames emitting phrase wordpieces": float(jnp.sum(phrase_frames)),
      "phrase attention on the spoken phrase there": float(jnp.sum(jnp.sum(phrase_p * phrase_target, -1) *
                                                                   phrase_frames) / count),
      "wordpiece attention on the emitted wordpieces there": float(jnp.sum(
          jnp.sum(wordpiece_p * (wordpieces > 0), axis=(-2, -1)) * phrase_frames) / count),
      "no-bias attention at the other frames": float(jnp.sum(phrase_p[..., -1] * silent) /
                                                    jnp.maximum(jnp.sum(silent), 1)),
      "utterances with a spoken phrase in the list": float(jnp.sum(spoken)),
      "filter ranks a spoken phrase first": float(jnp.sum(first_spoken & spoken) / jnp.maximum(jnp.sum(spoken), 1)),
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="the biaser's gin file, e.g. experiments/deferred_nam/d3.gin")
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--split", default="test_n10")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--binding", action="append", default=[])
  args = parser.parse_args(argv)
  try:
    model, batch, _ = restored_transducer_and_batch(args.config, args.model_dir, args.split, args.batch_size,
                                                    args.binding)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  batch = {k: jnp.asarray(batch[k]) for k in ARRAYS}
  for name, value in diagnose(model, batch).items():
    print(f"{name:52s} {value:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
