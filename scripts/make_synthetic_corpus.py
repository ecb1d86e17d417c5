#!/usr/bin/env python3
"""Speak real sentences with espeak-ng into a folder laid out like a Common Voice language release.

    python scripts/make_synthetic_corpus.py --language tr --out data/demo_tr --num-clips 800 --seed 0

Writes `clips/common_voice_<lang>_<8 digits>.mp3` (mono, 48 kHz, constant bitrate, as Common Voice
ships), `train.tsv` / `dev.tsv` / `test.tsv` / `validated.tsv` (= their union), header-only
`other.tsv` / `invalidated.tsv`, and `clip_durations.tsv`, all with Common Voice's columns. Two extra
files record provenance: `synthetic_speakers.tsv` (which espeak-ng voice each client_id is) and
`README.md` (the command that made the folder).

A "speaker" is one espeak-ng voice variant (`tr+m3`, `tr+f2`, `tr+klatt4`, ...) with a fixed base
speed and pitch. As in Common Voice, no speaker and no sentence appears in two splits. Dev and test
speakers use variant families that no training speaker uses, so evaluation measures unseen voices.
Every clip varies speed, pitch, leading/trailing silence, background noise and gain. The output
depends only on the arguments (per-clip random streams are keyed by `--seed` and the clip number),
not on the number of worker processes.

Sentences come from `scripts/corpus_text/<lang>.txt`: one real sentence per line, written for this
project, with each language's own letters and punctuation.
"""
import argparse
import dataclasses
import hashlib
import io
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

SAMPLE_RATE = 48_000  # Common Voice clips are 48 kHz MP3.
ESPEAK_RATE = 22_050  # espeak-ng's native output rate.
TEXT_DIR = Path(__file__).resolve().parent / "corpus_text"
# espeak-ng voice for each language code (Common Voice's locale names differ only for English here).
ESPEAK_LANGUAGE = {"tr": "tr", "de": "de", "es": "es", "en": "en-us"}
MPEG1_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # kbps at 48 kHz
CV_COLUMNS = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
              "down_votes", "age", "gender", "accents", "variant", "locale", "segment")
GENDER = {"m": "male_masculine", "f": "female_feminine", "": ""}

# Curated espeak-ng variant families: (kind, gender, variants). Variants in one family sound alike
# (e.g. `klatt` renders byte-identically to `klatt6`, `Mario` and `Michael` share all settings except
# formants), so a family is never split across train and eval. Left out on purpose: whisper voices,
# robots, echo-heavy and joke voices, and variants that only rename the default voice (boris, max, fast).
VARIANT_FAMILIES = (
    ("male", "m", ("m1",)), ("male", "m", ("m2",)), ("male", "m", ("m3",)),
    ("male", "m", ("m4",)), ("male", "m", ("m5",)), ("male", "m", ("m6",)),
    ("male", "m", ("m7",)), ("male", "m", ("m8",)), ("male", "m", ("croak",)),
    ("female", "f", ("f1",)), ("female", "f", ("f2",)), ("female", "f", ("f3",)),
    ("female", "f", ("f4",)), ("female", "f", ("f5",)), ("female", "f", ("Annie",)),
    ("female", "f", ("linda", "belinda")), ("female", "f", ("steph", "steph2")),
    ("female", "f", ("Andrea",)), ("female", "f", ("aunty",)),
    ("klatt", "", ("klatt", "david")), ("klatt", "", ("klatt2",)), ("klatt", "", ("klatt3",)),
    ("klatt", "", ("klatt4",)), ("klatt", "", ("klatt5", "edward")),
    ("other", "m", ("Alex",)), ("other", "m", ("Denis",)), ("other", "", ("Gene",)),
    ("other", "", ("Mario", "Michael")), ("other", "", ("rob", "robert")), ("other", "m", ("Storm",)),
    ("other", "m", ("michel", "miguel")), ("other", "", ("paul",)), ("other", "m", ("travis",)),
    ("other", "m", ("victor",)), ("other", "m", ("Andy",)), ("other", "m", ("antonio",)),
    ("other", "", ("quincy",)),
)
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class Speaker:
    client_id: str
    split: str
    voice: str  # espeak-ng -v argument, e.g. "tr+m3"
    gender: str
    speed: int  # base words per minute
    pitch: int  # base espeak pitch, 0..99


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    locale: str
    index: int
    speaker: Speaker
    sentence: str
    speed: int
    pitch: int

    @property
    def path(self) -> str:
        return f"common_voice_{self.locale}_{self.index:08d}.mp3"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--language", required=True,
                   help="tr, de, es, en, or any espeak-ng language with a sentence file")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--num-clips", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--eval-families-per-kind", type=int, default=1,
                   help="variant families of each kind (male/female/klatt/other) held out for dev, "
                        "and as many again for test")
    p.add_argument("--bitrate", type=int, default=32, choices=MPEG1_BITRATES, help="MP3 bitrate, kbps")
    p.add_argument("--sentences", type=Path, help="default: scripts/corpus_text/<language>.txt")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if not 0 <= args.dev_fraction + args.test_fraction < 1:
        p.error("--dev-fraction + --test-fraction must be in [0, 1)")
    return args


