#!/usr/bin/env bash
# KMP biasing on the espeak-ng corpus of rare names: WER, B-WER and U-WER without biasing and with
# KMP biasing (shallow fusion over a sweep of the bonus delta, on-the-fly rescoring at one delta),
# on the utterances' own bias lists and on anti-biasing lists; then the table.
# Needs the trained transducer of experiments/transducer_synthetic/run.sh.
# Usage: experiments/kmp_synthetic/run.sh [DATA_DIR] (default runs/synth_speech, model in runs/asr)
# Environment: MODEL_DIR, SPLITS (default "test"; e.g. "validation test"), BEAM (4),
#   DELTAS ("0.5 1.0 2.0 4.0"), RESCORE_DELTA (2.0), PY.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${1:-runs/synth_speech}
MODEL_DIR=${MODEL_DIR:-runs/asr}
SPLITS=${SPLITS:-test}
BEAM=${BEAM:-4}
DELTAS=${DELTAS:-"0.1 0.25 0.5 1.0 2.0"}
RESCORE_DELTA=${RESCORE_DELTA:-0.5}
if [ ! -d "$MODEL_DIR/checkpoints" ] || [ ! -f "$DATA/spm.model" ]; then
  echo "no trained model in $MODEL_DIR or no corpus in $DATA: run experiments/transducer_synthetic/run.sh first." >&2
  exit 1
fi
GIN=(--gin_file=runs/asr_eval.gin --gin_file=tiny/transducer_synthetic.gin --gin.MODEL_DIR="'$MODEL_DIR'"
     --gin.TRAIN_MANIFEST="'$DATA/train.jsonl'" --gin.DEV_MANIFEST="'$DATA/dev.jsonl'"
     --gin.TEST_MANIFEST="'$DATA/test.jsonl'" --gin.SPM_MODEL="'$DATA/spm.model'"
     --gin.asr_eval.beam_size="$BEAM")
for SPLIT in $SPLITS; do
  EVAL=("${GIN[@]}" --gin.ASR_EVAL_SPLIT="'$SPLIT'")
  $PY -m memlm_jax.eval "${EVAL[@]}"  # no biasing
  for LISTS in utterance anti; do
    for DELTA in $DELTAS; do
      $PY -m memlm_jax.eval "${EVAL[@]}" --gin.asr_eval.biasing_delta="$DELTA" --gin.asr_eval.bias_lists="'$LISTS'"
    done
    $PY -m memlm_jax.eval "${EVAL[@]}" --gin.asr_eval.biasing_delta="$RESCORE_DELTA" \
        --gin.asr_eval.biasing_mode="'rescore'" --gin.asr_eval.bias_lists="'$LISTS'"
  done
  $PY scripts/kmp_table.py "$MODEL_DIR/eval" --split="$SPLIT" --beam_size="$BEAM" | tee "$MODEL_DIR/eval/kmp_table_$SPLIT.md"
done
