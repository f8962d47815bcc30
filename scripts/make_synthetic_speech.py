r"""A small real-speech corpus for the Transducer and biasing experiments, synthesized with espeak-ng.

  python scripts/make_synthetic_speech.py --output_dir=data/synth_speech
  python scripts/make_synthetic_speech.py --output_dir=/tmp/s --num_utterances=20 --seed=1 --workers=2
  python scripts/make_synthetic_speech.py --corpus=contacts --output_dir=data/contacts_speech

--corpus=names (the default): sentences fill templates of common words with rare, invented names
(RARE_NAMES, e.g. "zanzibar quimby"); some templates have no name, for measuring false biasing.
--corpus=contacts: voice commands ("call NAME on the mobile", "send a message to NAME saying ...",
"play SONG by ARTIST", ...; ENTITY_TEMPLATES) naming hundreds of entities invented from syllables
(--num_contacts person names, --num_songs songs, --num_artists artists; no two share a word),
plus --no_entity_fraction commands with no entity; --heldout_fraction of each kind is never heard
(nor listed) in training: dev and test commands name only those (see plan_contacts_corpus).

Each utterance is spoken by a random espeak-ng voice (accent + variant), speed, pitch and loudness,
all drawn from --seed, so the corpus (text and audio bytes) is a function of the flags. espeak-ng
writes 22050 Hz; the audio is resampled to 16 kHz (polyphase filter, scipy.signal.resample_poly)
and written as mono 16-bit wav.

Written under --output_dir:
  audio/<id>.wav                      16 kHz mono PCM16
  train.jsonl, dev.jsonl, test.jsonl  manifests (memlm_jax.data.speech): one line per utterance,
                                      {"audio": "audio/<id>.wav", "text", "id", "bias"}
  contacts only:
  test_n<N>.jsonl                     for each N of --eval_list_sizes (10,100,1000): test.jsonl's
                                      utterances with "bias" the N-phrase eval list
`bias` lists the names spoken in the utterance plus --num_distractors other names, shuffled. For
names, the last --heldout_names names of the (seed-shuffled) list are spoken only in dev and test,
so a model can be evaluated on names it never heard in training. Contacts lines also carry
"entities", the names spoken (in order); an eval list holds exactly N distinct phrases: the
utterance's entities and distractors from every entity plus extra invented names spoken nowhere,
drawn by (seed, utterance), the distractors of a shorter list being those of a longer one.
Transcripts are lower case without punctuation (the tasks' normalization).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import string
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np
import soundfile
from scipy import signal

SAMPLE_RATE = 16_000
SPLITS = ("train", "dev", "test")

RARE_NAMES = (
    "zanzibar quimby", "oksana vartanian", "thaddeus okonkwo", "ingrid fjellstad", "bartholomew xylander",
    "priyamvada ranganathan", "eulalia brzezinski", "ottoline vasquez", "leopold achterberg", "marisol quintanilla",
    "fitzgerald oyelaran", "esperanza tkachenko", "ignatius pemberton", "wilhelmina zuckerkandl",
    "anastasia kowalczyk", "cornelius abernathy", "saoirse nakamura", "ezekiel vandermeer", "philippa okafor",
    "rasmus quaresma", "yevgenia hollingsworth", "lysander mbatha", "theodora szymanski", "perpetua lindqvist",
    "casimir delacroix", "henrietta oyamada", "barnaby kristiansen", "seraphina udeh", "octavian petrossian",
    "clementine abiodun", "mortimer zielinski", "florentyna mackay", "quentin ravensworth", "beatrix oduya",
    "evander kasprzak", "rosalind tamura", "ulysses brightwater", "dagny ferreira", "horatio nyberg",
    "imogen castellanos",
)

TEMPLATES = (
    "{a} will meet us at the station tomorrow morning",
    "please call {a} before the meeting starts",
    "i talked to {a} and {b} about the new project",
    "the letter from {a} arrived on monday",
    "have you seen {a} since the summer",
    "{a} says the weather will be cold this week",
    "we are having dinner with {a} on friday night",
    "my brother works with {a} at the hospital",
    "could you send the report to {a} and {b} today",
    "{a} bought a small house near the river",
    "the teacher asked {a} to read the first page",
    "i think {a} left the keys in the kitchen",
    "{a} and {b} won the game last night",
    "tell {a} that the train is running late",
    "the weather will be cold this week",
    "please close the door when you leave",
    "we are going to the market after lunch",
    "the children played in the garden all afternoon",
    "i will call you back in ten minutes",
    "the train to the city leaves at seven",
)

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SPEED_RANGE = (130, 200)  # words per minute (espeak-ng -s)
PITCH_RANGE = (30, 70)  # 0..99 (espeak-ng -p)
AMPLITUDE_RANGE = (50, 90)  # 0..200 (espeak-ng -a; 100, its default, can reach full scale)


@dataclasses.dataclass(frozen=True)
class UtteranceSpec:
  """What to say and how: everything needed to render one utterance."""
  id: str
  split: str
  text: str
  names: tuple[str, ...]
  bias: tuple[str, ...]
  voice: str
  speed: int
  pitch: int
  amplitude: int


def _split_sizes(num_utterances: int, dev_fraction: float, test_fraction: float) -> dict[str, int]:
  if num_utterances < 3:
    raise ValueError(f"--num_utterances must be at least 3 (one per split), got {num_utterances}.")
  for flag, value in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
    if not 0.0 < value < 0.5:
      raise ValueError(f"--{flag} must be in (0, 0.5), got {value}.")
  dev = max(1, round(num_utterances * dev_fraction))
  test = max(1, round(num_utterances * test_fraction))
  return {"train": num_utterances - dev - test, "dev": dev, "test": test}


def plan_corpus(num_utterances: int, seed: int, dev_fraction: float = 0.1, test_fraction: float = 0.1,
                num_distractors: int = 5, heldout_names: int = 8) -> list[UtteranceSpec]:
  """The corpus as text and voice settings; a pure function of its arguments."""
  if not 0 <= heldout_names < len(RARE_NAMES) - 1:
    raise ValueError(f"--heldout_names must be in [0, {len(RARE_NAMES) - 2}], got {heldout_names}.")
  if not 0 <= num_distractors <= len(RARE_NAMES) - 2:
    raise ValueError(f"--num_distractors must be in [0, {len(RARE_NAMES) - 2}], got {num_distractors}.")
  rng = np.random.default_rng(seed)
  sizes = _split_sizes(num_utterances, dev_fraction, test_fraction)
  splits = np.array([s for s in SPLITS for _ in range(sizes[s])])
  rng.shuffle(splits)
  names = [RARE_NAMES[i] for i in rng.permutation(len(RARE_NAMES))]
  seen_names = names[:len(names) - heldout_names]
  specs = []
  for index, split in enumerate(splits):
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    pool = seen_names if split == "train" else names
    count = template.count("{")
    spoken = tuple(pool[i] for i in rng.choice(len(pool), size=count, replace=False))
    text = template.format(**dict(zip("ab", spoken)))
    others = [n for n in names if n not in spoken]
    distractors = [others[i] for i in rng.choice(len(others), size=num_distractors, replace=False)]
    bias = [*spoken, *distractors]
    bias = tuple(bias[i] for i in rng.permutation(len(bias)))
    voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
    speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    amplitude = int(rng.integers(AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1] + 1))
    specs.append(UtteranceSpec(f"synth-{index:05d}", str(split), text, spoken, bias, voice, speed, pitch, amplitude))
  return specs


# ----------------------------------------------------------------------------- contacts corpus (--corpus=contacts)

# Carrier templates: {person}, {song} and {artist} are invented entity names, {message} one of MESSAGES.
PERSON_TEMPLATES = (
    "call {person}",
    "call {person} on the mobile",
    "call {person} at home",
    "send a message to {person} saying {message}",
    "send a text to {person} saying {message}",
    "remind me to email {person} tomorrow",
    "set up a meeting with {person} next week",
    "start a video call with {person}",
)
MUSIC_TEMPLATES = (
    "play {song} by {artist}",
    "play some music by {artist}",
    "play {song}",
    "add {song} to my playlist",
    "play the new album by {artist}",
)
ENTITY_TEMPLATES = PERSON_TEMPLATES + MUSIC_TEMPLATES
MESSAGES = (
    "i am running late", "see you soon", "call me back when you can", "dinner is ready", "happy birthday",
    "i will be home at six", "the meeting moved to friday", "can you pick up some milk", "thanks for everything",
    "good luck today", "i left my keys at work", "where are you", "let us meet at the station",
    "the train is delayed", "see you at lunch",
)
# Utterances with no entity (for unbiased WER and false alarms); some are close to the templates.
NO_ENTITY_SENTENCES = (
    "what is the weather like today", "set an alarm for seven in the morning", "turn off the lights in the kitchen",
    "play some music", "call my mother", "send a message saying i am running late", "remind me to buy milk tomorrow",
    "what time is it", "call the office", "play the next song", "turn the volume up", "read my new messages",
    "how long is the drive to work", "stop the music", "set a timer for ten minutes",
)
# Invented words are none of these (nor any word of the sentences above).
COMMON_WORDS = frozenset("""
a about after again all also am an and any are as at back be because been before being but by came can come could
day did do does down each even first for from get give go good got had has have he her here him his home how i if in
into is it its just know last left like little long look made make man many may me more most much must my never new
next no not now of off old on one only or other our out over own people play right said same say see she should show
so some still such take tell than that the their them then there these they thing think this those through time to
too two under up us use very want was way we well were what when where which while who why will with work would year
you your name song music love baby night light dance girl boy heart dream fire rain river sun moon star road home
sara maria anna lena nina tina mina lina dana nora rosa vera lara mara tara kara david daniel peter paul mark
""".split()) | {word for sentence in ENTITY_TEMPLATES + MESSAGES + NO_ENTITY_SENTENCES
                for word in sentence.replace("{", " ").replace("}", " ").split()}
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch")
CLUSTER_ONSETS = ("br", "dr", "fl", "gr", "kr", "pr", "st", "tr")  # an onset is one of these with CLUSTER_PROBABILITY
CLUSTER_PROBABILITY = 0.15
NUCLEI = ("a", "a", "e", "e", "i", "i", "o", "o", "u", "ai", "ei", "ou")  # simple vowels twice as likely
CODAS = ("n", "r", "l", "s", "m", "k")  # only a word's last syllable has one, with CODA_PROBABILITY
CODA_PROBABILITY = 0.5
ENTITY_KINDS = ("person", "song", "artist")
WORDS_PER_PHRASE = {"person": (2, 2), "song": (1, 3), "artist": (1, 2)}  # (fewest, most) invented words
CONTACT_ACCENTS = ACCENTS + ("en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
CONTACT_VARIANTS = VARIANTS + ("klatt", "klatt3", "andy", "annie", "edward", "john")
EVAL_POOL_MARGIN = 100  # the eval distractor pool holds at least max(eval_list_sizes) + this many phrases
CONTACT_DEFAULTS = {"num_utterances": 1500, "dev_fraction": 1 / 15, "test_fraction": 1 / 15}
NAMES_DEFAULTS = {"num_utterances": 300, "dev_fraction": 0.1, "test_fraction": 0.1}


def invent_word(rng: np.random.Generator, syllables: int) -> str:
  """A pronounceable invented word: `syllables` consonant-vowel syllables, the last maybe closed by a
  consonant (e.g. "tarisen", "mokabu")."""
  parts = []
  for _ in range(syllables):
    onsets = CLUSTER_ONSETS if rng.random() < CLUSTER_PROBABILITY else ONSETS
    parts.append(onsets[rng.integers(len(onsets))] + NUCLEI[rng.integers(len(NUCLEI))])
  if rng.random() < CODA_PROBABILITY:
    parts.append(CODAS[rng.integers(len(CODAS))])
  return "".join(parts)


class _WordSource:
  """Invented words, each new (never one given before, nor a COMMON_WORDS word)."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self._used = set(COMMON_WORDS)

  def phrase(self, kind: str) -> str:
    fewest, most = WORDS_PER_PHRASE[kind]
    words = []
    for _ in range(int(self._rng.integers(fewest, most + 1))):
      word = invent_word(self._rng, int(self._rng.choice((2, 3), p=(0.7, 0.3))))
      while word in self._used:
        word = invent_word(self._rng, int(self._rng.choice((2, 3), p=(0.7, 0.3))))
      self._used.add(word)
      words.append(word)
    return " ".join(words)


