r"""ASR evaluation launcher: restore a transducer, decode a split, score WER.

  python -m memlm_jax.eval --gin_file=runs/asr_eval.gin --gin_file=<model+data>.gin \
      --gin.MODEL_DIR="'runs/asr'" [--gin.asr_eval.beam_size=8] \
      [--gin.asr_eval.biasing=@KmpBiasing() --gin.KmpBiasing.delta=2.0]

Decodes every utterance of `split` (greedy when beam_size is 1, else the fixed-shape beam
search) and writes MODEL_DIR/eval/asr_<split>_beam<K><method><biasing>_step<N>.json (WER with its
substitutions, deletions and insertions; B-WER / U-WER when the task carries per-utterance bias
lists) and the same name .jsonl (id, reference, hypothesis per utterance); K = 1 is greedy.
beam_method picks the beam search (memlm_jax/decoding/transducer_beam.py): 'tsd' (default,
<method> = '') or 'one_pass' (<method> = '_onepass'). ilm_weight w > 0 subtracts w x the internal
LM's log-prob from every label's in the search (ILME fusion; beam 1 is then a beam search, not
greedy) and adds '_ilm<w>' to <method>.

Biasing: `asr_eval.biasing = @KmpBiasing()` (launch/biasing.py; off when None or delta 0), or
`@NamBiasing()` for a model with a Deferred-NAM biaser: its encoder reads each utterance's list
(and NamBiasing.kmp adds KMP boosting of that list or of the K phrases NAM selected). The
beam search (beam 1 included, then not greedy) gets KMP phrase boosting from each batch's
phrase arrays (bias_tokens [batch, phrases, phrase_len], data/speech_features.py; shape fixed by
speech_dataset.max_phrases / max_phrase_length). With bias_lists 'anti' each utterance instead
boosts a distractor list (evaluation/bias_lists.py; the split is read once more first, for the
phrases), which the .jsonl rows hold as "biasing_phrases". <biasing> in the file name is '' when
off, else e.g. '_kmp0.5shallow', '_kmp2rescore', '_kmp1shallow_top8', '_kmp2shallow_anti'.
B-WER / U-WER are always measured against the utterance's own bias list: with 'anti' no boosted
phrase is in the transcript, so the numbers to read are WER and U-WER against the unbiased run
(false alarms), and B-WER shows what wrong boosting does to the names that are spoken.

`asr_eval.biasing` may also be a list of settings (e.g. `@kmp_sweep()`): each is decoded and
written in turn with one restore and one compiled decoder per (mode, top_k), every delta and
list reusing it; asr_eval then returns {"runs": [the summary of each setting]}.

On a hybrid transducer-CTC model (a CTC head) the list can be narrowed first: `KmpBiasing.spotter =
@CtcSpotter()` boosts only the phrases the CTC head spots ('_ctcspot<k>t<threshold>' in the name), and
`asr_eval.biasing = @CtcWordSpotting()` instead merges the spotted phrases into the best hypothesis in
place of the words emitted in their windows ('_ctcws<k>t<threshold>m<margin>x<extra words>'; always a
beam search, beam 1 included, since it needs each label's frame).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import gin
import jax
import numpy as np
import seqio
from absl import logging
from flax import nnx

from memlm_jax.data import pipeline, speech_features
from memlm_jax.decoding.transducer_beam import (BEAM_METHODS, TransducerFns, beam_search, check_ilm_weight,
                                                greedy_decode)
from memlm_jax.evaluation import bias_lists, wer
from memlm_jax.decoding.ctc_spotter import replace_spotted_words
from memlm_jax.launch.biasing import NO_BIASING, CtcWordSpotting, KmpBiasing, NamBiasing
from memlm_jax.launch.eval_lib import check_writable, restore_for_inference, settings_name, write_json
from memlm_jax.runtime import files, multihost, partitioning
from memlm_jax.runtime.partitioning import Partitioner
from memlm_jax.runtime.train_state import InferenceState

Biasing = KmpBiasing | NamBiasing | CtcWordSpotting
# (params, audio [batch, samples], audio_paddings [batch, samples][, table, delta, bias_tokens, bias_paddings]) ->
# (tokens [batch, max_output_length] int32, lengths [batch] int32) of the best hypotheses (with CtcWordSpotting also
# their frames and the spotted phrases: make_decoder).
Decoder = Callable[..., tuple[jax.Array, ...]]


def check_search(beam_size: int, method: str, ilm_weight: float = 0.0) -> None:
  """The search settings' one check (asr_eval runs it before reading a checkpoint)."""
  check_ilm_weight(ilm_weight)
  if beam_size < 1:
    raise ValueError(f"asr_eval.beam_size must be >= 1, got {beam_size}.")
  if method not in BEAM_METHODS:
    raise ValueError(f"asr_eval.beam_method must be one of {BEAM_METHODS}, got {method!r}.")


