r"""ASR evaluation launcher: restore a transducer, decode a split, score WER.

  python -m memlm_jax.eval --gin_file=runs/asr_eval.gin --gin_file=<model+data>.gin \
      --gin.MODEL_DIR="'runs/asr'" [--gin.asr_eval.beam_size=8] [--gin.asr_eval.biasing_delta=2.0]

Decodes every utterance of `split` (greedy when beam_size is 1, else the fixed-shape beam
search) and writes MODEL_DIR/eval/asr_<split>_beam<K><method><biasing>_step<N>.json (WER with its
substitutions, deletions and insertions; B-WER / U-WER when the task carries per-utterance bias
lists) and the same name .jsonl (id, reference, hypothesis per utterance); K = 1 is greedy.
beam_method picks the beam search (memlm_jax/decoding/transducer_beam.py): 'tsd' (default,
<method> = '') or 'one_pass' (<method> = '_onepass').

KMP phrase biasing (memlm_jax/decoding/kmp.py) is on when biasing_delta > 0: the beam search
(beam 1 included, then not greedy) gets a `kmp_fusion` built from per-utterance phrase lists,
tokenized with the model's vocabulary. biasing_mode 'shallow' adds the bonus before pruning (to
every label, or to each hypothesis's biasing_top_k labels), 'rescore' adds it to the surviving
expansions only. bias_lists picks the phrases:
  'utterance': each utterance's own "bias" list from the task;
  'anti': anti-biasing, a distractor list of the same size drawn deterministically (per
    utterance id and anti_bias_seed) from the other utterances' phrases that do not occur in
    this utterance's transcript (the split is read twice: once for the phrases, once to decode);
    the .jsonl rows then also hold the list used, "biasing_phrases".
<biasing> in the file name is '' when off, else e.g. '_kmp0.5shallow', '_kmp2rescore',
'_kmp1shallow_top8', with '_anti' appended for anti lists. B-WER / U-WER are always measured
against the utterance's own bias list: with 'anti' no boosted phrase is in the transcript, so
the numbers to read are WER and U-WER against the unbiased run (false alarms), and B-WER shows
what wrong boosting does to the names that are spoken.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import zlib
from typing import Any, Callable, Iterable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from absl import logging
from flax import nnx

from memlm_jax.data import speech
from memlm_jax.decoding.kmp import PhraseTable, build_phrase_table, kmp_fusion
from memlm_jax.decoding.transducer_beam import BEAM_METHODS, beam_search, greedy_decode
from memlm_jax.evaluation import wer
from memlm_jax.launch.eval_lib import restore_for_inference, write_json
from memlm_jax.runtime import partitioning
from memlm_jax.runtime.trainer import Trainer

BIASING_MODES = ("shallow", "rescore")
BIAS_LISTS = ("utterance", "anti")


def _check_beam_method(method: str) -> None:
  if method not in BEAM_METHODS:
    raise ValueError(f"asr_eval.beam_method must be one of {BEAM_METHODS}, got {method!r}.")


def _method_name(method: str) -> str:
  """File-name part of the beam search method: '' for the default 'tsd', else e.g. '_onepass'."""
  return "" if method == "tsd" else "_" + method.replace("_", "")


def make_decoder(graphdef: nnx.GraphDef, *, beam_size: int, max_symbols_per_frame: int, max_output_length: int,
                 method: str = "tsd") -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """jitted (params, audio [batch, samples], audio_paddings) -> (tokens [batch, max_output_length], lengths).
  beam_size 1 is greedy decoding; above, `beam_search` with `method` ('tsd' or 'one_pass')."""
  if beam_size < 1:
    raise ValueError(f"asr_eval.beam_size must be >= 1, got {beam_size}.")
  _check_beam_method(method)

  @jax.jit
  def decode(params, audio, audio_paddings):
    net = nnx.merge(graphdef, params)
    encoder_out, encoder_paddings = net.encode(audio, audio_paddings)
    fns = net.decoding_fns()
    if beam_size == 1:
      return greedy_decode(fns, encoder_out, encoder_paddings, max_symbols_per_frame=max_symbols_per_frame,
                           max_output_length=max_output_length)
    best = beam_search(fns, encoder_out, encoder_paddings, beam_size=beam_size,
                       max_symbols_per_frame=max_symbols_per_frame, max_output_length=max_output_length,
                       method=method)
    return best.tokens[:, 0], best.lengths[:, 0]

  return decode


@dataclasses.dataclass(frozen=True)
class KmpBiasing:
  """KMP biasing settings of one eval run (see the module docstring); bad values raise ValueError.

  delta: bonus per matched token, >= 0; 0 = no biasing (the other settings are then unused).
  mode: 'shallow' or 'rescore'.
  top_k: 'shallow' only: bonus only for each hypothesis's top_k labels (None = all labels).
  bias_lists: 'utterance' or 'anti'.
  max_phrases, max_phrase_length, chain_width: the fixed phrase-table shape
    [batch, max_phrases, max_phrase_length, chain_width] (one compilation for every batch);
    chain_width None = max_phrase_length, which fits any phrase.
  anti_seed: seed of the anti-biasing draw.
  """
  delta: float = 0.0
  mode: str = "shallow"
  top_k: int | None = None
  bias_lists: str = "utterance"
  max_phrases: int = 32
  max_phrase_length: int = 32
  chain_width: int | None = None
  anti_seed: int = 0

  def __post_init__(self):
    if not (np.isfinite(self.delta) and self.delta >= 0):
      raise ValueError(f"asr_eval.biasing_delta must be a finite bonus >= 0 (0 = no biasing), got {self.delta}.")
    if self.mode not in BIASING_MODES:
      raise ValueError(f"asr_eval.biasing_mode must be one of {BIASING_MODES}, got {self.mode!r}.")
    if self.bias_lists not in BIAS_LISTS:
      raise ValueError(f"asr_eval.bias_lists must be one of {BIAS_LISTS}, got {self.bias_lists!r}.")
    if self.top_k is not None and (self.mode != "shallow" or self.top_k < 1):
      raise ValueError(f"asr_eval.biasing_top_k={self.top_k} needs biasing_mode 'shallow' and a value >= 1 "
                       "(or None for all labels).")
    for name in ("max_phrases", "max_phrase_length", "chain_width"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"asr_eval.{name} must be >= 1, got {value}.")

  @property
  def enabled(self) -> bool:
    return self.delta > 0

  @property
  def name(self) -> str:
    """File-name part: '' when off, else e.g. '_kmp0.5shallow', '_kmp1shallow_top8', '_kmp2rescore_anti'."""
    if not self.enabled:
      return ""
    top = "" if self.top_k is None else f"_top{self.top_k}"
    anti = "_anti" if self.bias_lists == "anti" else ""
    return f"_kmp{self.delta:g}{self.mode}{top}{anti}"

  def summary(self) -> dict[str, Any]:
    """The settings the result JSON records (None when off)."""
    on = self.enabled
    return {"biasing_delta": float(self.delta), "biasing_mode": self.mode if on else None,
            "biasing_top_k": self.top_k if on else None, "bias_lists": self.bias_lists if on else None}

  def phrase_table(self, phrase_lists: Sequence[Sequence[str]], vocabulary: seqio.Vocabulary) -> PhraseTable:
    """Batched table [len(phrase_lists), max_phrases, max_phrase_length, chain_width] (fixed shape)."""
    return build_phrase_table(phrase_lists, vocabulary, max_phrases=self.max_phrases,
                              max_phrase_length=self.max_phrase_length,
                              chain_width=self.chain_width or self.max_phrase_length)


def make_biased_decoder(graphdef: nnx.GraphDef, *, beam_size: int, max_symbols_per_frame: int,
                        max_output_length: int, mode: str = "shallow", top_k: int | None = None,
                        method: str = "tsd"
                        ) -> Callable[[Any, jax.Array, jax.Array, PhraseTable, Any], tuple[jax.Array, jax.Array]]:
  """jitted (params, audio [batch, samples], audio_paddings [batch, samples], table, delta) ->
  (tokens [batch, max_output_length], lengths [batch]): the best hypothesis of the beam search
  (`method` 'tsd' or 'one_pass') with KMP fusion. table is a batched PhraseTable (row u biases
  utterance u); delta is a traced scalar, so any bonus (0 included: exactly the unbiased beam
  search) reuses one compilation.
  """
  if beam_size < 1:
    raise ValueError(f"asr_eval.beam_size must be >= 1, got {beam_size}.")
  if mode not in BIASING_MODES:
    raise ValueError(f"asr_eval.biasing_mode must be one of {BIASING_MODES}, got {mode!r}.")
  _check_beam_method(method)

  @jax.jit
  def decode(params, audio, audio_paddings, table, delta):
    net = nnx.merge(graphdef, params)
    encoder_out, encoder_paddings = net.encode(audio, audio_paddings)
    fusion = kmp_fusion(table, jnp.asarray(delta, jnp.float32), mode)
    best = beam_search(net.decoding_fns(), encoder_out, encoder_paddings, beam_size=beam_size,
                       max_symbols_per_frame=max_symbols_per_frame, max_output_length=max_output_length,
                       fusion=fusion, fusion_top_k=top_k, method=method)
    return best.tokens[:, 0], best.lengths[:, 0]

  return decode


def anti_bias_lists(ids: Sequence[str], texts: Sequence[str], bias_lists: Sequence[Sequence[str]],
                    seed: int = 0) -> list[list[str]]:
  """Anti-biasing distractor lists: for utterance u, len(set(bias_lists[u])) phrases (fewer when
  fewer qualify) drawn without replacement from the phrases of the other utterances' lists
  that do not occur in texts[u] as a run of whole words (both normalized as for WER).
  Depends only on (seed, ids[u]) and the set of phrases, not on the order of the utterances."""
  if not len(ids) == len(texts) == len(bias_lists):
    raise ValueError(f"got {len(ids)} ids, {len(texts)} texts and {len(bias_lists)} bias lists; need one each "
                     "per utterance.")
  repeated = sorted(i for i, count in collections.Counter(ids).items() if count > 1)
  if repeated:
    raise ValueError(f"anti-biasing lists need distinct utterance ids; {repeated[0]!r} repeats.")
  owners: dict[str, set[str]] = {}
  for ident, phrases in zip(ids, bias_lists):
    for phrase in phrases:
      owners.setdefault(phrase, set()).add(ident)
  padded = {p: f" {wer.normalize_text(p)} " for p in owners}
  lists = []
  for ident, text, phrases in zip(ids, texts, bias_lists):
    words = f" {wer.normalize_text(text)} "
    pool = sorted(p for p, who in owners.items() if who - {ident} and padded[p] not in words)
    size = min(len(set(phrases)), len(pool))
    rng = np.random.default_rng([seed, zlib.crc32(ident.encode("utf-8"))])
    lists.append([pool[i] for i in rng.choice(len(pool), size=size, replace=False)])
  return lists


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _batch_rows(batch: dict[str, np.ndarray], real: np.ndarray) -> list[dict]:
  """id (None when the task has none), reference and own bias list of each row of a host batch;
  real [batch] bool marks the utterances (filler rows get empty entries)."""
  rows = []
  for i, keep in enumerate(real):
    rows.append({"id": _text(batch["id"][i]) if "id" in batch and keep else None,
                 "reference": _text(batch["text"][i]) if keep else "",
                 "bias": [_text(b) for b in batch["bias"][i] if b] if "bias" in batch and keep else []})
  return rows


def _split_anti_lists(batches: Iterable[dict[str, np.ndarray]], seed: int, task_name: str
                      ) -> dict[str, list[str]]:
  """{utterance id: anti-biasing list} over a whole split (see `anti_bias_lists`)."""
  ids, texts, lists = [], [], []
  for batch in batches:
    if "id" not in batch or "bias" not in batch:
      raise ValueError(f"asr_eval.bias_lists='anti' needs utterance ids and per-utterance 'bias' lists; task "
                       f"{task_name!r} has {'no ids' if 'id' not in batch else 'no bias lists'}.")
    real = batch["audio_paddings"].min(axis=1) < 1.0
    for row in _batch_rows(batch, real):
      if row["id"] is not None:
        ids.append(row["id"])
        texts.append(row["reference"])
        lists.append(row["bias"])
  return dict(zip(ids, anti_bias_lists(ids, texts, lists, seed=seed)))


def _global_table(trainer: Trainer, table: PhraseTable) -> PhraseTable:
  """Host-local batched table -> global arrays sharded like the batch (on the leading axis)."""
  arrays = {f.name: np.asarray(getattr(table, f.name)) for f in dataclasses.fields(table) if f.name != "vocab_size"}
  return dataclasses.replace(table, **trainer.global_batch(arrays))


# (batch, its rows) -> (tokens [batch, max_output_length], lengths [batch]) of the best hypotheses.
BatchDecoder = Callable[[dict[str, np.ndarray], list[dict]], tuple[jax.Array, jax.Array]]


def _plain_batch_decoder(trainer: Trainer, params: Any, decode: Callable[..., Any]) -> BatchDecoder:
  def decode_batch(batch, rows):
    del rows
    inputs = trainer.global_batch({k: batch[k] for k in ("audio", "audio_paddings")})
    return decode(params, inputs["audio"], inputs["audio_paddings"])
  return decode_batch


def _biased_batch_decoder(trainer: Trainer, params: Any, decode: Callable[..., Any], biasing: KmpBiasing,
                          vocabulary: seqio.Vocabulary, task_name: str,
                          batches: Callable[[], Iterable[dict[str, np.ndarray]]]) -> BatchDecoder:
  """Decodes with each row's phrases: its own "bias" list, or (anti) its distractor list, which
  is also stored in the row as "biasing_phrases"."""
  anti = _split_anti_lists(batches(), biasing.anti_seed, task_name) if biasing.bias_lists == "anti" else None

  def decode_batch(batch, rows):
    if "bias" not in batch:
      raise ValueError(f"asr_eval.biasing_delta={biasing.delta} needs per-utterance 'bias' lists; task "
                       f"{task_name!r} has none.")
    if anti is not None:
      for row in rows:
        row["biasing_phrases"] = [] if row["id"] is None else anti[row["id"]]
    table = biasing.phrase_table([row.get("biasing_phrases", row["bias"]) for row in rows], vocabulary)
    inputs = trainer.global_batch({k: batch[k] for k in ("audio", "audio_paddings")})
    return decode(params, inputs["audio"], inputs["audio_paddings"], _global_table(trainer, table), biasing.delta)

  return decode_batch


@gin.configurable(denylist=["model_dir"])
def asr_eval(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED, task_name: str = gin.REQUIRED,
             vocabulary: seqio.Vocabulary = gin.REQUIRED, split: str = "test", batch_size: int = 8,
             max_audio_samples: int = gin.REQUIRED, max_target_length: int = gin.REQUIRED,
             max_output_length: int | None = None, beam_size: int = 1, max_symbols_per_frame: int = 32,
             checkpoint_step: int | None = None, biasing_delta: float = 0.0, biasing_mode: str = "shallow",
             biasing_top_k: int | None = None, bias_lists: str = "utterance", max_phrases: int = 32,
             max_phrase_length: int = 32, biasing_chain_width: int | None = None, anti_bias_seed: int = 0,
             beam_method: str = "tsd", mesh: Callable[[], jax.sharding.Mesh] = partitioning.make_mesh) -> dict:
  """Decodes `split` of `task_name` and returns (and writes) the WER summary.

  beam_method: the beam search, 'tsd' or 'one_pass' (module docstring).

  biasing_*: KMP biasing (module docstring): delta (0 = off), mode ('shallow' | 'rescore'),
  top_k ('shallow' only), bias_lists ('utterance' | 'anti'), max_phrases / max_phrase_length /
  biasing_chain_width (fixed phrase-table shape; None = max_phrase_length), anti_bias_seed.
  """
  if beam_size < 1:
    raise ValueError(f"asr_eval.beam_size must be >= 1, got {beam_size}.")
  _check_beam_method(beam_method)
  biasing = KmpBiasing(biasing_delta, biasing_mode, biasing_top_k, bias_lists, max_phrases, max_phrase_length,
                       biasing_chain_width, anti_bias_seed)
  partitioning.initialize_distributed()
  trainer, params, step = restore_for_inference(model_dir, model, mesh(), checkpoint_step)
  sizes = dict(beam_size=beam_size, max_symbols_per_frame=max_symbols_per_frame,
               max_output_length=max_output_length or max_target_length, method=beam_method)

  def batches():
    return speech.speech_batches(task_name, split, batch_size, max_audio_samples, max_target_length,
                                 shuffle=False, include_text=True)

  if biasing.enabled:
    decoder = make_biased_decoder(trainer.graphdef, mode=biasing.mode, top_k=biasing.top_k, **sizes)
    decode_batch = _biased_batch_decoder(trainer, params, decoder, biasing, vocabulary, task_name, batches)
  else:
    decode_batch = _plain_batch_decoder(trainer, params, make_decoder(trainer.graphdef, **sizes))
  rows = []
  with trainer.context():
    for batch in batches():
      real = batch["audio_paddings"].min(axis=1) < 1.0  # filler rows are all padding
      batch_rows = _batch_rows(batch, real)
      tokens, lengths = jax.device_get(decode_batch(batch, batch_rows))
      for i in np.flatnonzero(real):
        row = batch_rows[i]
        row["id"] = str(len(rows)) if row["id"] is None else row["id"]
        row["hypothesis"] = vocabulary.decode([int(t) for t in tokens[i, :lengths[i]]])
        rows.append(row)
      logging.info("decoded %d utterances", len(rows))
  if not rows:
    raise ValueError(f"split {split!r} of task {task_name!r} has no utterances.")
  refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
  overall = wer.word_error_rate(refs, hyps)
  payload = {"task": task_name, "split": split, "step": step, "utterances": len(rows), "beam_size": beam_size,
             "beam_method": beam_method, "max_symbols_per_frame": max_symbols_per_frame,
             "wer": overall.wer, "substitutions": overall.substitutions, "deletions": overall.deletions,
             "insertions": overall.insertions, "reference_words": overall.reference_words, **biasing.summary()}
  if any(r["bias"] for r in rows):
    biased_result = wer.biased_wer(refs, hyps, [r["bias"] for r in rows])
    payload.update({"b_wer": biased_result.b_wer, "u_wer": biased_result.u_wer})
  if jax.process_index() == 0:
    name = f"asr_{split}_beam{beam_size}{_method_name(beam_method)}{biasing.name}_step{step}"
    base = os.path.join(model_dir, "eval", name)
    write_json(base + ".json", payload)
    with open(base + ".jsonl.tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(base + ".jsonl.tmp", base + ".jsonl")
  return payload
