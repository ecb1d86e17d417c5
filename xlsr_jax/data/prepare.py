"""Examples -> a training-ready dataset: normalised texts, labels, decoded audio, filters."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from xlsr_jax.data.cache import build_audio_cache
from xlsr_jax.data.sources import Example
from xlsr_jax.text import Vocab

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedDataset:
    """Kept utterances, row ``i`` of every field describing the same one."""

    texts: list[str]  # normalised transcripts
    labels: list[np.ndarray]  # int32 [chars] each
    lengths: np.ndarray  # int64 [n] samples
    audio: Any  # AudioCache, or anything with __getitem__(i) -> float32 [samples]
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.texts)


def ctc_min_frames(labels: Sequence[np.ndarray]) -> np.ndarray:
    """Fewest output frames a CTC alignment of each label needs: int64 ``[n]``.

    One frame per label plus one blank between each pair of equal adjacent labels.
    """
    return np.asarray(
        [len(lab) + int(np.count_nonzero(lab[1:] == lab[:-1])) for lab in labels], dtype=np.int64
    )


def prepare_dataset(
    examples: Sequence[Example],
    *,
    vocab: Vocab,
    normalize: Callable[[Example], str],
    sampling_rate: int,
    cache_dir: str | os.PathLike,
    num_workers: int,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
    frames_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    drop_infeasible: bool = True,
    name: str = "train",
) -> tuple[PreparedDataset, dict]:
    """Normalise, decode (via the cache), filter; return the dataset and a report of counts.

    ``frames_fn`` maps samples ``[n]`` to the model's output frames ``[n]``. Utterances whose
    labels cannot fit their frames are dropped when ``drop_infeasible`` (training: their CTC loss
    is meaningless) and kept but counted otherwise (evaluation: dropping them would flatter WER).
    """
    examples = list(examples)
    # Every clip goes into the cache, so it depends on the audio files only: changing the text
    # normalisation or the duration filters never re-decodes.
    cache, _ = build_audio_cache(
        examples, cache_dir, sampling_rate=sampling_rate, num_workers=num_workers
    )
    texts = [normalize(ex) for ex in examples]
    report = dict.fromkeys(
        ("total", "kept", "skipped_decode", "empty_text", "too_short", "too_long", "infeasible"), 0
    )
    report["total"] = len(examples)
    min_len = -np.inf if min_duration_s is None else min_duration_s * sampling_rate
    max_len = np.inf if max_duration_s is None else max_duration_s * sampling_rate
    keep = _select(texts, cache, min_len, max_len, report)

    labels = [vocab.encode(texts[i]) for i, _ in keep]
    lengths = np.asarray([cache.lengths[r] for _, r in keep], dtype=np.int64)
    if frames_fn is not None and keep:
        frames = np.asarray(frames_fn(lengths)).reshape(-1)
        feasible = frames >= ctc_min_frames(labels)
        report["infeasible"] = int((~feasible).sum())
        if drop_infeasible:
            keep = [k for k, ok in zip(keep, feasible) if ok]
            labels = [lab for lab, ok in zip(labels, feasible) if ok]
            lengths = lengths[feasible]

    dataset = PreparedDataset(
        texts=[texts[i] for i, _ in keep],
        labels=labels,
        lengths=lengths,
        audio=cache.take([r for _, r in keep]),
        examples=[examples[i] for i, _ in keep],
    )
    report["kept"] = len(dataset)
    report["hours"] = float(lengths.sum()) / sampling_rate / 3600.0
    _log_report(name, report, drop_infeasible)
    return dataset, report


def _select(texts: list[str], cache, min_len: float, max_len: float, report: dict) -> list:
    """(example index, cache row) of examples with text, audio and a length in range; counts
    the others into ``report``."""
    row_of = np.full(len(texts), -1, dtype=np.int64)  # example index -> cache row
    row_of[cache.example_indices] = np.arange(len(cache))
    keep = []
    for i, text in enumerate(texts):
        row = int(row_of[i])
        if not text:
            report["empty_text"] += 1
        elif row < 0:
            report["skipped_decode"] += 1
        elif cache.lengths[row] < min_len:
            report["too_short"] += 1
        elif cache.lengths[row] > max_len:
            report["too_long"] += 1
        else:
            keep.append((i, row))
    return keep


def _log_report(name: str, report: dict, drop_infeasible: bool) -> None:
    log.info(
        "%s: kept %d of %d utterances (%.2f h); skipped: %d undecodable, %d empty text, "
        "%d too short, %d too long, %d infeasible for CTC (%s)",
        name, report["kept"], report["total"], report["hours"], report["skipped_decode"],
        report["empty_text"], report["too_short"], report["too_long"], report["infeasible"],
        "dropped" if drop_infeasible else "kept",
    )
