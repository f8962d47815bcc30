r"""Synthetic long documents whose later text is predictable only by remembering earlier text: corpora on
which a memory-augmented LM (Infini-attention, segments of 64-128 tokens) beats the same model without
memory, small enough for a tiny model trained on a CPU.

  python scripts/make_long_documents.py --corpus=lm --output_dir=data/long_docs
  python scripts/make_long_documents.py --corpus=summarization --output_dir=data/long_summaries
  python scripts/make_long_documents.py --corpus=lm --output_dir=/tmp/ld --num_train=20 --num_validation=2 \
      --num_test=2 --words_per_document=800 --seed=3 --overwrite

Every document introduces a cast of --num_entities people, each in a definition block of three sentences
(the role first, then pet and food in either order):

  Vorla Tesk is a baker from Amberlow. Vorla Tesk keeps a grey cat named Pimeru. Vorla Tesk likes plum
  cake more than anything.

Names (people's and pets') are invented from syllables, so no prior guesses them; occupations, towns,
pets, colours and foods come from small closed sets, and no two people of a document share an
occupation. Between and after the definitions run template filler sentences (weather, market talk,
nameless townsfolk) that never name the cast, and --num_distractors one-off people ("A potter named
Gorin Vask passed through on the way to the coast.") who are never defined nor recalled. Back-reference
sentences recall a person's facts, each at least --min_reference_distance words (default 150: about
800 characters, more than one segment) after the previous mention of that person, definition or
reference, and at most twice that:

  Later that year, the baker from Amberlow, Vorla Tesk, walked down to the harbour.
  Pimeru, the grey cat of Vorla Tesk, slept all day by the fire.

A document is one line of sentences joined by single spaces: a SentencePiece model, trained on lines,
has no piece for a newline (its spm_input.txt holds no newline to learn).

--corpus=lm: the cast is defined within the first 30% of the document, the rest recalls it. Writes
  OUTPUT_DIR/{train,validation,test}/doc_00000.txt ...  one document per file (UTF-8, one line: the text
                                                       of lm_document and a newline), the layout of
                                                       long_document_tasks.text_directory_task
  OUTPUT_DIR/spm_input.txt                             every sentence of the train split, one per line
                                                       (input for scripts/train_spm.py --nolowercase)
--corpus=summarization: person i of n is defined in the i-th n-th of the document (so the first in
  its first third and the last in its last third for n >= 3); the summary names the cast in order of
  appearance with their roles (4 + 6n words for n >= 2: 28 for the default n = 4), leaving out the distractors:
  "The story follows Vorla Tesk, the baker from Amberlow; ...; and Kira Vell, the sailor from Millford."
  OUTPUT_DIR/{train,validation,test}.jsonl             {"text": document, "summary": summary} per line
Both write OUTPUT_DIR/corpus.json (the flags and the summary statistics).

Every invented word belongs to one split by a fixed hash (crc32 mod 10: 8 train, 1 validation, 1 test),
so validation and test documents name people and pets never seen in training, whatever the seed.
Document i of a split is drawn from np.random.default_rng([seed, split number, i]): the corpus is a
function of the flags, and a split's documents do not depend on the other splits' counts. The corpus
is written to a hidden temporary directory beside OUTPUT_DIR and renamed into place when complete; a
non-empty OUTPUT_DIR is refused unless --overwrite, which replaces only a directory this script wrote.

Importable: generate_document (the text with its cast, definition and reference spans), lm_document,
summarization_example, and back_references (the character spans of the recalled names, parsed back
from a document's text alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import string
import sys
import tempfile
import zlib
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
CORPORA = ("lm", "summarization")
DEFAULT_NUM_ENTITIES = {"lm": 6, "summarization": 4}
MAX_ENTITIES = 10  # cast and distractors each take a distinct occupation (20 of them)
MIN_WORDS_PER_DOCUMENT = 100
MAX_TO_MIN_DISTANCE = 2  # a person is recalled between d and 2d words after their previous mention
LM_DEFINITION_WINDOW = 0.3  # lm documents define their cast within this fraction of the words
METADATA_FILE = "corpus.json"

# Invented words: consonant-vowel syllables, maybe closed by a coda.
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh")
NUCLEI = ("a", "e", "i", "o", "u")
CODAS = ("n", "r", "l", "s", "k", "m", "sk", "nd", "th")
HELD_OUT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}  # crc32 % 10

OCCUPATIONS = ("baker", "smith", "sailor", "weaver", "potter", "miller", "carpenter", "fisher", "shepherd", "tailor",
               "brewer", "mason", "cooper", "healer", "farmer", "hunter", "scribe", "glassblower", "cobbler",
               "beekeeper")
TOWNS = ("Amberlow", "Stonebridge", "Millford", "Ashcombe", "Redwater", "Elmsworth", "Greyhaven", "Thornfield",
         "Oakhurst", "Brackenmoor", "Willowmere", "Highcliff")
PETS = ("cat", "dog", "goat", "parrot", "horse", "donkey", "owl", "hen", "pig", "rabbit", "ferret", "tortoise")
PET_COLORS = ("grey", "black", "white", "brown", "red", "spotted", "golden", "speckled")
FOODS = ("plum cake", "barley soup", "honey bread", "apple pie", "fish stew", "goat cheese", "pear tart",
         "onion soup", "roast chestnuts", "berry jam")

# Definition blocks: ROLE first, then PET and FOOD in either order. back_references parses these forms.
ROLE_DEFINITION = "{name} is {a_occupation} from {town}."
PET_DEFINITION = "{name} keeps {a_pet_color} {pet} named {pet_name}."
FOOD_DEFINITION = "{name} likes {food} more than anything."
_NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
_DEFINITION_PATTERNS = (
    re.compile(rf"(?P<name>{_NAME}) is an? (?P<occupation>[a-z]+) from (?P<town>[A-Z][a-z]+)\."),
    re.compile(rf"(?P<name>{_NAME}) keeps an? (?P<pet_color>[a-z]+) (?P<pet>[a-z]+) named (?P<pet_name>[A-Z][a-z]+)\."),
    re.compile(rf"(?P<name>{_NAME}) likes (?P<food>[a-z ]+) more than anything\."),
)
_SENTENCE = re.compile(r"\S[^.]*\.")  # no template holds a '.' before its end

# Back-references: every {name} and {pet_name} is the same person's; each template recalls facts that
# were stated only in that person's definition block.
REFERENCE_TEMPLATES = (
    "{time_ref}, the {occupation} from {town}, {name}, {event}.",
    "{time_ref}, {name}, the {occupation} from {town}, {event}.",
    "{name}'s {pet}, {pet_name}, {pet_event}.",
    "{pet_name}, the {pet_color} {pet} of {name}, {pet_event}.",
    "{name} shared some {food} with {pet_name} the {pet}.",
    "Everyone in {town} knew that {name} the {occupation} loved {food}.",
    "When people needed {a_occupation}, they sent for {name} of {town}.",
)
DISTRACTOR_TEMPLATES = (
    "{a_occupation} named {name} passed through on the way to the coast.",
    "{a_occupation} named {name} stopped at the inn for one night.",
    "{a_occupation} named {name} asked the way to {town} and left.",
)
FILLER_TEMPLATES = (
    "{time}, {weather}.",
    "{person} {action} {prep} {place}.",
    "{time}, {person} {action} {prep} {place}.",
    "{place} was {adjective} {time}.",
    "People at {place} talked about {topic}.",
    "Someone said that the road to {town} was {road_state}.",
    "{sound} somewhere {prep} {place}.",
    "{person} said that {topic} worried everyone in {town}.",
    "The {animals} gathered {prep} {place} {time}.",
    "Few people went out {time}, because {weather}.",
    "There was news from {town} about {topic}.",
    "{person} and {other_person} argued about {topic} {prep} {place}.",
    "The days grew {season}.",
    "A letter came from {town}, but nobody read it.",
    "{person} walked to {town} and back {time}.",
    "Smoke rose from the chimneys of {town} {time}.",
    "{person} {action}, and then went home.",
    "It was {a_adjective} day {prep} {place}.",
    "Nobody could remember a year like this one.",
    "{person} {action} while {weather}.",
)
SLOTS = {
    "time": ("in the morning", "at noon", "in the evening", "late at night", "before dawn", "after supper",
             "on market day", "at the end of the week", "during the long winter", "in the first days of spring"),
    "weather": ("the wind blew hard from the hills", "a cold rain fell on the roofs", "the sky was clear and pale",
                "thick fog lay over the fields", "snow covered the roads", "the sun was warm on the walls",
                "a storm came in from the sea", "the air smelled of smoke and rain"),
    "person": ("an old man", "a young woman", "a tired traveller", "a small boy", "a tall girl", "the innkeeper",
               "a quiet stranger", "the old widow", "a pair of merchants", "the village elder",
               "a group of children", "a lost pilgrim"),
    "action": ("carried a basket of apples", "sold some wool", "asked for directions", "told a long story",
               "sang a quiet song", "counted the coins twice", "swept the steps", "lit a small fire",
               "looked for a lost key", "waited for the coach", "repaired an old cart", "gathered firewood"),
    "place": ("the market", "the harbour", "the old bridge", "the mill pond", "the church", "the square", "the inn",
              "the orchard", "the crossroads", "the river bank", "the town gate", "the long road"),
    "prep": ("near", "behind", "beside", "at", "across from", "on the way to"),
    "adjective": ("quiet", "busy", "crowded", "empty", "cold", "noisy", "dark", "bright"),
    "topic": ("the price of bread", "the coming harvest", "the broken bridge", "the new tax", "a wolf in the forest",
              "the soldiers of the king", "a ship from the south", "the flooded road", "a strange light in the hills",
              "the old tower"),
    "road_state": ("muddy", "blocked by fallen trees", "safe again", "full of carts", "washed away",
                   "closed for the winter"),
    "sound": ("bells rang", "dogs barked", "someone laughed", "a door slammed", "the wind howled",
              "a cart rattled past"),
    "animals": ("sheep", "cattle", "gulls", "pigeons", "deer", "foxes"),
    "season": ("shorter and colder", "longer and warmer", "wet and grey", "dry and dusty"),
    "town": TOWNS,
    "time_ref": ("Later that year", "One cold morning", "Some weeks after that", "On the last day of the fair",
                 "Early the next spring", "That same evening", "Many days later", "Near the end of the summer"),
    "event": ("walked down to the harbour", "sat for a long time by the old well", "came back late from the market",
              "mended the fence behind the house", "wrote a long letter to a friend", "sang an old song at the inn",
              "helped to rebuild the bridge", "lost a purse on the road", "won a prize at the fair",
              "stayed at home because of the rain"),
    "pet_event": ("slept all day by the fire", "ran off into the fields", "waited by the gate until dark",
                  "followed everyone to the market", "made a great deal of noise at night", "caught a cold in the rain",
                  "hid under the bed during the storm", "ate the bread that was meant for supper"),
}
ENTITY_FIELDS = ("name", "occupation", "town", "pet", "pet_color", "pet_name", "food")


@dataclasses.dataclass(frozen=True)
class Entity:
  """A person of the cast and the facts their definition block states."""
  name: str  # "First Last", both invented
  occupation: str
  town: str
  pet: str
  pet_color: str
  pet_name: str  # invented
  food: str


@dataclasses.dataclass(frozen=True)
class LongDocument:
  """A generated document and where its structure lies (character offsets into `text`)."""
  text: str
  entities: tuple[Entity, ...]  # the cast, in order of definition
  distractors: tuple[str, ...]  # people named once, never defined nor recalled
  definitions: tuple[tuple[int, int], ...]  # (start, end) of each entity's definition block
  references: tuple[tuple[int, int, int], ...]  # (start, end, entity index) of each back-reference sentence


@dataclasses.dataclass(frozen=True)
class BackReference:
  """A later mention of an invented name (a person's or a pet's) that a definition introduced."""
  start: int  # the mention's character span
  end: int
  mention: str  # the name as written, e.g. "Vorla Tesk" or "Pimeru"
  entity: str  # the person it belongs to (for a pet, its owner)
  definition_end: int  # end of the sentence that introduced `mention`
  sentence_start: int  # the span of the sentence holding the mention
  sentence_end: int


def held_out_split(word: str) -> str:
  """The one split whose documents may use this invented word (a fixed hash, independent of any seed)."""
  bucket = zlib.crc32(word.lower().encode("utf-8")) % 10
  return next(split for split, buckets in HELD_OUT_BUCKETS.items() if bucket in buckets)


def vocabulary() -> frozenset[str]:
  """Every word (lower case) that the templates and closed sets can write, names aside."""
  texts = [*SLOTS.values(), OCCUPATIONS, PETS, PET_COLORS, FOODS,
           (ROLE_DEFINITION, PET_DEFINITION, FOOD_DEFINITION), REFERENCE_TEMPLATES, DISTRACTOR_TEMPLATES,
           FILLER_TEMPLATES, ("a an",)]
  words = set()
  for group in texts:
    for text in group:
      text = re.sub(r"\{[a-z_]+\}", " ", text)
      words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
  return frozenset(words)


_VOCABULARY = vocabulary()


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _NameSource:
  """Invented, capitalized words of one split, never one given before nor a vocabulary word."""

  def __init__(self, rng: np.random.Generator, split: str):
    self._rng = rng
    self._split = split
    self._used = set(_VOCABULARY)

  def word(self, fewest: int, most: int, coda_probability: float) -> str:
    while True:
      syllables = int(self._rng.integers(fewest, most + 1))
      word = "".join(_choice(self._rng, ONSETS) + _choice(self._rng, NUCLEI) for _ in range(syllables))
      if self._rng.random() < coda_probability:
        word += _choice(self._rng, CODAS)
      if word not in self._used and held_out_split(word) == self._split:
        self._used.add(word)
        return word.capitalize()

  def person(self) -> str:
    return f"{self.word(2, 3, 0.3)} {self.word(1, 2, 0.8)}"

  def pet(self) -> str:
    return self.word(2, 3, 0.4)


def _fill(template: str, fields: dict[str, str], rng: np.random.Generator) -> str:
  """The template with its entity fields from `fields` and every other slot drawn from SLOTS."""
  values = {}
  for _, field, _, _ in string.Formatter().parse(template):
    if field is None or field in values:
      continue
    if field in fields:
      values[field] = fields[field]
    elif field.startswith("a_"):
      values[field] = _with_article(_choice(rng, SLOTS[field[2:]]))
    elif field == "other_person":  # follows {person} in its template
      values[field] = _choice(rng, [p for p in SLOTS["person"] if p != values["person"]])
    else:
      values[field] = _choice(rng, SLOTS[field])
  sentence = template.format(**values)
  return sentence[0].upper() + sentence[1:]


def _entity_fields(entity: Entity) -> dict[str, str]:
  fields = dataclasses.asdict(entity)
  fields["a_occupation"] = _with_article(entity.occupation)
  fields["a_pet_color"] = _with_article(entity.pet_color)
  return fields


def _definition_positions(rng: np.random.Generator, num_entities: int, words: int, spread: bool) -> list[int]:
  if spread:  # person i within the i-th n-th of the document, in its first three quarters
    return [int(words * (i + rng.uniform(0.05, 0.75)) / num_entities) for i in range(num_entities)]
  return sorted(int(p) for p in rng.uniform(0, LM_DEFINITION_WINDOW * words, num_entities))


def generate_document(rng: np.random.Generator, words_per_document: int = 1500, num_entities: int = 6,
                      split: str = "train", *, spread_definitions: bool = False, min_reference_distance: int = 150,
                      num_distractors: int | None = None) -> LongDocument:
  """One document of about `words_per_document` words (it ends with the sentence that reaches them).

  Args:
    rng: the only source of randomness.
    words_per_document: approximate length in whitespace-separated words.
    num_entities: people in the cast, 1..MAX_ENTITIES.
    split: whose held-out invented words to use (SPLITS).
    spread_definitions: define person i in the i-th n-th of the document (summarization) instead of
      all within its first 30% (lm).
    min_reference_distance: fewest words between a person's previous mention and a back-reference;
      each gap is drawn from [d, MAX_TO_MIN_DISTANCE * d].
    num_distractors: one-off people never defined nor recalled (default: num_entities; at most MAX_ENTITIES).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  num_distractors = num_entities if num_distractors is None else num_distractors
  if not 1 <= num_entities <= MAX_ENTITIES or not 0 <= num_distractors <= MAX_ENTITIES:
    raise ValueError(f"num_entities must be in [1, {MAX_ENTITIES}] and num_distractors in [0, {MAX_ENTITIES}], "
                     f"got {num_entities} and {num_distractors}.")
  if words_per_document < 1 or min_reference_distance < 1:
    raise ValueError("words_per_document and min_reference_distance must be positive, got "
                     f"{words_per_document} and {min_reference_distance}.")
  names = _NameSource(rng, split)
  occupations = [OCCUPATIONS[i] for i in rng.permutation(len(OCCUPATIONS))[:num_entities + num_distractors]]
  entities = tuple(Entity(name=names.person(), occupation=occupations[i], town=_choice(rng, TOWNS),
                          pet=_choice(rng, PETS), pet_color=_choice(rng, PET_COLORS), pet_name=names.pet(),
                          food=_choice(rng, FOODS)) for i in range(num_entities))
  distractors = tuple((names.person(), occupations[num_entities + i]) for i in range(num_distractors))
  definition_at = _definition_positions(rng, num_entities, words_per_document, spread_definitions)
  distractor_at = sorted(int(p) for p in rng.uniform(0, words_per_document, num_distractors))

  sentences: list[tuple[str, str, int]] = []  # (sentence, kind, entity index or -1)
  words = 0
  reference_due: dict[int, int] = {}  # entity -> earliest word position of its next back-reference
  defined = distracted = 0

  def emit(sentence: str, kind: str, entity: int = -1) -> None:
    nonlocal words
    sentences.append((sentence, kind, entity))
    words += len(sentence.split())

  def schedule(entity: int) -> None:
    low = min_reference_distance
    reference_due[entity] = words + int(rng.integers(low, MAX_TO_MIN_DISTANCE * low + 1))

  while defined < num_entities or words < words_per_document:
    if defined < num_entities and words >= definition_at[defined]:
      fields = _entity_fields(entities[defined])
      rest = [PET_DEFINITION, FOOD_DEFINITION]
      for template in [ROLE_DEFINITION, *(rest if rng.random() < 0.5 else rest[::-1])]:
        emit(template.format(**fields), "definition", defined)
      schedule(defined)
      defined += 1
      continue
    if distracted < num_distractors and words >= distractor_at[distracted]:
      name, occupation = distractors[distracted]
      emit(_fill(_choice(rng, DISTRACTOR_TEMPLATES), {"a_occupation": _with_article(occupation), "name": name},
                 rng), "distractor")
      distracted += 1
      continue
    due = [e for e, at in reference_due.items() if at <= words]
    if due:
      entity = min(due, key=lambda e: (reference_due[e], e))
      emit(_fill(_choice(rng, REFERENCE_TEMPLATES), _entity_fields(entities[entity]), rng), "reference", entity)
      schedule(entity)
      continue
    emit(_fill(_choice(rng, FILLER_TEMPLATES), {}, rng), "filler")

  return _assemble(sentences, entities, tuple(name for name, _ in distractors))


