"""Contextual biasing of the ASR eval as gin-configured objects: `asr_eval.biasing = @KmpBiasing()`
(phrase boosting in the beam search) or `@NamBiasing()` (the model's Deferred-NAM biaser reads each
utterance's list; optionally with KMP boosting of the same list or of the K phrases NAM selected).

A biasing object is checked once, when it is built; it names its result files, records its
settings in the result JSON, and turns a batch's phrase arrays (bias_tokens [batch, phrases,
phrase_len] with bias_paddings, data/speech_features.py) into what the decoder fuses into the
beam search. decoding/ itself takes arrays and callables only.

`kmp_sweep` lists several settings for one process (`asr_eval.biasing = @kmp_sweep()`): the
model is restored once and one decoder compiled per (mode, top_k), every delta and list reusing it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from memlm_jax.losses import ctc_spotting
from memlm_jax.decoding.aho_corasick import PhraseAutomaton, automaton_from_padded
from memlm_jax.decoding.boosting import phrase_fusion
from memlm_jax.decoding.kmp import PhraseTable, phrase_table_from_padded, select_phrases
from memlm_jax.decoding.transducer_beam import ScoreFusion

BIASING_MODES = ("shallow", "rescore")
BOOSTING_BACKENDS = ("kmp", "aho_corasick")
BIAS_LISTS = ("utterance", "anti")
# What the result JSON records without biasing.
NO_BIASING = {"biasing_delta": 0.0, "biasing_mode": None, "biasing_top_k": None, "bias_lists": None}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CtcSpotter:
  """Boost only the phrases a hybrid model's CTC head spots (losses/ctc_spotting.py): the `top_k` of the
  list that fit the utterance best, by CTC log-likelihood lost per token against the frame-wise best
  labels, and only those that lose at most `threshold` nats per token. The model needs a CTC head
  (Transducer.ctc_weight > 0)."""
  top_k: int = 1
  threshold: float = 3.0

  def __post_init__(self):
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
      raise ValueError(f"CtcSpotter.top_k must be an integer >= 1, got {self.top_k!r}.")
    if not (isinstance(self.threshold, numbers.Real) and 0 <= self.threshold < float("inf")):
      raise ValueError(f"CtcSpotter.threshold must be a finite number of nats per token >= 0, got {self.threshold!r}.")

  @property
  def name(self) -> str:
    return f"_ctcspot{self.top_k}t{self.threshold:g}"

  def select(self, ctc_log_probs: jax.Array, frame_paddings: jax.Array, bias_tokens: jax.Array,
             bias_paddings: jax.Array) -> jax.Array:
    """[batch, top_k] indices of the spotted phrases (-1: none) from ctc_log_probs [batch, frames, vocab],
    frame_paddings [batch, frames] and the lists bias_tokens / bias_paddings [batch, phrases, phrase_len]."""
    return self.locate(ctc_log_probs, frame_paddings, bias_tokens, bias_paddings)[0]

  def locate(self, ctc_log_probs: jax.Array, frame_paddings: jax.Array, bias_tokens: jax.Array,
             bias_paddings: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As `select`, with each spotted phrase's window: (indices, start, end), each [batch, top_k] int32
    (start / end: its first and last frame; meaningless where the index is -1)."""
    spots = ctc_spotting.phrase_spots(ctc_log_probs, frame_paddings, bias_tokens, bias_paddings)
    indices = ctc_spotting.spotted_phrases(spots.gain, bias_paddings, self.top_k, self.threshold)
    window = lambda x: jnp.take_along_axis(x, jnp.maximum(indices, 0), axis=1)  # noqa: E731
    return indices, window(spots.start), window(spots.end)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KmpBiasing:
  """Phrase boosting with the KMP rules (decoding/kmp.py) of one eval run; bad values raise ValueError.

  delta: bonus per matched token, >= 0; 0 = no biasing (the unbiased run and its file).
  mode: 'shallow' (the bonus of every label before pruning) or 'rescore' (of the surviving
    expansions only).
  top_k: 'shallow' only: the bonus only for each hypothesis's top_k labels (None = all labels).
  bias_lists: 'utterance' (each utterance's own "bias" list) or 'anti' (a distractor list of the
    same size drawn from the other utterances' phrases absent from its transcript,
    evaluation/bias_lists.py).
  backend: 'kmp' (decoding/kmp.py: per-step cost grows with the phrases) or 'aho_corasick'
    (decoding/aho_corasick.py: the same bonuses, per-step cost set by the longest phrase and the
    widest trie node, for long lists).
  chain_width: 'kmp': fixed failure-chain width of the phrase tables (None = the phrase length of
    the batches, which fits any phrase), so every batch shares one compilation.
  fanout_width: 'aho_corasick': fixed children per automaton node (None = the widest node of each
    batch's lists rounded up to a power of two: a new compilation when a batch needs a wider one).
  anti_seed: seed of the anti-biasing draw.
  spotter: None (boost the whole list) or a CtcSpotter: boost only the phrases it spots in the
    utterance ('kmp' backend; the model needs a CTC head).
  """
  delta: float = gin.REQUIRED
  mode: str = "shallow"
  top_k: int | None = None
  bias_lists: str = "utterance"
  backend: str = "kmp"
  chain_width: int | None = None
  fanout_width: int | None = None
  anti_seed: int = 0
  spotter: CtcSpotter | None = None

  def __post_init__(self):
    if not (isinstance(self.delta, numbers.Real) and np.isfinite(self.delta) and self.delta >= 0):
      raise ValueError(f"KmpBiasing.delta must be a finite bonus >= 0 (0 = no biasing), got {self.delta!r}.")
    if self.mode not in BIASING_MODES:
      raise ValueError(f"KmpBiasing.mode must be one of {BIASING_MODES}, got {self.mode!r}.")
    if self.bias_lists not in BIAS_LISTS:
      raise ValueError(f"KmpBiasing.bias_lists must be one of {BIAS_LISTS}, got {self.bias_lists!r}.")
    if self.top_k is not None and (self.mode != "shallow" or self.top_k < 1):
      raise ValueError(f"KmpBiasing.top_k={self.top_k} needs mode 'shallow' and a value >= 1 (or None for all "
                       "labels).")
    if self.backend not in BOOSTING_BACKENDS:
      raise ValueError(f"KmpBiasing.backend must be one of {BOOSTING_BACKENDS}, got {self.backend!r}.")
    for name in ("chain_width", "fanout_width"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"KmpBiasing.{name} must be >= 1 (or None), got {getattr(self, name)}.")
    if self.spotter is not None and not isinstance(self.spotter, CtcSpotter):
      raise ValueError(f"KmpBiasing.spotter must be a CtcSpotter or None, got {self.spotter!r}.")
    if self.spotter is not None and self.backend != "kmp":
      raise ValueError(f"KmpBiasing.spotter gathers the spotted phrases from a KMP table on the device; it needs "
                       f"backend 'kmp', got {self.backend!r}.")

  # A KMP setting boosts in the search only; the encoder reads no phrases.
  uses_context = False

  @property
  def reads_phrase_arrays(self) -> bool:
    """Whether the decoder needs the lists' token arrays (the spotter scores them)."""
    return self.spotter is not None

  @property
  def enabled(self) -> bool:
    return self.delta > 0

  @property
  def name(self) -> str:
    """File-name part: '' when off, else e.g. '_kmp0.5shallow', '_kmp1shallow_top8', '_kmp2rescore_anti',
    '_kmp0.5shallow_ac' (backend 'aho_corasick')."""
    if not self.enabled:
      return ""
    top = "" if self.top_k is None else f"_top{self.top_k}"
    anti = "_anti" if self.bias_lists == "anti" else ""
    backend = "_ac" if self.backend == "aho_corasick" else ""
    spotter = "" if self.spotter is None else self.spotter.name
    return f"_kmp{self.delta:g}{self.mode}{top}{spotter}{anti}{backend}"

  @property
  def decoder_key(self) -> tuple:
    """What the compiled decoder depends on (delta, lists and seed are its inputs)."""
    return ("kmp", self.mode, self.top_k, self.backend, self.spotter)

  def summary(self) -> dict[str, Any]:
    """The settings the result JSON records (NO_BIASING when off)."""
    if not self.enabled:
      return dict(NO_BIASING)
    summary = {"biasing_delta": float(self.delta), "biasing_mode": self.mode, "biasing_top_k": self.top_k,
               "bias_lists": self.bias_lists, "biasing_backend": self.backend}
    if self.spotter is not None:
      summary["ctc_spotter"] = dataclasses.asdict(self.spotter)
    return summary

  def phrase_table(self, bias_tokens: np.ndarray, bias_paddings: np.ndarray,
                   vocab_size: int) -> PhraseTable | PhraseAutomaton:
    """A batch's phrase table (host arrays), row u biasing utterance u.

    Args:
      bias_tokens: [batch, phrases, phrase_len] int token ids, 0 where padded.
      bias_paddings: [batch, phrases, phrase_len], 1.0 = padded.
      vocab_size: the model's vocabulary size.
    Returns:
      'kmp': PhraseTable [batch, phrases, phrase_len, chain_width]; 'aho_corasick': PhraseAutomaton
      [batch, 1 + phrases * phrase_len nodes] (one shape for every batch of this shape).
    """
    mask = np.asarray(bias_paddings) == 0
    if self.backend == "aho_corasick":
      return automaton_from_padded(bias_tokens, mask, vocab_size, fanout_width=self.fanout_width)
    return phrase_table_from_padded(bias_tokens, mask, vocab_size,
                                    chain_width=self.chain_width or np.shape(bias_tokens)[-1])

  def fusion(self, table: PhraseTable | PhraseAutomaton, delta: Any, selected: Any = None) -> ScoreFusion:
    """The beam search's ScoreFusion (called inside the jitted decoder; delta may be traced), boosting
    the rows `selected` [batch, K] of a KMP table (None: all of them)."""
    if selected is not None:
      if not isinstance(table, PhraseTable):
        raise ValueError("boosting only the selected phrases needs KmpBiasing.backend 'kmp' (its table's rows can be "
                         f"gathered on the device), got {self.backend!r}.")
      table = select_phrases(table, selected)
    return phrase_fusion(table, delta, self.mode)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CtcWordSpotting:
  """Context biasing by CTC word spotting, as NeMo's CTC-WS does for hybrid models: the phrases the CTC
  head spots (`spotter`) replace the words of the transducer's best hypothesis emitted in their window
  of frames, widened by `margin` frames on each side (decoding/ctc_spotter.py: replace_spotted_words;
  nothing is boosted in the search). Needs a CTC head and a SentencePiece vocabulary (words are whole
  pieces sequences starting with "▁").

  max_extra_words: None, or the most words a phrase may replace beyond its own count (a window over
    more is not trusted and nothing is merged for it).
  bias_lists / anti_seed: as for KmpBiasing.
  """
  spotter: CtcSpotter = CtcSpotter()
  margin: int = 0
  max_extra_words: int | None = 2
  bias_lists: str = "utterance"
  anti_seed: int = 0

  uses_context = False
  reads_phrase_arrays = True
  replaces_words = True
  enabled = True
  delta = 0.0
  top_k = None

  def __post_init__(self):
    if not isinstance(self.spotter, CtcSpotter):
      raise ValueError(f"CtcWordSpotting.spotter must be a CtcSpotter, got {self.spotter!r}.")
    if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
      raise ValueError(f"CtcWordSpotting.margin must be an integer number of frames >= 0, got {self.margin!r}.")
    if self.max_extra_words is not None and (isinstance(self.max_extra_words, bool) or
                                             not isinstance(self.max_extra_words, int) or self.max_extra_words < 0):
      raise ValueError(f"CtcWordSpotting.max_extra_words must be None or an integer >= 0, got "
                       f"{self.max_extra_words!r}.")
    if self.bias_lists not in BIAS_LISTS:
      raise ValueError(f"CtcWordSpotting.bias_lists must be one of {BIAS_LISTS}, got {self.bias_lists!r}.")

  @property
  def name(self) -> str:
    """File-name part, e.g. '_ctcws1t3m0x1', '_ctcws1t3m2_anti' (x: max_extra_words, absent when None)."""
    extra = "" if self.max_extra_words is None else f"x{self.max_extra_words}"
    return (f"_ctcws{self.spotter.top_k}t{self.spotter.threshold:g}m{self.margin}{extra}"
            + ("_anti" if self.bias_lists == "anti" else ""))

  @property
  def decoder_key(self) -> tuple:
    return ("ctcws", self.spotter)

  def summary(self) -> dict[str, Any]:
    return {**NO_BIASING, "bias_lists": self.bias_lists, "ctc_word_spotting": {
        **dataclasses.asdict(self.spotter), "margin": self.margin, "max_extra_words": self.max_extra_words}}


