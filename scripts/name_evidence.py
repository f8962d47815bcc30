r"""Where a trained transducer's evidence for a spoken name is: the frames its Viterbi alignment emits the
labels at, and whether its own likelihood, RNN-T and (with a CTC head) CTC, puts the spoken name first
among the phrases of the utterance's bias list (the transcript with the name replaced by each phrase);
also the RNN-T score less ilm_weight x the internal LM's (`Transducer.internal_lm_nll`, ILME), which
takes the prediction network's prior over the wordpieces out of it.

  python scripts/name_evidence.py --config=tiny/transducer_contacts.gin --model_dir=runs/dnam_ctc/base \
      --manifest=runs/contacts_speech/test_n10.jsonl --split=test_n10 [--binding='Transducer.ctc_weight = 0.3']

A rank no better than chance (mean rank (candidates - 1) / 2) says the score does not tell the names
apart; a biaser that only sharpens that score has nothing to sharpen. The manifest gives each
utterance's text, "entities" (the first is the one replaced) and "bias" list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memlm_jax.data import speech, speech_features  # noqa: E402
from memlm_jax.losses import ctc_spotting  # noqa: E402
from memlm_jax.losses import ctc  # noqa: E402
from scripts.transducer_probe import restored_transducer_and_batch  # noqa: E402


def candidate_transcripts(text: str, entities: Sequence[str], bias: Sequence[str],
                          max_candidates: int) -> list[str]:
  """The transcript, then the transcript with its first entity replaced by each other phrase of the list
  (not one of its entities), up to max_candidates transcripts in all."""
  spoken = entities[0]
  if f" {spoken} " not in f" {text} ":
    raise ValueError(f"entity {spoken!r} is not in the transcript {text!r}.")
  others = [p for p in bias if p not in entities][:max_candidates - 1]
  padded = f" {text} "
  return [text] + [padded.replace(f" {spoken} ", f" {p} ", 1).strip() for p in others]


def rank_of_reference(nll: np.ndarray) -> int:
  """How many candidates score strictly better (lower NLL) than the first, the reference."""
  return int(np.sum(nll[1:] < nll[0]))


def phrase_gains_per_token(gains_of, encoder_out, encoder_paddings, phrases: Sequence[str], vocabulary) -> np.ndarray:
  """[phrases] CTC spotting gain per token (losses/ctc_spotting.py) of each phrase in one utterance;
  gains_of(encoder_out [1, frames, dim], paddings [1, frames], tokens, paddings [1, phrases, len])."""
  ids = [list(vocabulary.encode(p)) for p in phrases]
  width = max(map(len, ids))
  tokens = np.zeros((1, len(ids), width), np.int32)
  paddings = np.ones((1, len(ids), width), np.float32)
  for b, row in enumerate(ids):
    tokens[0, b, :len(row)], paddings[0, b, :len(row)] = row, 0.0
  gains = np.asarray(gains_of(encoder_out, encoder_paddings, tokens, paddings))[0]
  return gains / np.array([len(row) for row in ids])


def alignment_lines(pieces: Sequence[Sequence[str]], emit_frames: np.ndarray, frames: np.ndarray) -> list[str]:
  """One line per utterance: its valid frames, then each label as piece@frame."""
  return [f"{int(frames[i])} frames: " + " ".join(f"{p}@{int(f)}" for p, f in zip(row, emit_frames[i]))
          for i, row in enumerate(pieces)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--manifest", required=True, help="the split's JSONL manifest (text, entities, bias)")
  parser.add_argument("--split", default="test_n10")
  parser.add_argument("--utterances", type=int, default=100, help="how many of the split's first utterances")
  parser.add_argument("--candidates", type=int, default=10)
  parser.add_argument("--show_alignments", type=int, default=6)
  parser.add_argument("--ilm_weights", default="1", help="comma-separated weights of the internal-LM NLL")
  parser.add_argument("--binding", action="append", default=[])
  args = parser.parse_args(argv)
  ilm_weights = [float(w) for w in args.ilm_weights.split(",") if w]
  manifest = {}
  with open(args.manifest) as f:
    for line in f:
      row = json.loads(line)
      manifest[row["id"]] = row
  model, _, vocabulary = restored_transducer_and_batch(args.config, args.model_dir, args.split, 1, args.binding)
  max_audio, max_target = gin.query_parameter("%MAX_AUDIO_SAMPLES"), gin.query_parameter("%MAX_TARGET_LENGTH")
  encode = jax.jit(lambda audio, paddings: model.encode(audio, paddings))
  rnnt_nll = jax.jit(lambda out, pad, t, tp: model.nll_of_encoding(out, pad, {"targets": t, "target_paddings": tp}))
  ranks = {"RNN-T": [], **{f"RNN-T - {w:g} x ILM": [] for w in ilm_weights}}
  spotting_gains = {"spoken": [], "others": []}
  if model.ctc_head is not None:
    ranks["CTC"] = []
    ranks["CTC spotting"] = []
    gains_of = jax.jit(lambda out, pad, t, tp: ctc_spotting.phrase_gains(model.ctc_log_probs(out), pad, t, tp))
  internal_lm_nll = jax.jit(model.internal_lm_nll)
  seen, shown = 0, 0
  for batch in speech_features.speech_batches(speech.manifest_task(), args.split, 20, max_audio, max_target,
                                              shuffle=False, include_text=True):
    out, pad = encode(batch["audio"], batch["audio_paddings"])
    if shown < args.show_alignments:
      emit = np.asarray(model.forced_alignment(out, pad, batch["targets"], batch["target_paddings"]))
      take = min(args.show_alignments - shown, len(emit))
      pieces = [[vocabulary.tokenizer.id_to_piece(int(t))
                 for t, p in zip(batch["targets"][i], batch["target_paddings"][i]) if p <= 0] for i in range(take)]
      print("\n".join(alignment_lines(pieces, emit, np.sum(np.asarray(pad) <= 0, axis=1))))
      shown += take
    for i, uid in enumerate(batch["id"]):
      row = manifest.get(uid.decode() if isinstance(uid, bytes) else str(uid))
      if seen >= args.utterances or batch["audio_paddings"][i].min() >= 1 or not row or not row.get("entities"):
        continue
      seen += 1
      texts = candidate_transcripts(row["text"], row["entities"], row["bias"], args.candidates)
      tokens = np.zeros((len(texts), max_target), np.int32)
      paddings = np.ones((len(texts), max_target), np.float32)
      for j, text in enumerate(texts):
        ids = list(vocabulary.encode(text))[:max_target]
        tokens[j, :len(ids)], paddings[j, :len(ids)] = ids, 0.0
      out_i, pad_i = jnp.repeat(out[i:i + 1], len(texts), 0), jnp.repeat(pad[i:i + 1], len(texts), 0)
      nll = np.asarray(rnnt_nll(out_i, pad_i, tokens, paddings))
      ranks["RNN-T"].append(rank_of_reference(nll))
      ilm = np.asarray(internal_lm_nll(tokens, paddings))
      for w in ilm_weights:
        ranks[f"RNN-T - {w:g} x ILM"].append(rank_of_reference(nll - w * ilm))
      if "CTC" in ranks:
        nll = ctc.ctc_loss(model.ctc_head(out_i), pad_i, tokens, paddings)
        ranks["CTC"].append(rank_of_reference(np.asarray(nll)))
        phrases = [row["entities"][0]] + [p for p in row["bias"] if p not in row["entities"]][:args.candidates - 1]
        per_token = phrase_gains_per_token(gains_of, out[i:i + 1], pad[i:i + 1], phrases, vocabulary)
        ranks["CTC spotting"].append(rank_of_reference(-per_token))
        spotting_gains["spoken"].append(per_token[0])
        spotting_gains["others"] += list(per_token[1:])
  for name, values in ranks.items():
    values = np.array(values)
    print(f"{name}: the spoken name first in {np.mean(values == 0):.2f} of {len(values)} lists "
          f"(chance {1 / args.candidates:.2f}), mean rank {values.mean():.2f} (chance {(args.candidates - 1) / 2:.1f})")
  if spotting_gains["spoken"]:
    for name, values in spotting_gains.items():
      print(f"CTC spotting gain per token, {name} phrases: quartiles "
            + " / ".join(f"{q:.2f}" for q in np.percentile(values, [25, 50, 75])))
  return 0


if __name__ == "__main__":
  sys.exit(main())