def _assemble(sentences: list[tuple[str, str, int]], entities: tuple[Entity, ...],
              distractors: tuple[str, ...]) -> LongDocument:
  """Joins the sentences by single spaces, recording where each definition block and reference lies."""
  offset = 0
  blocks: dict[int, list[int]] = {}
  references = []
  for sentence, kind, entity in sentences:
    start, offset = offset, offset + len(sentence)
    if kind == "definition":
      blocks.setdefault(entity, [start, offset])[1] = offset
    elif kind == "reference":
      references.append((start, offset, entity))
    offset += 1  # the space before the next sentence
  definitions = tuple(tuple(blocks[e]) for e in range(len(entities)))
  return LongDocument(" ".join(s for s, _, _ in sentences), entities, distractors, definitions, tuple(references))


def lm_document(rng: np.random.Generator, words_per_document: int = 1500, num_entities: int = 6,
                split: str = "train", min_reference_distance: int = 150) -> str:
  """The text of one --corpus=lm document (cast defined in its first 30%)."""
  return generate_document(rng, words_per_document, num_entities, split,
                           min_reference_distance=min_reference_distance).text


def summary(entities: Sequence[Entity]) -> str:
  """'The story follows A, the baker from Amberlow; B, ...; and C, ...' (4 + 6n words for n >= 2 people)."""
  parts = [f"{e.name}, the {e.occupation} from {e.town}" for e in entities]
  if len(parts) == 1:
    listed = parts[0]
  elif len(parts) == 2:
    listed = f"{parts[0]} and {parts[1]}"
  else:
    listed = "; ".join(parts[:-1]) + "; and " + parts[-1]
  return f"The story follows {listed}."