NAM_KMP_PHRASES = ("all", "nam_top_k")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NamBiasing:
  """Deferred-NAM biasing of one eval run (the model needs a biaser: Transducer.biaser, models/nam.py).

  bias_lists: 'utterance' (each utterance's own list) or 'anti' (a distractor list of the same size,
    as for KmpBiasing).
  kmp: None, or a KmpBiasing whose boosting is added in the beam search, of the list NAM reads (its
    bias_lists must stay 'utterance'; its anti_seed is not used).
  kmp_phrases: 'all' (KMP boosts the whole list) or 'nam_top_k' (only the K phrases NAM's filter
    selected for the utterance, so KMP's per-step cost no longer grows with the list).
  anti_seed: seed of the anti-biasing draw.
  The biasing strength s is the model's (BiasingAttention.strength, gin).
  """
  bias_lists: str = "utterance"
  kmp: KmpBiasing | None = None
  kmp_phrases: str = "all"
  anti_seed: int = 0

  uses_context = True
  reads_phrase_arrays = True
  enabled = True

  def __post_init__(self):
    if self.bias_lists not in BIAS_LISTS:
      raise ValueError(f"NamBiasing.bias_lists must be one of {BIAS_LISTS}, got {self.bias_lists!r}.")
    if self.kmp_phrases not in NAM_KMP_PHRASES:
      raise ValueError(f"NamBiasing.kmp_phrases must be one of {NAM_KMP_PHRASES}, got {self.kmp_phrases!r}.")
    if self.kmp is not None and not isinstance(self.kmp, KmpBiasing):
      raise ValueError(f"NamBiasing.kmp must be a KmpBiasing or None, got {self.kmp!r}.")
    if self.kmp is not None and self.kmp.spotter is not None:
      raise ValueError("NamBiasing.kmp with a CtcSpotter is not supported: NAM's own filter picks the phrases "
                       "(NamBiasing.kmp_phrases='nam_top_k').")
    if self.kmp is not None and self.kmp.bias_lists != "utterance":
      raise ValueError(f"NamBiasing.kmp boosts the list NAM reads; set NamBiasing.bias_lists={self.kmp.bias_lists!r} "
                       "instead of KmpBiasing.bias_lists.")
    if self.kmp_phrases != "all" and self.kmp is None:
      raise ValueError(f"NamBiasing.kmp_phrases={self.kmp_phrases!r} needs NamBiasing.kmp (a KmpBiasing).")
    if self.kmp_phrases == "nam_top_k" and self.kmp.backend != "kmp":
      raise ValueError(f"NamBiasing.kmp_phrases='nam_top_k' gathers NAM's K phrases from a KMP table on the device; "
                       f"it needs KmpBiasing.backend 'kmp', got {self.kmp.backend!r} (NAM's K phrases are few: "
                       "KMP's cost over them is small).")

  @property
  def _kmp(self) -> KmpBiasing | None:
    return self.kmp if self.kmp is not None and self.kmp.enabled else None

  @property
  def delta(self) -> float:
    return 0.0 if self._kmp is None else self._kmp.delta

  @property
  def top_k(self) -> int | None:
    return None if self._kmp is None else self._kmp.top_k

  @property
  def name(self) -> str:
    """File-name part, e.g. '_nam', '_nam_anti', '_nam_kmp0.5shallow', '_nam_kmp0.5shallow_namtopk'."""
    kmp = "" if self._kmp is None else self._kmp.name + ("_namtopk" if self.kmp_phrases == "nam_top_k" else "")
    return "_nam" + ("_anti" if self.bias_lists == "anti" else "") + kmp

  @property
  def decoder_key(self) -> tuple:
    return ("nam", None if self._kmp is None else (self._kmp.decoder_key, self.kmp_phrases))

  def summary(self) -> dict[str, Any]:
    kmp = dict(NO_BIASING) if self._kmp is None else self._kmp.summary()
    return {**kmp, "bias_lists": self.bias_lists, "nam": True,
            "nam_kmp_phrases": None if self._kmp is None else self.kmp_phrases}

  def phrase_table(self, bias_tokens: np.ndarray, bias_paddings: np.ndarray,
                   vocab_size: int) -> PhraseTable | PhraseAutomaton:
    return self.kmp.phrase_table(bias_tokens, bias_paddings, vocab_size)

  def fusion(self, table: PhraseTable | PhraseAutomaton, delta: Any, selected: Any = None) -> ScoreFusion:
    """KMP fusion over the whole table, or (kmp_phrases 'nam_top_k') over the rows NAM `selected` [batch, K]."""
    return self._kmp.fusion(table, delta, selected if self.kmp_phrases == "nam_top_k" else None)


@gin.configurable
def kmp_sweep(shallow_deltas: Sequence[float] = (), rescore_deltas: Sequence[float] = (),
              bias_lists: Sequence[str] = BIAS_LISTS) -> list[KmpBiasing | None]:
  """Settings for one process: no biasing (None), then for each list kind in `bias_lists`
  KmpBiasing at every shallow delta and every rescore delta (other fields from KmpBiasing's gin
  bindings, e.g. anti_seed, and top_k for the shallow ones)."""
  settings: list[KmpBiasing | None] = [None]
  for lists in bias_lists:
    settings += [KmpBiasing(delta=d, mode="shallow", bias_lists=lists) for d in shallow_deltas]
    settings += [KmpBiasing(delta=d, mode="rescore", top_k=None, bias_lists=lists) for d in rescore_deltas]
  return settings
