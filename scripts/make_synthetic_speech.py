r"""A small real-speech corpus for the Transducer and biasing experiments, synthesized with espeak-ng.

  python scripts/make_synthetic_speech.py --output_dir=data/synth_speech
  python scripts/make_synthetic_speech.py --output_dir=/tmp/s --num_utterances=20 --seed=1 --workers=2

Sentences fill templates of common words with rare, invented names (RARE_NAMES, e.g.
"zanzibar quimby"); some templates have no name, for measuring false biasing. Each utterance is
spoken by a random espeak-ng voice (accent + variant), speed, pitch and loudness, all drawn from --seed,
so the corpus (text and audio bytes) is a function of the flags. espeak-ng writes 22050 Hz;
the audio is resampled to 16 kHz (polyphase filter, scipy.signal.resample_poly) and written
as mono 16-bit wav.

Written under --output_dir:
  audio/<id>.wav                      16 kHz mono PCM16
  train.jsonl, dev.jsonl, test.jsonl  manifests (memlm_jax.data.speech): one line per utterance,
                                      {"audio": "audio/<id>.wav", "text", "id", "bias"}
`bias` lists the names spoken in the utterance plus --num_distractors other names, shuffled.
The last --heldout_names names of the (seed-shuffled) list are spoken only in dev and test,
so a model can be evaluated on names it never heard in training.
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


def make_corpus(output_dir: str, num_utterances: int = 300, seed: int = 0, workers: int = 4,
                dev_fraction: float = 0.1, test_fraction: float = 0.1, num_distractors: int = 5,
                heldout_names: int = 8) -> dict[str, dict[str, float]]:
  """Renders the corpus and writes the manifests; returns {split: {"utterances", "seconds"}}."""
  require_espeak()
  specs = plan_corpus(num_utterances, seed, dev_fraction, test_fraction, num_distractors, heldout_names)
  audio_dir = os.path.join(output_dir, "audio")
  os.makedirs(audio_dir, exist_ok=True)
  jobs = [(spec, audio_dir) for spec in specs]
  if workers <= 1:
    durations = [_render_star(job) for job in jobs]
  else:
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
      durations = list(pool.map(_render_star, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
  summary = {}
  for split in SPLITS:
    rows = [(spec, seconds) for spec, seconds in zip(specs, durations) if spec.split == split]
    with open(os.path.join(output_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for spec, _ in rows:
        f.write(json.dumps({"audio": f"audio/{spec.id}.wav", "text": spec.text, "id": spec.id,
                            "bias": list(spec.bias)}) + "\n")
    summary[split] = {"utterances": len(rows), "seconds": float(sum(seconds for _, seconds in rows))}
  return summary


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_utterances", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="processes rendering in parallel (1: none)")
  parser.add_argument("--dev_fraction", type=float, default=0.1)
  parser.add_argument("--test_fraction", type=float, default=0.1)
  parser.add_argument("--num_distractors", type=int, default=5, help="names in `bias` that are not spoken")
  parser.add_argument("--heldout_names", type=int, default=8, help="names spoken only in dev and test")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _build_parser().parse_args(argv)
  try:
    summary = make_corpus(args.output_dir, args.num_utterances, args.seed, args.workers, args.dev_fraction,
                          args.test_fraction, args.num_distractors, args.heldout_names)
  except (ValueError, RuntimeError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  total = sum(s["utterances"] for s in summary.values())
  seconds = sum(s["seconds"] for s in summary.values())
  for split, s in summary.items():
    print(f"{split:5s} {s['utterances']:6d} utterances {s['seconds'] / 60:8.2f} min  "
          f"{os.path.join(args.output_dir, split + '.jsonl')}")
  print(f"total {total:6d} utterances {seconds / 60:8.2f} min ({seconds:.1f} s) of 16 kHz audio in "
        f"{os.path.join(args.output_dir, 'audio')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
