"""Passkey retrieval accuracy per (length, depth bucket), for any model behind a callable.

`continue_fn(prompts [batch, length], num_tokens) -> tokens [batch, num_tokens]` greedily
continues prompts that all have exactly `length` tokens. Exact match: every digit token of
" N" right; token accuracy: the fraction of digit tokens right (the paper's Table 3 metric).
Lengths above `max_context` are reported with status "exceeds_context", never skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from memlm_jax.data.passkey import DEPTH_BUCKETS, PasskeyBuilder, depth_bucket

ContinueFn = Callable[[np.ndarray, int], np.ndarray]


def bucket_depths(examples_per_bucket: int) -> list[float]:
  """Depths evenly spread inside each third: start, middle, end."""
  return [(bucket + (i + 0.5) / examples_per_bucket) / 3
          for bucket in range(len(DEPTH_BUCKETS)) for i in range(examples_per_bucket)]


def score_answer(builder: PasskeyBuilder, key: int, generated: np.ndarray) -> dict:
  """Compares generated tokens [>= answer length] with the tokens of " key"."""
  answer = builder.answer(key)
  got = np.asarray(generated[:len(answer)])
  digits = np.array([builder.vocabulary.decode([int(t)]).strip() != "" for t in answer])
  right = got == answer
  return {"predicted": builder.vocabulary.decode([int(t) for t in got]).strip(),
          "exact_match": bool(right[digits].all()), "token_accuracy": float(right[digits].mean())}


def check_settings(builder: PasskeyBuilder, lengths: Sequence[int], examples_per_bucket: int,
                   max_context: int | None) -> None:
  """One ValueError naming the first bad setting, before any model work."""
  builder.check_lengths(lengths)
  if isinstance(examples_per_bucket, bool) or not isinstance(examples_per_bucket, int) or examples_per_bucket <= 0:
    raise ValueError(f"passkey examples_per_bucket must be a positive integer, got {examples_per_bucket!r}.")
  if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                  or max_context <= 0):
    raise ValueError(f"passkey max_context must be None or a positive integer, got {max_context!r}.")


def evaluate_passkey(continue_fn: ContinueFn, builder: PasskeyBuilder, lengths: Sequence[int], *,
                     examples_per_bucket: int = 2, seed: int = 0, max_context: int | None = None,
                     context_note: str = "", progress: Callable[[str], None] | None = None,
                     on_length: Callable[[dict], None] | None = None) -> dict:
  """Runs every (length, depth) example; returns {"summary": [...], "results": [...]}.

  Keys are drawn from `seed` (use a seed no training split uses); all examples of one
  length go to `continue_fn` as one batch. Every setting is checked before the first
  length runs; `on_length(partial)` gets the results so far after each length.
  """
  check_settings(builder, lengths, examples_per_bucket, max_context)
  results, summary = [], []
  depths = bucket_depths(examples_per_bucket)
  answer_tokens = max(len(builder.answer(builder.key_min)), len(builder.answer(builder.key_max)))
  for length in lengths:
    if max_context is not None and length > max_context:
      reason = context_note or f"the model holds at most {max_context} tokens"
      summary += [{"length": length, "bucket": b, "examples": 0, "status": "exceeds_context", "reason": reason}
                  for b in DEPTH_BUCKETS]
      if on_length is not None:
        on_length({"summary": summary, "results": results})
      continue
    examples = [builder.sample(length, seed, index, depth=d) for index, d in enumerate(depths)]
    generated = np.asarray(continue_fn(np.stack([e.inputs for e in examples]), answer_tokens))
    rows = [{"length": length, "depth": e.depth, "bucket": depth_bucket(e.depth), "key": e.key,
             **score_answer(builder, e.key, generated[i])} for i, e in enumerate(examples)]
    results += rows
    for bucket in DEPTH_BUCKETS:
      mine = [r for r in rows if r["bucket"] == bucket]
      summary.append({"length": length, "bucket": bucket, "examples": len(mine), "status": "ok",
                      "exact_match": float(np.mean([r["exact_match"] for r in mine])),
                      "token_accuracy": float(np.mean([r["token_accuracy"] for r in mine]))})
    if progress is not None:
      right = sum(r["exact_match"] for r in rows)
      progress(f"passkey length {length}: {right}/{len(rows)} exact")
    if on_length is not None:
      on_length({"summary": summary, "results": results})
  return {"summary": summary, "results": results}
