"""Bad data, reported: every clip a split leaves out, or keeps with a flag, by name and reason.

The trainer writes them to ``data_report.tsv`` in the run folder at every start (one row per clip:
split, source, path, reason, detail) and stops at start-up when a source lost more than
``data.max_skip_fraction`` of its clips: a wrong folder, a broken download or a missing ``clips/``
should not train for days on the handful of rows that survived.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import os
from typing import Iterable, Mapping, Protocol, Sequence

from xlsr_jax.errors import UserError
from xlsr_jax.rundir import REPORT_COLUMNS as COLUMNS
from xlsr_jax.rundir import as_path, write_atomically

log = logging.getLogger(__name__)

# Reason word -> what it means (in the order counts are shown).
REASONS = {
    "bad_path": "the row's path leaves its corpus (a Common Voice row names a file inside clips/); never opened",
    "missing_file": "the audio file does not exist",
    "undecodable": "the audio file cannot be decoded (broken, or not audio)",
    "empty_audio": "a 0-byte audio file, or one without samples",
    "silence": "audio without recorded sound (near-zero peak amplitude)",
    "too_short": "shorter than data.min_duration_s",
    "too_long": "longer than data.max_duration_s",
    "empty_text": "no transcript left after normalisation (empty or punctuation only)",
    "out_of_vocabulary": "characters the vocabulary lacks (kept; they become [UNK])",
    "infeasible": "more labels than the audio has CTC frames",
    "too_few_frames": "pretraining: fewer model frames than one masked span (pretrain.mask_time_length) needs",
}


@dataclasses.dataclass(frozen=True)
class BadClip:
    """One row of data_report.tsv."""

    split: str  # "train" or "eval"
    source: str  # the data spec it came from (cv:DIR:SPLITS, manifest:FILE)
    path: str  # the audio file
    reason: str  # a key of REASONS
    detail: str = ""  # the decoder's message, the transcript, the duration...
    dropped: bool = True  # False: kept and only flagged (evaluation scores every transcript it can)


class Screened(Protocol):
    """What the report reads of a screened dataset (data/prepare.py's `PreparedDataset`): the examples
    it kept (each with `.source`) and its bad clips."""

    examples: Sequence
    bad: Sequence[BadClip]


def count_reasons(clips: Iterable[BadClip]) -> dict[str, int]:
    """{reason: clips}, in the order of REASONS, reasons with no clip left out."""
    counts = collections.Counter(c.reason for c in clips)
    return {r: counts[r] for r in REASONS if counts[r]}


def format_counts(counts: Mapping[str, int]) -> str:
    """{reason: n} -> "3 missing_file, 1 empty_text", or "none"."""
    return ", ".join(f"{n} {reason}" for reason, n in counts.items() if n) or "none"


def _field(value: str) -> str:
    # Plain TSV like Common Voice's own (read it with quoting=csv.QUOTE_NONE): no tabs or newlines.
    return " ".join(str(value).split("\t")).replace("\r", " ").replace("\n", " ")


def write_report(path: str | os.PathLike, clips: Iterable[BadClip]) -> None:
    """Write (replace, never append) ``path``, a local path or a URL: a header, then one row per clip;
    the detail of a clip that was kept starts with "kept: ". Atomic: a reader never sees half a file."""
    rows = [dataclasses.replace(c, detail=f"kept: {c.detail}") if not c.dropped else c for c in clips]
    lines = ["\t".join(COLUMNS)] + ["\t".join(_field(getattr(c, col)) for col in COLUMNS) for c in rows]

    def save(local: str) -> None:
        with open(local, "w", encoding="utf-8", newline="") as f:
            f.write("\n".join(lines) + "\n")

    as_path(path).parent.mkdir(parents=True, exist_ok=True)  # the run folder may not exist yet
    write_atomically(path, save)


def read_report(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a data_report.tsv as {column: value}."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _over_limit(split: str, dataset: Screened, max_fraction: float) -> list[str]:
    """One line per source of `dataset` that dropped more than `max_fraction` of its clips."""
    kept = collections.Counter(e.source for e in dataset.examples)
    dropped: dict[str, list[BadClip]] = collections.defaultdict(list)
    for c in dataset.bad:
        if c.dropped:
            dropped[c.source].append(c)
    lines = []
    for source, clips in dropped.items():
        total = len(clips) + kept[source]
        if len(clips) / total > max_fraction:
            top = sorted(count_reasons(clips).items(), key=lambda kv: -kv[1])[:3]
            reasons = "; ".join(f"{reason} {n} ({REASONS[reason]})" for reason, n in top)
            lines.append(f"{source or '(no source)'} ({split}): {len(clips)} of {total} clips dropped "
                         f"({100 * len(clips) / total:.1f} %); top reasons: {reasons}")
    return lines


def report_bad_data(datasets: Mapping[str, Screened], path: str | os.PathLike, max_fraction: float, *,
                    write: bool = True) -> None:
    """Write every bad clip of ``datasets`` ({split: dataset}) to ``path`` (when ``write``: one process
    of a pod writes), then raise :class:`UserError` if a source dropped more than ``max_fraction`` of
    its clips, naming the source, the fraction and the top reasons."""
    clips = [c for d in datasets.values() for c in d.bad]
    if write:
        write_report(path, clips)
        if clips:
            log.info("%s: %d clips listed by name (%s)", path, len(clips), "; ".join(
                f"{split}: {format_counts(count_reasons(d.bad))}" for split, d in datasets.items() if d.bad))
    over = [line for split, d in datasets.items() for line in _over_limit(split, d, max_fraction)]
    if over:
        raise UserError(
            f"too much bad data, more than data.max_skip_fraction={max_fraction:g} of a source:\n  "
            + "\n  ".join(over)
            + f"\nEvery dropped clip is listed by name, with its reason, in {path}. Fix or remove those "
              "rows, or raise data.max_skip_fraction (1 keeps going whatever is dropped).")
