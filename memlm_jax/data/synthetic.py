"""Small synthetic text corpora for demos and tests (no downloads).

Each line is a short 'document' of templated sentences whose structure a tiny LM
can learn within a few hundred steps: counting runs, repeated key-value facts and
word patterns.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

_WORDS = ("red", "blue", "green", "cat", "dog", "bird", "runs", "sits", "sings", "big", "small", "old")


def make_document(rng: np.random.Generator) -> str:
  """One line of text built from a random template."""
  kind = rng.integers(3)
  if kind == 0:
    start = int(rng.integers(0, 50))
    return "count: " + " ".join(str(i) for i in range(start, start + int(rng.integers(5, 15)))) + "."
  if kind == 1:
    key, value = rng.choice(_WORDS[:6]), int(rng.integers(100, 1000))
    return f"the {key} is {value}. remember the {key} is {value}. the {key} is {value}."
  words = rng.choice(_WORDS, size=int(rng.integers(3, 8)))
  return "the " + " ".join(words) + " and the " + " ".join(words) + "."


def write_corpus(output_dir: str, *, train_docs: int = 2000, validation_docs: int = 200, seed: int = 0) -> dict:
  """Writes train.txt and validation.txt (one document per line); returns {split: path}."""
  os.makedirs(output_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = {}
  for split, count in (("train", train_docs), ("validation", validation_docs)):
    path = os.path.join(output_dir, f"{split}.txt")
    with open(path, "w") as f:
      f.writelines(make_document(rng) + "\n" for _ in range(count))
    paths[split] = path
  return paths


def main(argv):
  del argv
  print(write_corpus(flags.FLAGS.output_dir, seed=flags.FLAGS.seed))


if __name__ == "__main__":
  # Defined here, not at import: this module is a library too, and absl flags are global.
  flags.DEFINE_string("output_dir", None, "Directory for train.txt and validation.txt.", required=True)
  flags.DEFINE_integer("seed", 0, "Random seed.")
  app.run(main)