@dataclasses.dataclass(frozen=True)
class ContactsPlan:
  """The contacts corpus as text: utterances, entities and the eval bias lists.

  specs: every utterance (UtteranceSpec.names: the entities it speaks, in order; bias: the
    train/dev/test manifests' list).
  entities: {kind: names} for ENTITY_KINDS; seen: those train may speak; heldout: those only
    dev and test speak (never in a train transcript or train bias list).
  extras: invented names spoken nowhere, only eval distractors.
  eval_bias: {N: {utterance id: bias list of exactly N distinct phrases}} for the test utterances.
  """
  specs: tuple[UtteranceSpec, ...]
  entities: dict[str, tuple[str, ...]]
  seen: frozenset[str]
  heldout: frozenset[str]
  extras: tuple[str, ...]
  eval_bias: dict[int, dict[str, tuple[str, ...]]]

  @property
  def eval_pool(self) -> tuple[str, ...]:
    """Every phrase an eval list may hold: all entities, then the extras."""
    return tuple(n for kind in ENTITY_KINDS for n in self.entities[kind]) + self.extras


def _template_fields(template: str) -> list[str]:
  return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _shuffled(rng: np.random.Generator, phrases: Sequence[str]) -> tuple[str, ...]:
  return tuple(phrases[i] for i in rng.permutation(len(phrases)))


