"""Token-weighted loss / perplexity / accuracy from summed statistics."""

from __future__ import annotations

import math
from typing import Mapping


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
