"""Input pipelines: seqio tasks, feature conversion, per-host iterators."""