def check_espeak(variants) -> None:
    """Exit with an apt hint if espeak-ng is missing; fail on variants this espeak-ng lacks
    (espeak-ng silently falls back to its default voice for an unknown variant)."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found on PATH: install it with `apt-get install espeak-ng`.")
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True,
                             check=True).stdout
    known = {line.split("!v/")[1].split()[0] for line in listing.splitlines() if "!v/" in line}
    missing = sorted(set(variants) - known)
    if missing:
        sys.exit(f"espeak-ng lacks voice variants {missing}; `espeak-ng --voices=variant` lists them.")


def load_sentences(path: Path) -> list:
    """Distinct non-empty lines of `path`, in file order."""
    if not path.is_file():
        sys.exit(f"{path}: no sentence file; write one real sentence per line.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    bad = [s for s in sentences if "\t" in s]
    if bad:
        sys.exit(f"{path}: sentences must not contain tabs: {bad[:3]}")
    return sentences


def split_counts(total: int, args) -> dict:
    """How many of `total` items go to each split; dev and test get at least one if asked for."""
    dev = max(round(total * args.dev_fraction), int(args.dev_fraction > 0))
    test = max(round(total * args.test_fraction), int(args.test_fraction > 0))
    if dev + test >= total:
        sys.exit(f"only {total} items: too few to split {args.dev_fraction}/{args.test_fraction}")
    return {"train": total - dev - test, "dev": dev, "test": test}


def split_sentences(sentences, args, rng) -> dict:
    """Disjoint sentence lists per split, as Common Voice assigns each sentence to one split."""
    order = [sentences[i] for i in rng.permutation(len(sentences))]
    counts = split_counts(len(order), args)
    return {"train": order[:counts["train"]],
            "dev": order[counts["train"]:counts["train"] + counts["dev"]],
            "test": order[counts["train"] + counts["dev"]:]}


def make_speakers(args, rng) -> dict:
    """One speaker per variant; dev and test each take whole families of every kind."""
    by_kind = {}
    for family in VARIANT_FAMILIES:
        by_kind.setdefault(family[0], []).append(family)
    held = {"train": [], "dev": [], "test": []}
    k = args.eval_families_per_kind
    for kind, families in by_kind.items():
        families = [families[i] for i in rng.permutation(len(families))]
        held["dev"] += families[:k] if args.dev_fraction > 0 else []
        held["test"] += families[k:2 * k] if args.test_fraction > 0 else []
        held["train"] += [f for f in families if f not in held["dev"] and f not in held["test"]]
    language = ESPEAK_LANGUAGE.get(args.language, args.language)
    speakers = {split: [] for split in SPLITS}
    for split, families in held.items():
        for _, gender, variants in families:
            for variant in variants:
                speed, pitch = int(rng.integers(155, 186)), int(rng.integers(35, 66))
                key = f"xlsr-jax synthetic/{args.seed}/{language}+{variant}/{speed}/{pitch}"
                speakers[split].append(Speaker(hashlib.sha512(key.encode()).hexdigest(), split,
                                               f"{language}+{variant}", GENDER[gender], speed, pitch))
    return speakers


def plan_split(num_clips, sentences, speakers, rng) -> list:
    """(speaker, sentence, speed, pitch) for each clip of one split.

    Sentences are used in a shuffled cycle so each is read about equally often; each clip goes to the
    least-used speaker who has not read that sentence yet (a Common Voice contributor reads a
    sentence once), ties broken at random.
    """
    used = {s.client_id: 0 for s in speakers}
    read = set()
    plans = []
    for i in range(num_clips):
        sentence = sentences[i % len(sentences)]
        fresh = [s for s in speakers if (s.client_id, sentence) not in read] or speakers
        least = min(used[s.client_id] for s in fresh)
        candidates = [s for s in fresh if used[s.client_id] == least]
        speaker = candidates[rng.integers(len(candidates))]
        used[speaker.client_id] += 1
        read.add((speaker.client_id, sentence))
        # Per-clip prosody around the speaker's base: the same voice on a faster or calmer day.
        speed = int(np.clip(speaker.speed + rng.integers(-15, 16), 130, 190))
        pitch = int(np.clip(speaker.pitch + rng.integers(-8, 9), 0, 99))
        plans.append((speaker, sentence, speed, pitch))
    return plans


def plan_clips(args, rng) -> list:
    """All clips, numbered in random order so a file number does not reveal its split."""
    sentences = split_sentences(load_sentences(args.sentences), args, rng)
    speakers = make_speakers(args, rng)
    counts = split_counts(args.num_clips, args)
    plans = []
    for split in SPLITS:
        plans += plan_split(counts[split], sentences[split], speakers[split], rng)
    numbers = rng.permutation(len(plans)) + 1
    clips = (ClipPlan(args.language, int(n), *plan) for n, plan in zip(numbers, plans))
    return sorted(clips, key=lambda c: c.index)


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Speak `text`; returns float32 [samples] at 22.05 kHz."""
    cmd = ["espeak-ng", "-b", "1", "-v", voice, "-s", str(speed), "-p", str(pitch),
           "--stdin", "--stdout"]  # -b 1: the text is UTF-8
    run = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    if run.returncode != 0 or len(run.stdout) < 1000:
        error = run.stderr.decode(errors="replace")
        raise RuntimeError(f"{shlex.join(cmd)} failed on {text!r}: {error}")
    audio, rate = sf.read(io.BytesIO(run.stdout), dtype="float32")
    assert rate == ESPEAK_RATE, rate
    return audio