def summarization_example(rng: np.random.Generator, words_per_document: int = 1500, num_entities: int = 4,
                          split: str = "train", min_reference_distance: int = 150) -> dict[str, str]:
  """{"text": a document whose cast is defined across its whole length, "summary": summary(cast)}."""
  document = generate_document(rng, words_per_document, num_entities, split, spread_definitions=True,
                               min_reference_distance=min_reference_distance)
  return {"text": document.text, "summary": summary(document.entities)}


def sentence_spans(text: str) -> list[tuple[int, int]]:
  """The (start, end) character span of every sentence of a generated document."""
  return [match.span() for match in _SENTENCE.finditer(text)]


def parse_entities(text: str) -> tuple[Entity, ...]:
  """The cast, read from the definition blocks of a generated document's text, in order of definition."""
  facts: dict[str, dict[str, str]] = {}
  for start, end in sentence_spans(text):
    for pattern in _DEFINITION_PATTERNS:
      match = pattern.fullmatch(text, start, end)
      if match:
        facts.setdefault(match["name"], {}).update(match.groupdict())
  return tuple(Entity(**{f: fields.get(f, "") for f in ENTITY_FIELDS}) for fields in facts.values())


def back_references(text: str) -> list[BackReference]:
  """Every mention, outside the definition blocks, of a person's or pet's name after the sentence that
  introduced it, in text order; parsed from the text alone (the cast from the definition sentences).

  These are the spans a model can predict only by remembering the definitions: the filler and the
  distractors never use a cast member's words.
  """
  introduced: dict[str, tuple[str, int]] = {}  # mention -> (owner, end of its defining sentence)
  reference_sentences = []
  for start, end in sentence_spans(text):
    match = None
    for pattern in _DEFINITION_PATTERNS:
      match = pattern.fullmatch(text, start, end) or match
    if match is None:
      reference_sentences.append((start, end))
      continue
    introduced.setdefault(match["name"], (match["name"], end))
    if match.groupdict().get("pet_name"):
      introduced.setdefault(match["pet_name"], (match["name"], end))
  if not introduced:
    return []
  mention = re.compile(r"\b(" + "|".join(re.escape(m) for m in sorted(introduced, key=len, reverse=True)) + r")\b")
  found = []
  for start, end in reference_sentences:
    for match in mention.finditer(text, start, end):
      owner, definition_end = introduced[match[0]]
      if definition_end <= match.start():
        found.append(BackReference(match.start(), match.end(), match[0], owner, definition_end, start, end))
  return found