def plan_contacts_corpus(num_utterances: int = 1500, seed: int = 0, dev_fraction: float = 1 / 15,
                         test_fraction: float = 1 / 15, num_distractors: int = 5, num_contacts: int = 400,
                         num_songs: int = 150, num_artists: int = 100, heldout_fraction: float = 0.25,
                         no_entity_fraction: float = 0.15,
                         eval_list_sizes: Sequence[int] = (10, 100, 1000)) -> ContactsPlan:
  """The contacts corpus (voice commands naming invented people, songs and artists); a pure function
  of its arguments.

  Every invented word is new (no two entities share a word, none is a template or common word).
  The last `heldout_fraction` of each kind's (seeded) list is held out: train utterances speak, and
  list as distractors, only seen entities; dev and test utterances with an entity speak only held-out
  ones. `no_entity_fraction` of each split speaks no entity. The eval lists of a test utterance are
  its entities plus distractors drawn from the eval pool (every entity and `extras`, spoken nowhere,
  so the pool holds max(eval_list_sizes) + EVAL_POOL_MARGIN phrases) in one order fixed by (seed,
  utterance index): the distractors of a shorter list are those of a longer one.
  """
  if seed < 0:
    raise ValueError(f"--seed must be non-negative, got {seed}.")
  sizes = _split_sizes(num_utterances, dev_fraction, test_fraction)
  for flag, value in (("num_contacts", num_contacts), ("num_songs", num_songs), ("num_artists", num_artists)):
    if value < 2:
      raise ValueError(f"--{flag} must be at least 2 (one seen, one held out), got {value}.")
  counts = {"person": num_contacts, "song": num_songs, "artist": num_artists}
  heldout_counts = {kind: round(count * heldout_fraction) for kind, count in counts.items()}
  if not 0.0 < heldout_fraction < 1.0 or any(not 0 < n < counts[k] for k, n in heldout_counts.items()):
    raise ValueError(f"--heldout_fraction must leave each kind of entity (contacts {num_contacts}, songs {num_songs}, "
                     f"artists {num_artists}) at least one seen and one held-out name, got {heldout_fraction}.")
  if not 0.0 <= no_entity_fraction < 1.0:
    raise ValueError(f"--no_entity_fraction must be in [0, 1), got {no_entity_fraction}.")
  seen_count = sum(counts.values()) - sum(heldout_counts.values())
  most_spoken = max(len([f for f in _template_fields(t) if f != "message"]) for t in ENTITY_TEMPLATES)
  if not 0 <= num_distractors <= seen_count - most_spoken:
    raise ValueError(f"--num_distractors must be in [0, {seen_count - most_spoken}] (seen entities less the most "
                     f"one utterance speaks), got {num_distractors}.")
  eval_list_sizes = tuple(eval_list_sizes)
  if (not eval_list_sizes or len(set(eval_list_sizes)) != len(eval_list_sizes)
      or any(not isinstance(n, (int, np.integer)) or n < most_spoken for n in eval_list_sizes)):
    raise ValueError(f"--eval_list_sizes must be distinct integers, each at least {most_spoken} (the most entities "
                     f"one utterance speaks), got {list(eval_list_sizes)}.")

  words = _WordSource(np.random.default_rng([seed, 0]))
  entities = {kind: tuple(words.phrase(kind) for _ in range(counts[kind])) for kind in ENTITY_KINDS}
  num_extras = max(0, max(eval_list_sizes) + EVAL_POOL_MARGIN - sum(counts.values()))
  extras_rng = np.random.default_rng([seed, 1])
  kind_shares = np.array([counts[k] for k in ENTITY_KINDS], float) / sum(counts.values())
  extras = tuple(words.phrase(ENTITY_KINDS[extras_rng.choice(len(ENTITY_KINDS), p=kind_shares)])
                 for _ in range(num_extras))
  seen = {kind: names[:len(names) - heldout_counts[kind]] for kind, names in entities.items()}
  heldout = {kind: names[len(names) - heldout_counts[kind]:] for kind, names in entities.items()}
  all_seen = [n for kind in ENTITY_KINDS for n in seen[kind]]
  all_entities = [n for kind in ENTITY_KINDS for n in entities[kind]]

  rng = np.random.default_rng([seed, 2])
  labels = []  # (split, speaks an entity)
  for split in SPLITS:
    silent = round(sizes[split] * no_entity_fraction)
    labels += [(split, False)] * silent + [(split, True)] * (sizes[split] - silent)
  labels = [labels[i] for i in rng.permutation(len(labels))]
  specs = []
  for index, (split, with_entity) in enumerate(labels):
    spoken: tuple[str, ...] = ()
    if with_entity:
      template = ENTITY_TEMPLATES[rng.integers(len(ENTITY_TEMPLATES))]
      pools = seen if split == "train" else heldout
      values = {}
      for field in _template_fields(template):
        values[field] = (MESSAGES[rng.integers(len(MESSAGES))] if field == "message"
                         else pools[field][rng.integers(len(pools[field]))])
      text = template.format(**values)
      spoken = tuple(values[f] for f in _template_fields(template) if f != "message")
    else:
      text = NO_ENTITY_SENTENCES[rng.integers(len(NO_ENTITY_SENTENCES))]
    others = [n for n in (all_seen if split == "train" else all_entities) if n not in spoken]
    distractors = [others[i] for i in rng.choice(len(others), size=num_distractors, replace=False)]
    bias = _shuffled(rng, [*spoken, *distractors])
    accent = CONTACT_ACCENTS[rng.integers(len(CONTACT_ACCENTS))]
    voice = f"{accent}+{CONTACT_VARIANTS[rng.integers(len(CONTACT_VARIANTS))]}"
    speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    amplitude = int(rng.integers(AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1] + 1))
    specs.append(UtteranceSpec(f"contacts-{index:05d}", split, text, spoken, bias, voice, speed, pitch, amplitude))

  pool = tuple(all_entities) + extras
  eval_bias: dict[int, dict[str, tuple[str, ...]]] = {n: {} for n in eval_list_sizes}
  for index, spec in enumerate(specs):
    if spec.split != "test":
      continue
    order = np.random.default_rng([seed, 3, index]).permutation(len(pool))
    distractors = [pool[i] for i in order if pool[i] not in spec.names]
    for n in eval_list_sizes:
      eval_bias[n][spec.id] = _shuffled(np.random.default_rng([seed, 4, index, n]),
                                        [*spec.names, *distractors[:n - len(spec.names)]])
  return ContactsPlan(tuple(specs), entities, frozenset(all_seen), frozenset(all_entities) - frozenset(all_seen),
                      extras, eval_bias)