def _method_name(method: str, ilm_weight: float = 0.0) -> str:
  """File-name part of the search: '' for the default 'tsd' without ILM subtraction, else e.g.
  '_onepass', '_ilm0.5', '_onepass_ilm1'."""
  return ("" if method == "tsd" else "_" + method.replace("_", "")) + (f"_ilm{ilm_weight:g}" if ilm_weight else "")


def make_decoder(graphdef: nnx.GraphDef, *, beam_size: int, max_symbols_per_frame: int, max_output_length: int,
                 method: str = "tsd", biasing: Biasing | None = None, ilm_weight: float = 0.0) -> Decoder:
  """The jitted decoder of a transducer: decode(params, audio [batch, samples], audio_paddings
  [batch, samples], table=None, delta=None, bias_tokens=None, bias_paddings=None) -> (tokens [batch,
  max_output_length], lengths [batch]).

  Without KMP boosting or ILM subtraction: greedy decoding when beam_size is 1, else `beam_search`
  with `method` ('tsd' or 'one_pass') and `ilm_weight` (transducer_beam's internal-LM subtraction).
  With KMP boosting (a KmpBiasing, or a NamBiasing with kmp): the beam search (beam 1 included)
  fused with the boosting of `table`, a batched PhraseTable (row u biases utterance u), at bonus
  `delta`, a traced scalar, so every bonus (0 included: exactly the unbiased beam search) and every
  phrase list of the same shape reuse one compilation. With NamBiasing the encoder reads
  bias_tokens / bias_paddings [batch, phrases, phrase_len] through the model's biaser (and KMP may
  boost only the K phrases it selected); with a KmpBiasing.spotter the model's CTC head picks the
  phrases KMP boosts from bias_tokens. With CtcWordSpotting the decoder returns (tokens, lengths,
  frames [batch, max_output_length] of the best hypothesis, and the spotted phrases' indices, start
  and end frames [batch, top_k]) for `merge_spotted_phrases` on the host. Only biasing's
  `decoder_key` is built in.
  """
  check_search(beam_size, method, ilm_weight)
  search = dict(max_symbols_per_frame=max_symbols_per_frame, max_output_length=max_output_length)
  kmp = None if biasing is None or not biasing.delta else biasing
  word_spotting = biasing if isinstance(biasing, CtcWordSpotting) else None

  @jax.jit
  def decode(params, audio, audio_paddings, table=None, delta=None, bias_tokens=None, bias_paddings=None):
    net = nnx.merge(graphdef, params)
    selected = None
    if biasing is not None and biasing.uses_context:
      encoder_out, encoder_paddings, selected = net.encode_biased(audio, audio_paddings, bias_tokens, bias_paddings)
    else:
      encoder_out, encoder_paddings = net.encode(audio, audio_paddings)
    if kmp is not None and getattr(kmp, "spotter", None) is not None:
      selected = kmp.spotter.select(net.ctc_log_probs(encoder_out), encoder_paddings, bias_tokens, bias_paddings)
    fns = TransducerFns.from_model(net)
    if word_spotting is not None:  # the words in the spotted windows are replaced on the host
      best = beam_search(fns, encoder_out, encoder_paddings, beam_size=beam_size, method=method,
                         ilm_weight=ilm_weight, **search)
      spotted = word_spotting.spotter.locate(net.ctc_log_probs(encoder_out), encoder_paddings, bias_tokens,
                                             bias_paddings)
      return best.tokens[:, 0], best.lengths[:, 0], best.frames[:, 0], *spotted
    if kmp is None and beam_size == 1 and not ilm_weight:
      return greedy_decode(fns, encoder_out, encoder_paddings, **search)
    fusion = None if kmp is None else kmp.fusion(table, delta, selected)
    best = beam_search(fns, encoder_out, encoder_paddings, beam_size=beam_size, fusion=fusion,
                       fusion_top_k=None if kmp is None else kmp.top_k, method=method, ilm_weight=ilm_weight,
                       **search)
    return best.tokens[:, 0], best.lengths[:, 0]

  return decode


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _batch_rows(batch: dict[str, np.ndarray]) -> list[dict]:
  """id (None when the task has none), reference and own bias list of each row of a host batch;
  filler rows (all audio padding) get empty entries and "real" False."""
  rows = []
  for i, real in enumerate(batch["audio_paddings"].min(axis=1) < 1.0):
    rows.append({"id": _text(batch["id"][i]) if "id" in batch and real else None,
                 "reference": _text(batch["text"][i]) if real else "",
                 "bias": [_text(b) for b in batch["bias"][i] if b] if "bias" in batch and real else [],
                 "real": bool(real)})
  return rows


