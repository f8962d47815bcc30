"""Token-weighted loss / perplexity / accuracy from summed statistics, and per-document (book) perplexity."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def lm_metrics(sums: Mapping[str, float]) -> dict[str, float]:
  """{'loss_sum','weight_sum','correct_sum'} -> loss (nats/token), perplexity, accuracy, tokens."""
  weight = float(sums["weight_sum"])
  if weight <= 0:
    raise ValueError(f"lm_metrics: no weighted tokens (weight_sum={weight}); is the eval split empty?")
  loss = float(sums["loss_sum"]) / weight
  metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": weight}
  if "correct_sum" in sums:
    metrics["accuracy"] = float(sums["correct_sum"]) / weight
  return metrics


def document_perplexity(nll: float, tokens: float, words: int) -> dict[str, float | None]:
  """Token- and word-level perplexity of one text (a book, or all books together).

  Token-level: exp(nll / tokens). Word-level, PG19's official measure (Rae et al. 2020), which does
  not depend on the tokenizer: exp(nll / words), the same total NLL over the number of
  whitespace-separated words of the raw text; None when the word count is unknown (words < 0).
  """
  if tokens <= 0:
    raise ValueError(f"document_perplexity: no scored tokens (tokens={tokens}).")
  word_perplexity = math.exp(min(nll / words, 700.0)) if words > 0 else None
  return {"nll": float(nll), "tokens": float(tokens), "words": int(words), "loss": float(nll) / tokens,
          "token_perplexity": math.exp(min(nll / tokens, 700.0)), "word_perplexity": word_perplexity}


def long_document_metrics(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-document and overall perplexities of documents {'title', 'nll', 'tokens', 'words'}.

  Overall is corpus-level (total NLL over total tokens or words), not a mean of per-document
  perplexities, as PG19 reports it; its word-level value is None if any document's word count is
  unknown.
  """
  if not documents:
    raise ValueError("long_document_metrics: no documents were read (is the split empty?).")
  per_document = [{"title": d["title"], **document_perplexity(d["nll"], d["tokens"], d["words"])}
                  for d in documents]
  words = -1 if any(d["words"] < 0 for d in documents) else sum(d["words"] for d in documents)
  overall = document_perplexity(sum(d["nll"] for d in documents), sum(d["tokens"] for d in documents), words)
  return {"documents": per_document, "overall": {**overall, "num_documents": len(documents)}}