def require_espeak() -> str:
  """The espeak-ng executable, or a clear error saying how to install it."""
  path = shutil.which("espeak-ng")
  if path is None:
    raise RuntimeError("espeak-ng is not installed (not on PATH); run `make` (it installs espeak-ng with apt) or "
                       "`sudo apt-get install -y espeak-ng`.")
  return path


def synthesize(text: str, voice: str, speed: int, pitch: int, amplitude: int = 100) -> tuple[np.ndarray, int]:
  """espeak-ng's rendering of `text`: (float32 [samples] in [-1, 1], sample rate)."""
  with tempfile.TemporaryDirectory() as tmp:
    wav = os.path.join(tmp, "speech.wav")
    command = [require_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude), "-w", wav, text]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not os.path.exists(wav):
      raise RuntimeError(f"espeak-ng failed (voice {voice!r}) on {text!r}: {result.stderr.strip()}")
    audio, rate = soundfile.read(wav, dtype="float32", always_2d=False)
  if audio.ndim != 1 or audio.size == 0:
    raise RuntimeError(f"espeak-ng produced no mono audio for {text!r} (shape {audio.shape}).")
  return audio, int(rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
  """audio [samples] at from_rate -> [ceil(samples * to_rate / from_rate)] at to_rate (polyphase, anti-aliased)."""
  if from_rate == to_rate:
    return audio.astype(np.float32)
  common = math.gcd(from_rate, to_rate)
  return signal.resample_poly(audio.astype(np.float64), to_rate // common, from_rate // common).astype(np.float32)


def render(spec: UtteranceSpec, audio_dir: str) -> float:
  """Writes audio_dir/<id>.wav (16 kHz mono PCM16); returns its duration in seconds."""
  audio, rate = synthesize(spec.text, spec.voice, spec.speed, spec.pitch, spec.amplitude)
  audio = np.clip(resample(audio, rate, SAMPLE_RATE), -1.0, 32767 / 32768)
  soundfile.write(os.path.join(audio_dir, f"{spec.id}.wav"), audio, SAMPLE_RATE, subtype="PCM_16")
  return audio.size / SAMPLE_RATE


def _render_star(args: tuple[UtteranceSpec, str]) -> float:
  return render(*args)


def render_all(specs: Sequence[UtteranceSpec], output_dir: str, workers: int) -> list[float]:
  """Renders every spec to output_dir/audio/<id>.wav (in parallel with workers > 1); their durations (s)."""
  audio_dir = os.path.join(output_dir, "audio")
  os.makedirs(audio_dir, exist_ok=True)
  jobs = [(spec, audio_dir) for spec in specs]
  if workers <= 1:
    return [_render_star(job) for job in jobs]
  with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(_render_star, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def make_corpus(output_dir: str, num_utterances: int = 300, seed: int = 0, workers: int = 4,
                dev_fraction: float = 0.1, test_fraction: float = 0.1, num_distractors: int = 5,
                heldout_names: int = 8) -> dict[str, dict[str, float]]:
  """Renders the corpus and writes the manifests; returns {split: {"utterances", "seconds"}}."""
  require_espeak()
  specs = plan_corpus(num_utterances, seed, dev_fraction, test_fraction, num_distractors, heldout_names)
  durations = render_all(specs, output_dir, workers)
  summary = {}
  for split in SPLITS:
    rows = [(spec, seconds) for spec, seconds in zip(specs, durations) if spec.split == split]
    with open(os.path.join(output_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for spec, _ in rows:
        f.write(json.dumps({"audio": f"audio/{spec.id}.wav", "text": spec.text, "id": spec.id,
                            "bias": list(spec.bias)}) + "\n")
    summary[split] = {"utterances": len(rows), "seconds": float(sum(seconds for _, seconds in rows))}
  return summary


def _manifest_line(spec: UtteranceSpec, bias: Sequence[str]) -> str:
  return json.dumps({"audio": f"audio/{spec.id}.wav", "text": spec.text, "id": spec.id, "bias": list(bias),
                     "entities": list(spec.names)}) + "\n"


def eval_manifest_name(size: int) -> str:
  """The eval manifest whose bias lists hold `size` phrases: test_n<size>.jsonl."""
  return f"test_n{size}.jsonl"


def make_contacts_corpus(output_dir: str, num_utterances: int = 1500, seed: int = 0, workers: int = 4,
                         **plan_flags) -> tuple[dict[str, dict[str, float]], ContactsPlan]:
  """Renders the contacts corpus (plan_contacts_corpus(num_utterances, seed, **plan_flags)) and writes
  train/dev/test.jsonl and one test_n<N>.jsonl per eval list size (the test utterances, bias: the
  N-phrase eval list). Manifest lines also carry "entities", the names spoken. Returns
  ({split or eval manifest stem: {"utterances", "seconds"}}, the plan)."""
  require_espeak()
  plan = plan_contacts_corpus(num_utterances, seed, **plan_flags)
  durations = dict(zip((spec.id for spec in plan.specs), render_all(plan.specs, output_dir, workers)))
  manifests = {split: {spec.id: spec.bias for spec in plan.specs if spec.split == split} for split in SPLITS}
  manifests |= {eval_manifest_name(n)[:-len(".jsonl")]: lists for n, lists in plan.eval_bias.items()}
  specs = {spec.id: spec for spec in plan.specs}
  summary = {}
  for stem, lists in manifests.items():
    with open(os.path.join(output_dir, f"{stem}.jsonl"), "w", encoding="utf-8") as f:
      for ident, bias in lists.items():
        f.write(_manifest_line(specs[ident], bias))
    summary[stem] = {"utterances": len(lists), "seconds": float(sum(durations[i] for i in lists))}
  return summary, plan


def contacts_entity_summary(plan: ContactsPlan) -> str:
  """One line: how many entities are seen / held out, how many of each are spoken, the eval pool's size."""
  spoken = {split: {n for spec in plan.specs if spec.split == split for n in spec.names} for split in SPLITS}
  return (f"entities: {len(plan.seen)} seen ({len(spoken['train'])} spoken in train), {len(plan.heldout)} held out "
          f"({len(spoken['dev'] | spoken['test'])} spoken in dev/test); eval distractor pool {len(plan.eval_pool)} "
          f"phrases ({len(plan.extras)} never spoken)")


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--corpus", choices=("names", "contacts"), default="names",
                      help="names: sentences with RARE_NAMES; contacts: voice commands with invented entities")
  parser.add_argument("--num_utterances", type=int, default=None, help="default: 300 (names), 1500 (contacts)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="processes rendering in parallel (1: none)")
  parser.add_argument("--dev_fraction", type=float, default=None, help="default: 0.1 (names), 1/15 (contacts)")
  parser.add_argument("--test_fraction", type=float, default=None, help="default: 0.1 (names), 1/15 (contacts)")
  parser.add_argument("--num_distractors", type=int, default=5, help="names in `bias` that are not spoken")
  parser.add_argument("--heldout_names", type=int, default=None, help="names: names spoken only in dev and test "
                      "(default 8)")
  contacts = parser.add_argument_group("--corpus=contacts only")
  contacts.add_argument("--num_contacts", type=int, default=None, help="invented person names (default 400)")
  contacts.add_argument("--num_songs", type=int, default=None, help="invented song titles (default 150)")
  contacts.add_argument("--num_artists", type=int, default=None, help="invented artist names (default 100)")
  contacts.add_argument("--heldout_fraction", type=float, default=None,
                        help="of each kind of entity, spoken only in dev and test (default 0.25)")
  contacts.add_argument("--no_entity_fraction", type=float, default=None,
                        help="of each split, utterances with no entity (default 0.15)")
  contacts.add_argument("--eval_list_sizes", default=None,
                        help="comma-separated sizes N of the test_n<N>.jsonl bias lists (default 10,100,1000)")
  return parser


CONTACTS_ONLY = ("num_contacts", "num_songs", "num_artists", "heldout_fraction", "no_entity_fraction",
                 "eval_list_sizes")


def _print_split(name: str, stats: dict[str, float], output_dir: str) -> None:
  print(f"{name:5s} {stats['utterances']:6d} utterances {stats['seconds'] / 60:8.2f} min  "
        f"{os.path.join(output_dir, name + '.jsonl')}")


def _contacts_flags(args: argparse.Namespace) -> dict:
  """The plan_contacts_corpus arguments the command line sets."""
  if args.heldout_names is not None:
    raise ValueError("--heldout_names is for --corpus=names; the contacts corpus holds out --heldout_fraction.")
  flags = {name: getattr(args, name) for name in CONTACTS_ONLY[:-1] if getattr(args, name) is not None}
  if args.eval_list_sizes is not None:
    try:
      flags["eval_list_sizes"] = tuple(int(n) for n in args.eval_list_sizes.split(","))
    except ValueError:
      raise ValueError(f"--eval_list_sizes must be comma-separated integers, got {args.eval_list_sizes!r}.") from None
  return flags


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _build_parser().parse_args(argv)
  defaults = CONTACT_DEFAULTS if args.corpus == "contacts" else NAMES_DEFAULTS
  num_utterances, dev_fraction, test_fraction = (
      defaults[name] if getattr(args, name) is None else getattr(args, name)
      for name in ("num_utterances", "dev_fraction", "test_fraction"))
  try:
    if args.corpus == "contacts":
      summary, plan = make_contacts_corpus(args.output_dir, num_utterances, args.seed, args.workers,
                                           dev_fraction=dev_fraction, test_fraction=test_fraction,
                                           num_distractors=args.num_distractors, **_contacts_flags(args))
    else:
      given = [f"--{name}" for name in CONTACTS_ONLY if getattr(args, name) is not None]
      if given:
        raise ValueError(f"{given[0]} is for --corpus=contacts only.")
      heldout_names = 8 if args.heldout_names is None else args.heldout_names
      summary = make_corpus(args.output_dir, num_utterances, args.seed, args.workers, dev_fraction, test_fraction,
                            args.num_distractors, heldout_names)
  except (ValueError, RuntimeError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  for split in SPLITS:
    _print_split(split, summary[split], args.output_dir)
  total = sum(summary[split]["utterances"] for split in SPLITS)
  seconds = sum(summary[split]["seconds"] for split in SPLITS)
  if args.corpus == "contacts":
    for size in plan.eval_bias:
      stem = eval_manifest_name(size)[:-len(".jsonl")]
      path = os.path.join(args.output_dir, stem + ".jsonl")
      print(f"{stem}: the test utterances, bias lists of {size} phrases  {path}")
    print(contacts_entity_summary(plan))
  print(f"total {total:6d} utterances {seconds / 60:8.2f} min ({seconds:.1f} s) of 16 kHz audio in "
        f"{os.path.join(args.output_dir, 'audio')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