def _filler_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A batch shaped like `batch` whose rows are all padding (a host whose shard has run out
  decodes these while the others finish)."""
  filler = {k: np.zeros_like(v) if v.dtype != object else np.full_like(v, b"") for k, v in batch.items()}
  filler["audio_paddings"] = np.ones_like(batch["audio_paddings"])
  if "bias_paddings" in batch:  # no phrases (zeros would read as phrases of token 0)
    filler["bias_paddings"] = np.ones_like(batch["bias_paddings"])
  return filler


def _phrase_tokens(batch: dict[str, np.ndarray]) -> dict[str, list[int]]:
  """{phrase: its token ids} of every phrase of the batch's own lists ("bias" beside bias_tokens)."""
  lengths = (batch["bias_paddings"] == 0).sum(-1)
  return {_text(phrase): batch["bias_tokens"][u, b, :lengths[u, b]].tolist()
          for u, row in enumerate(batch["bias"]) for b, phrase in enumerate(row) if phrase}


class _SplitDecoder:
  """Decodes one split of a restored transducer under any biasing setting, compiling one
  decoder per decoder_key and drawing the anti-biasing lists once per seed."""

  def __init__(self, restored: InferenceState, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
               vocabulary: seqio.Vocabulary, task_name: str, search: dict[str, Any]):
    self.restored = restored
    self.batches = batches
    self.vocabulary = vocabulary
    self.task_name = task_name
    self.search = search
    self._decoders: dict[Any, Decoder] = {}
    self._anti: dict[int, tuple[dict[str, list[str]], dict[str, list[int]]]] = {}
    self._spelled: set[str] = set()
    self._word_starts: np.ndarray | None = None

  def _decoder(self, biasing: Biasing | None) -> Decoder:
    key = None if biasing is None else biasing.decoder_key
    if key not in self._decoders:
      self._decoders[key] = make_decoder(self.restored.graphdef, biasing=biasing, **self.search)
    return self._decoders[key]

  def _anti_lists(self, seed: int) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """({utterance id: anti-biasing list}, {phrase: token ids}) over the whole split."""
    if seed not in self._anti:
      utterances, tokens = [], {}
      for batch in self.batches():
        if "id" not in batch or "bias" not in batch:
          raise ValueError(f"KmpBiasing.bias_lists='anti' needs utterance ids and per-utterance 'bias' lists; task "
                           f"{self.task_name!r} has {'no ids' if 'id' not in batch else 'no bias lists'}.")
        tokens.update(_phrase_tokens(batch))
        utterances += [(row["id"], row["reference"], row["bias"]) for row in _batch_rows(batch) if row["real"]]
      shard = self.restored.partitioner.data_shard  # the whole split, on every host
      utterances = multihost.interleave(multihost.gather_shards(utterances, shard))
      for host_tokens in multihost.gather_shards(tokens, shard):
        tokens.update(host_tokens)
      ids, texts, lists = ([u[i] for u in utterances] for i in range(3))
      self._anti[seed] = dict(zip(ids, bias_lists.anti_bias_lists(ids, texts, lists, seed=seed))), tokens
    return self._anti[seed]

  def _global(self, tree: Any) -> Any:
    """Host-local arrays [local_batch, ...] (any pytree) -> global arrays sharded like the batch."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = self.restored.partitioner.global_batch({str(i): leaf for i, leaf in enumerate(leaves)})
    return jax.tree.unflatten(treedef, [arrays[str(i)] for i in range(len(leaves))])

  def _decode_batch(self, batch: dict[str, np.ndarray], rows: list[dict], biasing: Biasing | None
                    ) -> tuple[tuple[jax.Array, ...], np.ndarray | None]:
    """Decodes a host batch with each row's phrases: its own list, or (anti) its distractor list,
    which is also stored in the row as "biasing_phrases". Returns (the decoder's outputs, the host's
    phrase tokens [local_batch, phrases, phrase_len] with 0 after each phrase, None without biasing)."""
    audio = self._global({k: batch[k] for k in ("audio", "audio_paddings")})
    decode = self._decoder(biasing)
    if biasing is None:
      return decode(self.restored.params, audio["audio"], audio["audio_paddings"]), None
    if "bias" not in batch:
      raise ValueError(f"asr_eval.biasing ({biasing.name[1:]}) needs per-utterance 'bias' lists; task "
                       f"{self.task_name!r} has none.")
    tokens, paddings, phrase_tokens = batch["bias_tokens"], batch["bias_paddings"], _phrase_tokens(batch)
    used = set(phrase_tokens)
    if biasing.bias_lists == "anti":
      anti, phrase_tokens = self._anti_lists(biasing.anti_seed)
      for row in rows:
        row["biasing_phrases"] = [] if row["id"] is None else anti[row["id"]]
      used = {p for row in rows for p in row["biasing_phrases"]}
      tokens, paddings = bias_lists.phrase_arrays([[phrase_tokens[p] for p in row["biasing_phrases"]] for row in rows],
                                                  *tokens.shape[1:], utterance_ids=[str(row["id"]) for row in rows])
    for phrase in sorted(used - self._spelled):  # each phrase once per split: lists can hold 20,000
      bias_lists.check_spelling(phrase, phrase_tokens[phrase], self.vocabulary)
      self._spelled.add(phrase)
    inputs = {}
    if biasing.reads_phrase_arrays:
      inputs.update(self._global({"bias_tokens": tokens, "bias_paddings": paddings}))
    if biasing.delta:
      inputs["table"] = self._global(biasing.phrase_table(tokens, paddings, self.vocabulary.vocab_size))
      inputs["delta"] = np.float32(biasing.delta)
    outputs = decode(self.restored.params, audio["audio"], audio["audio_paddings"], **inputs)
    return outputs, np.where(np.asarray(paddings) > 0, 0, np.asarray(tokens))

  def _starts_word(self) -> np.ndarray:
    """[vocab] bool: whether each label begins a word (its SentencePiece piece starts with "▁")."""
    if self._word_starts is None:
      tokenizer = self.vocabulary.tokenizer
      self._word_starts = np.array([tokenizer.id_to_piece(i).startswith("▁") if i < tokenizer.get_piece_size()
                                    else False for i in range(self.vocabulary.vocab_size)])
    return self._word_starts

  def rows(self, biasing: Biasing | None) -> tuple[list[dict], dict[str, float]]:
    """{id, reference, bias, hypothesis[, biasing_phrases]} of every utterance of the split, and this
    host's decoding time: {decode_seconds (every batch: phrase tables, search, detokenizing; not
    reading the data), first_batch_seconds (the share of the first batch, which compiles the decoder
    when it is new), batches}."""
    rows = []
    partitioner = self.restored.partitioner
    timing = {"decode_seconds": 0.0, "first_batch_seconds": 0.0, "batches": 0}
    with partitioner.context():
      for batch in self.batches():
        start = time.perf_counter()
        batch_rows = _batch_rows(batch)
        outputs, phrases = self._decode_batch(batch, batch_rows, biasing)
        outputs = [partitioner.host_rows(x) for x in outputs]
        tokens, lengths = outputs[:2]
        for i, row in enumerate(batch_rows):
          if row.pop("real"):
            hypothesis = [int(t) for t in tokens[i, :lengths[i]]]
            if isinstance(biasing, CtcWordSpotting):
              hypothesis = merge_spotted_phrases(hypothesis, outputs[2][i, :lengths[i]], phrases[i],
                                                 *(x[i] for x in outputs[3:]), self._starts_word(), biasing.margin,
                                                 biasing.max_extra_words)
            row["hypothesis"] = self.vocabulary.decode(hypothesis)
            rows.append(row)
        seconds = time.perf_counter() - start
        timing["decode_seconds"] += seconds
        timing["first_batch_seconds"] = timing["first_batch_seconds"] or seconds
        timing["batches"] += 1
        logging.info("decoded %d utterances", len(rows))
    shard = partitioner.data_shard  # every shard's rows, in the split's order
    rows = multihost.interleave(multihost.gather_shards(rows, shard))
    for index, row in enumerate(rows):
      row["id"] = str(index) if row["id"] is None else row["id"]
    return rows, timing


def merge_spotted_phrases(tokens: Sequence[int], frames: Sequence[int], phrases: np.ndarray, indices: np.ndarray,
                          starts: np.ndarray, ends: np.ndarray, starts_word: np.ndarray, margin: int,
                          max_extra_words: int | None = None) -> list[int]:
  """One hypothesis with its spotted phrases merged in, best first (ctc_spotter.replace_spotted_words,
  which may refuse a window over too many words); a phrase whose window (widened by margin) overlaps one
  already merged is left out.

  Args:
    tokens, frames: the hypothesis's labels and their frames.
    phrases: [phrases, phrase_len] the utterance's list, 0 after each phrase.
    indices, starts, ends: [top_k] the spotted phrases (-1: none) and their windows.
  """
  tokens, frames, taken = list(tokens), list(frames), []
  for index, start, end in zip(indices, starts, ends):
    if index < 0 or any(start - margin <= e + margin and s - margin <= end + margin for s, e in taken):
      continue
    phrase = [int(t) for t in phrases[index] if t]
    merged = replace_spotted_words(tokens, frames, phrase, int(start), int(end), starts_word, margin, max_extra_words)
    if merged is not None:
      (tokens, frames), taken = merged, taken + [(start, end)]
  return tokens


def _wer_summary(rows: Sequence[dict]) -> dict[str, Any]:
  """WER with its error counts; B-WER / U-WER and the spoken phrases' CER (None when no reference speaks
  a phrase of its list) when some utterance has a bias list."""
  refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
  overall = wer.word_error_rate(refs, hyps)
  summary = {"wer": overall.wer, "substitutions": overall.substitutions, "deletions": overall.deletions,
             "insertions": overall.insertions, "reference_words": overall.reference_words}
  if any(r["bias"] for r in rows):
    biased_result = wer.biased_wer(refs, hyps, [r["bias"] for r in rows])
    summary.update({"b_wer": biased_result.b_wer, "u_wer": biased_result.u_wer,
                    "phrase_cer": wer.spoken_phrase_cer(refs, hyps, [r["bias"] for r in rows])})
  return summary


def _write_rows(base: str, rows: Sequence[dict]) -> None:
  files.write_atomic(base + ".jsonl", "".join(json.dumps(r) + "\n" for r in rows))


@gin.configurable(denylist=["model_dir"])
def asr_eval(model_dir: str, *, model: Callable[..., Any] = gin.REQUIRED, task_name: str = gin.REQUIRED,
             vocabulary: seqio.Vocabulary = gin.REQUIRED, split: str = "test", batch_size: int = 8,
             max_audio_samples: int = gin.REQUIRED, max_target_length: int = gin.REQUIRED,
             max_output_length: int | None = None, beam_size: int = 1, max_symbols_per_frame: int = 32,
             beam_method: str = "tsd", ilm_weight: float = 0.0,
             biasing: Biasing | Sequence[Biasing | None] | None = None,
             checkpoint_step: int | None = None, partitioner: Callable[[], Partitioner] = Partitioner) -> dict:
  """Decodes `split` of `task_name` and returns (and writes) the WER summary.

  Args:
    model_dir: the run whose checkpoint (checkpoint_step, default the newest) is decoded.
    max_audio_samples, max_target_length: the batches' fixed shapes (speech_dataset).
    max_output_length: hypothesis width (default max_target_length).
    batch_size: utterances per decode step over all hosts (each host decodes batch_size / hosts of
      its own shard of the split; the rows of every host are gathered before scoring).
    beam_size, max_symbols_per_frame, beam_method, ilm_weight: the search (module docstring).
    biasing: a KmpBiasing, NamBiasing or CtcWordSpotting (None = off), or a list of settings decoded in
      turn (module docstring).
  """
  check_search(beam_size, beam_method, ilm_weight)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"asr_eval.batch_size must be a positive integer, got {batch_size!r}.")
  settings = list(biasing) if isinstance(biasing, (list, tuple)) else [biasing]
  partitioning.initialize_distributed()
  parts = partitioner()
  shard = parts.data_shard
  if batch_size % shard[1]:
    raise ValueError(f"asr_eval.batch_size={batch_size} (the global batch) must be divisible by the number of "
                     f"input shards ({shard[1]}, one per host or per group of hosts holding the same rows).")
  spotting_words = [s.name[1:] for s in settings if isinstance(s, CtcWordSpotting)]
  if spotting_words and not hasattr(vocabulary, "tokenizer"):
    raise ValueError(f"asr_eval.biasing ({spotting_words[0]}) merges spotted phrases as whole words, which needs a "
                     f"SentencePiece vocabulary; got {type(vocabulary).__name__}.")
  check_writable(model_dir, "eval")
  restored = restore_for_inference(model_dir, model, parts, checkpoint_step)
  needs_ctc_head = [s.name[1:] for s in settings if s is not None and s.enabled and getattr(s, "spotter", None)]
  if needs_ctc_head and "ctc_head" not in restored.params:
    raise ValueError(f"asr_eval.biasing ({needs_ctc_head[0]}) spots phrases with a CTC head (a CtcSpotter); "
                     f"the model in {model_dir} has none (Transducer.ctc_weight = 0).")
  needs_biaser = [s.name[1:] for s in settings if s is not None and s.enabled and s.uses_context]
  if needs_biaser and "biaser" not in restored.params:
    raise ValueError(f"asr_eval.biasing ({needs_biaser[0]}) needs a model with a biaser (Transducer.biaser = "
                     f"@NamBiaser, configs/models/nam.gin); the model in {model_dir} has none.")

  def batches():
    return multihost.in_step(
        speech_features.speech_batches(task_name, split, batch_size // shard[1], max_audio_samples,
                                       max_target_length, shuffle=False, include_text=True,
                                       shard_info=pipeline.input_shard(shard)),
        filler=_filler_batch)

  decoder = _SplitDecoder(restored, batches, vocabulary, task_name, dict(
      beam_size=beam_size, max_symbols_per_frame=max_symbols_per_frame,
      max_output_length=max_output_length or max_target_length, method=beam_method, ilm_weight=ilm_weight))
  payloads = []
  for setting in settings:
    setting = setting if setting is not None and setting.enabled else None
    rows, timing = decoder.rows(setting)
    if not rows:
      raise ValueError(f"split {split!r} of task {task_name!r} has no utterances.")
    biasing_summary = NO_BIASING if setting is None else setting.summary()
    settings = {"task": task_name, "split": split, "batch_size": batch_size, "max_audio_samples": max_audio_samples,
                "max_target_length": max_target_length, "max_output_length": max_output_length,
                "beam_size": beam_size, "beam_method": beam_method, "max_symbols_per_frame": max_symbols_per_frame,
                **({"ilm_weight": ilm_weight} if ilm_weight else {}), **biasing_summary}
    payload = {"task": task_name, "split": split, "step": restored.step, "utterances": len(rows),
               "beam_size": beam_size, "beam_method": beam_method, "max_symbols_per_frame": max_symbols_per_frame,
               "ilm_weight": ilm_weight, "settings": settings, **_wer_summary(rows), **biasing_summary,
               "timing": timing}
    if jax.process_index() == 0:
      name = settings_name(f"asr_{split}_beam{beam_size}{_method_name(beam_method, ilm_weight)}"
                           f"{'' if setting is None else setting.name}", settings, restored.step)
      base = os.path.join(model_dir, "eval", name)
      write_json(base + ".json", payload)
      _write_rows(base, rows)
    payloads.append(payload)
  return {"runs": payloads} if isinstance(biasing, (list, tuple)) else payloads[0]
