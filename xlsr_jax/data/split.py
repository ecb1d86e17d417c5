"""`xlsr-jax split`: speaker-disjoint train/dev/test manifests for data without an official test split.

A model scored on speakers it trained on looks far better than it is (it memorises voices), so no
speaker may appear in two splits. Common Voice's own splits also keep sentences apart. Both are kept
here by assigning whole groups: speakers joined when they read the same sentence (connected
components, union-find). If that leaves dev or test far below their share (a few sentences read by
everyone join all speakers into one group), the groups are single speakers instead and the sentences
that end up in two splits are counted and reported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Sequence

import numpy as np

from xlsr_jax.data.sources import Example
from xlsr_jax.errors import UserError
from xlsr_jax.text import TextNormalization

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
MANIFEST_COLUMNS = ("path", "sentence", "speaker", "duration_s", "locale")
# Sentence-disjoint groups are used when dev and test each reach this share of their target.
_ENOUGH = 0.8


@dataclasses.dataclass(frozen=True)
class Split:
    """The three splits, and how they were made."""

    splits: dict[str, list[Example]]
    sentence_disjoint: bool  # whole sentence groups were assigned, so no sentence is in two splits
    shared_sentences: int  # distinct sentences found in more than one split
    no_speaker: int  # utterances without a speaker id, each treated as its own speaker


class _Groups:
    """Union-find over utterance indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, items: Sequence[int]) -> None:
        root = self.find(items[0])
        for i in items[1:]:
            self.parent[self.find(i)] = root


def _group_by(keys_per_relation: list[list[str]]) -> list[list[int]]:
    """Utterance indices grouped so that utterances sharing any key of any relation are together."""
    groups = _Groups(len(keys_per_relation[0]))
    for keys in keys_per_relation:
        members: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        for items in members.values():
            groups.join(items)
    out: dict[int, list[int]] = {}
    for i in range(len(groups.parent)):
        out.setdefault(groups.find(i), []).append(i)
    return list(out.values())


def _assign(groups: list[list[int]], targets: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Groups in a seeded random order; each goes to test, else dev, if it fits under that split's
    target count, else to train. Large groups (prolific speakers) thus land in train."""
    order = np.random.default_rng(seed).permutation(len(groups))
    picked: dict[str, list[int]] = {name: [] for name in SPLITS}
    for g in order:
        group = groups[g]
        name = next((s for s in ("test", "dev") if len(picked[s]) + len(group) <= targets[s]), "train")
        picked[name].extend(group)
    return {name: sorted(indices) for name, indices in picked.items()}


def _shared(assigned: dict[str, list[int]], sentences: list[str]) -> int:
    seen: dict[str, set[str]] = {}
    for name, indices in assigned.items():
        for i in indices:
            seen.setdefault(sentences[i], set()).add(name)
    return sum(len(names) > 1 for names in seen.values())


def speaker_disjoint_split(examples: Sequence[Example], *, dev: float = 0.1, test: float = 0.1, seed: int = 0,
                           sentence_key: Callable[[Example], str] = lambda e: e.text.strip()) -> Split:
    """Split ``examples`` by utterance count near the ``dev`` / ``test`` fractions (the rest is train)
    with no speaker in two splits; deterministic for a ``seed``. ``sentence_key`` says which transcripts
    count as the same sentence (the normalised text, say)."""
    if not (0 <= dev < 1 and 0 <= test < 1 and dev + test < 1):
        raise UserError(f"--dev {dev}, --test {test}: each must be in [0, 1) and their sum below 1")
    if not examples:
        raise UserError("no utterances to split")
    # Without a speaker id an utterance is its own speaker: nothing better is known.
    speakers = [e.speaker or f"\0{i}" for i, e in enumerate(examples)]
    sentences = [sentence_key(e) for e in examples]
    targets = {"dev": round(dev * len(examples)), "test": round(test * len(examples))}
    assigned = _assign(_group_by([speakers, sentences]), targets, seed)
    disjoint = all(len(assigned[s]) >= _ENOUGH * targets[s] for s in targets)
    if not disjoint:
        assigned = _assign(_group_by([speakers]), targets, seed)
    return Split({name: [examples[i] for i in indices] for name, indices in assigned.items()}, disjoint,
                 _shared(assigned, sentences), sum(not e.speaker for e in examples))


def _row(cells: Sequence[str]) -> str:
    """One TSV line as sources.load_manifest reads it: no quoting (Common Voice sentences hold '"'), so
    a tab or line break inside a cell becomes a space."""
    return "\t".join(" ".join(c.split()) if any(x in c for x in "\t\r\n") else c for c in cells) + "\n"


def write_manifest(examples: Sequence[Example], path: str) -> None:
    """A ``manifest:`` TSV of ``MANIFEST_COLUMNS`` with absolute audio paths, written atomically."""
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(_row(MANIFEST_COLUMNS))
            for e in examples:
                duration = "" if e.duration_s is None else f"{e.duration_s:.3f}"
                f.write(_row([os.path.abspath(e.path), e.text, e.speaker, duration, e.language]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_split(split: Split, out_dir: str) -> dict[str, str]:
    """``out_dir``/{train,dev,test}.tsv; returns {split name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.tsv") for name in SPLITS}
    for name, path in paths.items():
        write_manifest(split.splits[name], path)
    return paths


def make_split(examples: Sequence[Example], out_dir: str, *, dev: float, test: float, seed: int,
               normalization: TextNormalization) -> tuple[Split, dict[str, str]]:
    """Split ``examples`` (sentences compared after ``normalization``) and write the three manifests.
    Rows that name no readable clip (`Example.problem`) are left out, with a warning."""
    bad = [e for e in examples if e.problem is not None]
    if bad:
        log.warning("left out %d rows that name no readable clip, e.g. %s", len(bad), bad[0].problem[1])
        examples = [e for e in examples if e.problem is None]
    split = speaker_disjoint_split(examples, dev=dev, test=test, seed=seed,
                                   sentence_key=lambda e: normalization(e.text, e.language))
    return split, write_split(split, out_dir)


def format_split(split: Split, paths: dict[str, str]) -> str:
    """One line per split (utterances, share, speakers, hours where durations are known), then notes."""
    total = sum(len(v) for v in split.splits.values())
    lines = []
    for name in SPLITS:
        rows = split.splits[name]
        seconds = [e.duration_s for e in rows if e.duration_s is not None]
        hours = f", {sum(seconds) / 3600:.2f} h" if seconds and len(seconds) == len(rows) else ""
        lines.append(f"{name}: {len(rows)} utterances ({100 * len(rows) / total:.1f} %), "
                     f"{len({e.speaker for e in rows if e.speaker})} speakers{hours} -> manifest:{paths[name]}")
    if split.sentence_disjoint:
        lines.append("no speaker and no sentence is in two splits")
    else:
        lines.append(f"no speaker is in two splits; {split.shared_sentences} sentences are in more than one "
                     "(keeping them apart would leave dev/test too small: many speakers read the same sentences)")
    if split.no_speaker:
        lines.append(f"{split.no_speaker} utterances have no speaker id; each counted as its own speaker")
    lines.append(f"shared_sentences: {split.shared_sentences}")
    return "\n".join(lines) + "\n"