def word_distance(text: str, start: int, end: int) -> int:
  """Whitespace-separated words in text[start:end]."""
  return len(text[start:end].split())


# ---------------------------------------------------------------------------------------------- the CLI


@dataclasses.dataclass
class CorpusStats:
  """What the summary line reports."""
  documents: int = 0
  words: int = 0
  characters: int = 0
  references: int = 0
  reference_distance_sum: int = 0  # words from the defining sentence's end to the mention
  min_reference_distance: int | None = None
  summary_distance_sum: int = 0  # summarization: words from a summary fact's definition to the input's end
  summary_facts: int = 0

  def add(self, text: str) -> None:
    self.documents += 1
    self.words += len(text.split())
    self.characters += len(text)
    for reference in back_references(text):
      distance = word_distance(text, reference.definition_end, reference.start)
      self.references += 1
      self.reference_distance_sum += distance
      if self.min_reference_distance is None or distance < self.min_reference_distance:
        self.min_reference_distance = distance

  def line(self) -> str:
    mean = self.reference_distance_sum / max(self.references, 1)
    line = (f"{self.documents} documents, {self.words:,} words, {self.characters:,} characters; "
            f"{self.references:,} back-references, mean definition-to-reference distance {mean:.0f} words "
            f"(min {self.min_reference_distance or 0})")
    if self.summary_facts:
      line += f"; summary facts defined {self.summary_distance_sum / self.summary_facts:.0f} words before the end"
    return line


