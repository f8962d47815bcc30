#!/usr/bin/env bash
# Tiny Conformer transducer on the espeak-ng corpus, on a CPU: corpus, vocabulary, training
# (configs/tiny/transducer_synthetic.gin: 2000 steps), then WER on the held-out test split.
# Usage: experiments/transducer_synthetic/run.sh [OUT_DIR] (default runs/synth_speech, model in runs/asr)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${1:-runs/synth_speech}
MODEL_DIR=${MODEL_DIR:-runs/asr}
[ -f "$DATA/train.jsonl" ] || $PY scripts/make_synthetic_speech.py --output_dir="$DATA" --num_utterances=400
[ -f "$DATA/spm.model" ] || $PY scripts/train_spm.py --input="$DATA/train.jsonl" --model_prefix="$DATA/spm" --vocab_size=128
GIN=(--gin_file=tiny/transducer_synthetic.gin --gin.MODEL_DIR="'$MODEL_DIR'"
     --gin.TRAIN_MANIFEST="'$DATA/train.jsonl'" --gin.DEV_MANIFEST="'$DATA/dev.jsonl'"
     --gin.TEST_MANIFEST="'$DATA/test.jsonl'" --gin.SPM_MODEL="'$DATA/spm.model'")
$PY -m memlm_jax.train --gin_file=runs/train.gin "${GIN[@]}"
$PY -m memlm_jax.eval --gin_file=runs/asr_eval.gin "${GIN[@]}"
$PY -m memlm_jax.eval --gin_file=runs/asr_eval.gin "${GIN[@]}" --gin.asr_eval.beam_size=4