def colored_noise(n: int, rng, pink: bool) -> np.ndarray:
    """Unit-RMS white or pink (1/f power) noise, [n]."""
    white = rng.standard_normal(n)
    if pink:
        spectrum = np.fft.rfft(white)
        spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))  # 1/f power = 1/sqrt(f) amplitude
        spectrum[0] = 0
        white = np.fft.irfft(spectrum, n)
    return (white / np.sqrt(np.mean(white ** 2))).astype(np.float32)


def render(plan: ClipPlan, seed: int) -> np.ndarray:
    """The finished waveform of one clip: float32 [samples] at 48 kHz, peak below 0 dBFS."""
    rng = np.random.default_rng([seed, plan.index])  # independent of worker scheduling
    speech = espeak(plan.sentence, plan.speaker.voice, plan.speed, plan.pitch)
    voiced = np.flatnonzero(np.abs(speech) > 1e-4)  # espeak pads with ~0.35 s of digital silence
    speech = speech[voiced[0]:voiced[-1] + 1]
    speech = librosa.resample(speech, orig_sr=ESPEAK_RATE, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    # Real recordings start and stop a little before and after the speaker.
    lead, trail = (int(rng.uniform(0.05, 0.22) * SAMPLE_RATE) for _ in range(2))
    audio = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(trail, np.float32)])
    snr_db = rng.uniform(25, 40)
    speech_rms = np.sqrt(np.mean(speech ** 2))
    noise = colored_noise(len(audio), rng, pink=bool(rng.integers(2)))
    audio = audio + noise * speech_rms * 10 ** (-snr_db / 20)
    peak_db = rng.uniform(-18, -3)  # microphones and gain settings differ
    return (audio * (10 ** (peak_db / 20) / np.max(np.abs(audio)))).astype(np.float32)


