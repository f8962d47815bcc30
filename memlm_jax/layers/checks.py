"""Argument checks shared by layers and models."""

from __future__ import annotations


def check_positive_sizes(owner: str, **sizes: int) -> None:
  """Raises ValueError naming the first size that is not a positive int (a bool is not one)."""
  for name, value in sizes.items():
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}.")