def check_flags(corpus: str, output_dir: str, counts: dict[str, int], words_per_document: int, num_entities: int,
                num_distractors: int, min_reference_distance: int, seed: int, overwrite: bool) -> None:
  """Raises ValueError naming the first bad flag; reads the file system, writes nothing."""
  if corpus not in CORPORA:
    raise ValueError(f"--corpus must be one of {CORPORA}, got {corpus!r}.")
  for split, count in counts.items():
    if count < 1:
      raise ValueError(f"--num_{split} must be positive, got {count}.")
  if words_per_document < MIN_WORDS_PER_DOCUMENT:
    raise ValueError(f"--words_per_document must be at least {MIN_WORDS_PER_DOCUMENT}, got {words_per_document}.")
  if not 1 <= num_entities <= MAX_ENTITIES:
    raise ValueError(f"--num_entities must be in [1, {MAX_ENTITIES}], got {num_entities}.")
  if not 0 <= num_distractors <= MAX_ENTITIES:
    raise ValueError(f"--num_distractors must be in [0, {MAX_ENTITIES}], got {num_distractors}.")
  if min_reference_distance < 1:
    raise ValueError(f"--min_reference_distance must be positive, got {min_reference_distance}.")
  if seed < 0:
    raise ValueError(f"--seed must be non-negative, got {seed}.")
  if not output_dir:
    raise ValueError("--output_dir is required.")
  if os.path.exists(output_dir):
    if not os.path.isdir(output_dir):
      raise ValueError(f"--output_dir {output_dir!r} exists and is not a directory.")
    if os.listdir(output_dir):
      if not overwrite:
        raise ValueError(f"--output_dir {output_dir!r} is not empty; pass --overwrite to replace it.")
      if not os.path.isfile(os.path.join(output_dir, METADATA_FILE)):
        raise ValueError(f"--overwrite replaces only a directory this script wrote (holding {METADATA_FILE}); "
                         f"{output_dir!r} holds other files.")


