"""The KMP biasing table (experiments/kmp_synthetic): WER, B-WER and U-WER without and with KMP
biasing, on the utterances' own bias lists and on the anti-biasing lists, from asr_eval's JSON
(MODEL_DIR/eval/asr_*.json, launch/asr_lib.py).

One row per biasing setting (no biasing, then shallow / rescore at each delta); the 'anti'
columns come from the runs with KmpBiasing.bias_lists='anti'. Values are %. The unbiased run
fills both column groups: without biasing the lists change nothing, and B-WER / U-WER are
always measured against the utterance's own bias list.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from memlm_jax.evaluation.passkey_report import markdown
from memlm_jax.runtime import files

# (mode, top_k, delta, backend); mode None = no biasing
Setting = tuple[Optional[str], Optional[int], float, Optional[str]]
METRICS = ("wer", "b_wer", "u_wer")


def load_results(eval_dir: str, split: str = "test", beam_size: int = 4, step: int | None = None) -> list[dict]:
  """The asr_eval payloads in eval_dir for split and beam_size at `step` (None: the newest step)."""
  results = []
  for path in sorted(files.glob(os.path.join(eval_dir, "asr_*.json"))):
    payload = json.loads(files.read_text(path))
    if payload.get("split") == split and payload.get("beam_size") == beam_size:
      results.append(payload)
  if not results:
    raise ValueError(f"no asr_eval results for split {split!r} and beam {beam_size} in {eval_dir!r}.")
  step = max(r["step"] for r in results) if step is None else step
  chosen = [r for r in results if r["step"] == step]
  if not chosen:
    raise ValueError(f"no asr_eval results at step {step} in {eval_dir!r} (have steps "
                     f"{sorted({r['step'] for r in results})}).")
  return chosen


def setting_of(payload: dict) -> Setting:
  """(mode, top_k, delta, backend) of a payload; (None, None, 0.0, None) without biasing."""
  delta = float(payload.get("biasing_delta") or 0.0)
  if delta == 0:
    return (None, None, 0.0, None)
  return (payload["biasing_mode"], payload.get("biasing_top_k"), delta, payload.get("biasing_backend", "kmp"))


def setting_label(setting: Setting) -> str:
  mode, top_k, delta, backend = setting
  if mode is None:
    return "no biasing"
  top = "" if top_k is None else f" top-{top_k}"
  return f"KMP {mode}{top}, delta={delta:g}" + (" (Aho-Corasick)" if backend == "aho_corasick" else "")


def _sort_key(setting: Setting) -> tuple:
  mode, top_k, delta, backend = setting
  return (mode is not None, mode != "shallow", top_k or 0, delta, backend not in (None, "kmp"))


def _percent(payload: dict | None, metric: str) -> str:
  if payload is None or metric not in payload:
    return "-"
  return f"{100 * payload[metric]:.2f}"


def table_rows(results: Sequence[dict]) -> list[list[str]]:
  """[setting, WER, B-WER, U-WER, anti WER, anti B-WER, anti U-WER] per setting, unbiased first."""
  own: dict[Setting, dict] = {}
  anti: dict[Setting, dict] = {}
  for payload in results:
    setting = setting_of(payload)
    if setting[0] is None:
      own[setting] = anti[setting] = payload
    else:
      (anti if payload.get("bias_lists") == "anti" else own)[setting] = payload
  rows = []
  for setting in sorted(set(own) | set(anti), key=_sort_key):
    rows.append([setting_label(setting)] + [_percent(own.get(setting), m) for m in METRICS]
                + [_percent(anti.get(setting), m) for m in METRICS])
  return rows


HEADER = ["Setting", "WER", "B-WER", "U-WER", "anti WER", "anti B-WER", "anti U-WER"]


def format_table(results: Sequence[dict]) -> str:
  """Title line (task, split, step, beam, utterances) and the markdown table of `results`."""
  first = results[0]
  title = (f"{first.get('task')} {first['split']} split, step {first['step']}, beam {first['beam_size']}, "
           f"{first['utterances']} utterances (values in %)")
  return title + "\n\n" + markdown(HEADER, table_rows(results))