def write_clip(job) -> int:
    """Render and encode one clip; returns its decoded duration in ms (as clip_durations.tsv has)."""
    plan, seed, clips_dir, bitrate = job
    path = clips_dir / plan.path
    # libsndfile maps compression_level linearly onto 320..32 kbps for constant-bitrate MPEG-1.
    level = min((320 - bitrate) / 288, 0.9999)
    sf.write(path, render(plan, seed), SAMPLE_RATE, format="MP3", bitrate_mode="CONSTANT",
             compression_level=level)
    return round(sf.info(path).duration * 1000)


def tsv(path: Path, header, rows) -> None:
    """Common Voice style: tab-separated, no quoting, '\\n' line ends."""
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_tables(out: Path, plans, durations, locale: str) -> None:
    """The split TSVs, validated.tsv, empty other/invalidated TSVs, clip_durations.tsv, speakers."""
    def row(c):
        sentence_id = hashlib.sha256(c.sentence.encode("utf-8")).hexdigest()
        return (c.speaker.client_id, c.path, sentence_id, c.sentence, "", 2, 0, "",
                c.speaker.gender, "", "", locale, "")
    for split in SPLITS:
        tsv(out / f"{split}.tsv", CV_COLUMNS, [row(c) for c in plans if c.speaker.split == split])
    tsv(out / "validated.tsv", CV_COLUMNS, [row(c) for c in plans])
    for name in ("other.tsv", "invalidated.tsv"):
        tsv(out / name, CV_COLUMNS, [])
    tsv(out / "clip_durations.tsv", ("clip", "duration[ms]"),
        [(c.path, d) for c, d in zip(plans, durations)])
    speakers = {c.speaker.client_id: c.speaker for c in plans}.values()
    tsv(out / "synthetic_speakers.tsv",
        ("client_id", "split", "espeak_voice", "base_speed", "base_pitch"),
        [(s.client_id, s.split, s.voice, s.speed, s.pitch) for s in speakers])


def summary(plans, durations) -> str:
    """Clips, speakers, variants and minutes per split."""
    lines = []
    for split in SPLITS:
        clips = [c for c in plans if c.speaker.split == split]
        minutes = sum(d for c, d in zip(plans, durations) if c.speaker.split == split) / 60_000
        speakers = {c.speaker.client_id for c in clips}
        variants = sorted({c.speaker.voice.split("+")[1] for c in clips}, key=str.lower)
        lines.append(f"{split:5s}: {len(clips):4d} clips, {len(speakers):2d} speakers, {minutes:5.1f} min, "
                     f"{len({c.sentence for c in clips}):3d} sentences; variants: {' '.join(variants)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.sentences = args.sentences or TEXT_DIR / f"{args.language}.txt"
    check_espeak([v for family in VARIANT_FAMILIES for v in family[2]])
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out}: exists and is not empty; remove it first.")
    plans = plan_clips(args, np.random.default_rng(args.seed))
    clips_dir = args.out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(plan, args.seed, clips_dir, args.bitrate) for plan in plans]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        durations = list(pool.map(write_clip, jobs, chunksize=8))
    write_tables(args.out, plans, durations, args.language)
    stats = summary(plans, durations)
    command = shlex.join(["python", "scripts/make_synthetic_corpus.py", *(argv or sys.argv[1:])])
    (args.out / "README.md").write_text(
        f"# Synthetic Common Voice-style corpus ({args.language})\n\nespeak-ng speech, not real "
        f"recordings. Made with:\n\n    {command}\n\n```\n{stats}\n```\n", encoding="utf-8")
    print(stats)


if __name__ == "__main__":
    main()