def document_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of document `index` of `split`."""
  return np.random.default_rng([seed, SPLITS.index(split), index])


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write(text)


def write_corpus(tmp_dir: str, corpus: str, counts: dict[str, int], words_per_document: int, num_entities: int,
                 num_distractors: int, min_reference_distance: int, seed: int) -> CorpusStats:
  """Writes the corpus's files (all but corpus.json) under tmp_dir; returns their statistics."""
  stats = CorpusStats()
  spread = corpus == "summarization"
  spm_lines = []
  for split in SPLITS:
    if corpus == "lm":
      os.makedirs(os.path.join(tmp_dir, split))
    examples = []
    for index in range(counts[split]):
      document = generate_document(document_rng(seed, split, index), words_per_document, num_entities, split,
                                   spread_definitions=spread, min_reference_distance=min_reference_distance,
                                   num_distractors=num_distractors)
      stats.add(document.text)
      if corpus == "lm":
        _write_text(os.path.join(tmp_dir, split, f"doc_{index:05d}.txt"), document.text + "\n")
        if split == "train":
          spm_lines.extend(document.text[start:end] for start, end in sentence_spans(document.text))
      else:
        examples.append(json.dumps({"text": document.text, "summary": summary(document.entities)}))
        end = len(document.text)
        stats.summary_distance_sum += sum(word_distance(document.text, block_end, end)
                                          for _, block_end in document.definitions)
        stats.summary_facts += len(document.definitions)
    if corpus == "summarization":
      _write_text(os.path.join(tmp_dir, f"{split}.jsonl"), "".join(line + "\n" for line in examples))
  if corpus == "lm":
    _write_text(os.path.join(tmp_dir, "spm_input.txt"), "".join(line + "\n" for line in spm_lines))
  return stats


