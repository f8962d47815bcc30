"""scripts/bench_nam.py: its bucket rule, its deferred-vs-full check, and a tiny run's tables."""

import dataclasses

import numpy as np
import pytest

from scripts import bench_nam

TINY = dataclasses.replace(bench_nam.QUICK_CONFIG, num_phrases=(5, 40), top_k=8, attention_top_ks=(4,), frames=6,
                           repeats=1)


def test_bucket_rule():
  assert [bench_nam.bucket_for(n) for n in (1, 2, 3, 4, 5, 7, 1000, 5000, 20000)] == [
      1, 2, 3, 4, 6, 8, 1024, 6144, 24576]
  assert bench_nam.bucket_for(300, (256, 512, 1024)) == 512
  with pytest.raises(ValueError, match="exceed the largest bucket 512"):
    bench_nam.BenchConfig(num_phrases=(1000,), buckets=(256, 512))


def test_deferred_and_full_give_the_same_context_when_k_covers_the_list():
  config = TINY
  rng = np.random.default_rng(3)
  tokens, paddings = bench_nam.random_phrase_arrays(rng, 2, 5, 6, config.vocab, config.min_phrase_len,
                                                    config.phrase_len)
  assert (paddings[:, 5:] == 1).all() and (tokens[:, 5:] == 0).all() and (tokens[:, :5, 0] > 0).all()
  x = rng.normal(size=(2, config.frames, config.model_dim)).astype(np.float32)
  frame_paddings = np.zeros((2, config.frames), np.float32)
  deferred, full = (bench_nam._biaser(config, mode, config.top_k)(x, frame_paddings, tokens, paddings)
                    for mode in (True, False))
  # K = 8 >= 5 phrases: both modes select every slot of the (padded) list, each in its own score order.
  def by_phrase(context):  # the K slots sorted by phrase index, then the no-bias entry
    order = np.argsort(np.asarray(context.selected), axis=1)
    index = np.concatenate([order, np.full((2, 1), config.top_k)], axis=1)
    return [np.take_along_axis(np.asarray(leaf, np.float32), index.reshape(index.shape + (1,) * (leaf.ndim - 2)),
                               axis=1) for leaf in (context.wordpieces, context.wordpiece_valid, context.phrases,
                                                    context.phrase_valid)]

  for context in (deferred, full):
    assert (np.sort(np.asarray(context.selected), axis=1) == np.arange(config.top_k)).all()
    assert np.asarray(context.phrase_valid)[:, :-1].sum(1).tolist() == [5, 5]
  for a, b in zip(by_phrase(deferred), by_phrase(full)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert bench_nam.context_difference(deferred, full) == (True, pytest.approx(0.0, abs=1e-5))
  # The checker is not vacuous: a changed encoding or selection is seen.
  changed = deferred.replace(wordpieces=deferred.wordpieces.at[0, 0, 0, 0].add(1.0))
  assert bench_nam.context_difference(changed, full)[1] == pytest.approx(1.0, abs=1e-5)
  swapped = deferred.replace(selected=deferred.selected.at[0, 0].set(5))
  assert bench_nam.context_difference(swapped, full) == (False, float("inf"))


def test_tiny_run_reports_both_tables():
  document, report = bench_nam.run(TINY, log=lambda _: None)
  assert document["check"] == "PASS" and document["check_record"]["same_selection"]
  assert document["check_record"]["max_abs_diff"] <= TINY.tolerance
  assert [(r["phrases"], r["bucket"]) for r in document["delay"]] == [(5, 6), (40, 48)]
  for r in document["delay"]:
    assert r["speedup"] == pytest.approx(r["full_ms"] / r["deferred_ms"])
    assert r["deferred_memory"]["total_bytes"] > 0 and r["full_memory"]["total_bytes"] > 0
  assert document["delay"][1]["full_mib"] > document["delay"][1]["deferred_mib"]  # 48 phrases encoded vs 8
  assert [r["top_k"] for r in document["per_frame"]] == [4]
  assert document["per_frame"][0]["frames"] == TINY.frames
  lines = report.splitlines()
  assert any(line.startswith("| N | bucket | K | deferred ms | full ms |") for line in lines)
  assert any(line.startswith("| 5 | 6 | 8 |") for line in lines) and any(line.startswith("| 40 | 48 | 8 |")
                                                                          for line in lines)
  assert any(line.startswith("| 4 | 6 |") for line in lines)
  assert "deferred vs full check" in report and "PASS" in report