def make_corpus(output_dir: str, corpus: str = "lm", counts: dict[str, int] | None = None,
                words_per_document: int = 1500, num_entities: int | None = None, num_distractors: int | None = None,
                min_reference_distance: int = 150, seed: int = 0, overwrite: bool = False) -> CorpusStats:
  """Checks the flags, writes the corpus to a temporary directory beside output_dir and renames it
  into place; returns its statistics."""
  counts = dict(counts or {"train": 1000, "validation": 50, "test": 50})
  num_entities = DEFAULT_NUM_ENTITIES.get(corpus, 1) if num_entities is None else num_entities
  num_distractors = num_entities if num_distractors is None else num_distractors
  check_flags(corpus, output_dir, counts, words_per_document, num_entities, num_distractors,
              min_reference_distance, seed, overwrite)
  output_dir = os.path.abspath(output_dir)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
  try:
    stats = write_corpus(tmp_dir, corpus, counts, words_per_document, num_entities, num_distractors,
                         min_reference_distance, seed)
    metadata = {"corpus": corpus, "seed": seed, "counts": counts, "words_per_document": words_per_document,
                "num_entities": num_entities, "num_distractors": num_distractors,
                "min_reference_distance": min_reference_distance, "summary": stats.line()}
    _write_text(os.path.join(tmp_dir, METADATA_FILE), json.dumps(metadata, indent=2) + "\n")
    if os.path.isdir(output_dir):
      shutil.rmtree(output_dir)  # empty, or written by this script (check_flags)
    os.rename(tmp_dir, output_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return stats


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--corpus", default="lm", help=f"one of {CORPORA}")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_train", type=int, default=1000)
  parser.add_argument("--num_validation", type=int, default=50)
  parser.add_argument("--num_test", type=int, default=50)
  parser.add_argument("--words_per_document", type=int, default=1500, help="approximate length of a document")
  parser.add_argument("--num_entities", type=int, default=None,
                      help=f"people in each cast (default {DEFAULT_NUM_ENTITIES})")
  parser.add_argument("--num_distractors", type=int, default=None,
                      help="one-off people per document, never recalled (default: --num_entities)")
  parser.add_argument("--min_reference_distance", type=int, default=150,
                      help="fewest words between a person's mentions")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overwrite", default=False, action=argparse.BooleanOptionalAction,
                      help="replace a non-empty --output_dir that this script wrote")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv = ["--no-overwrite" if a == "--nooverwrite" else a for a in argv]  # absl-style spelling too
  args = _build_parser().parse_args(argv)
  counts = {"train": args.num_train, "validation": args.num_validation, "test": args.num_test}
  try:
    stats = make_corpus(args.output_dir, args.corpus, counts, args.words_per_document, args.num_entities,
                        args.num_distractors, args.min_reference_distance, args.seed, args.overwrite)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"wrote {args.corpus} corpus to {args.output_dir}: {stats.line()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
