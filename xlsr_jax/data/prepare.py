"""Examples -> a training-ready dataset: normalised texts, labels, decoded audio, filters.

Every clip a filter drops, or keeps with a flag, is named with its reason in ``PreparedDataset.bad``
(see report.py, which writes them to the run's data_report.tsv).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from xlsr_jax.data.cache import DecodeFailure, build_audio_cache
from xlsr_jax.data.report import REASONS, BadClip, count_reasons, format_counts
from xlsr_jax.data.shards import HostShard, HostShardAudio, build_host_shard
from xlsr_jax.data.sources import Example
from xlsr_jax.text import Vocab, required_frames

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedDataset:
    """Kept utterances, row ``i`` of every field describing the same one."""

    texts: list[str]  # normalised transcripts
    labels: list[np.ndarray]  # int32 [chars] each
    lengths: np.ndarray  # int64 [n] samples
    audio: Any  # AudioCache, or anything with __getitem__(i) -> float32 [samples]
    examples: list[Example]
    bad: list[BadClip] = dataclasses.field(default_factory=list)  # dropped or flagged clips, by name
    # int64 [n]: the host whose audio holds each row (each host decoded its part); None: every host, all rows
    owners: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)


def ctc_min_frames(labels: Sequence[np.ndarray]) -> np.ndarray:
    """Fewest output frames a CTC alignment of each label needs: int64 ``[n]``.

    One frame per label plus one blank between each pair of equal adjacent labels.
    """
    needed = np.zeros(len(labels), np.int64)
    for start in range(0, len(labels), 4096):  # padded blocks for `required_frames`, a bounded memory
        block = labels[start:start + 4096]
        lengths = np.asarray([len(lab) for lab in block])
        mask = np.arange(lengths.max(initial=0)) < lengths[:, None]
        padded = np.zeros(mask.shape, np.int64)
        padded[mask] = np.concatenate(block) if len(block) else []
        needed[start:start + len(block)] = required_frames(padded, mask)
    return needed


def prepare_dataset(
    examples: Sequence[Example],
    *,
    vocab: Vocab | None,
    normalize: Callable[[Example], str] | None,
    sampling_rate: int,
    cache_dir: str | os.PathLike,
    num_workers: int,
    min_duration_s: float | None = None,
    max_duration_s: float | None = None,
    frames_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    drop_infeasible: bool = True,
    name: str = "train",
    shard: HostShard | None = None,
    min_frames: int = 0,
) -> tuple[PreparedDataset, dict]:
    """Normalise, decode (via the cache), filter; return the dataset and a report of counts
    (``total``, ``kept``, ``hours`` and one count per reason of data/report.py's REASONS).

    ``frames_fn`` maps samples ``[n]`` to the model's output frames ``[n]``. Utterances whose
    labels cannot fit their frames are dropped when ``drop_infeasible`` (training: their CTC loss
    is meaningless) and kept but flagged otherwise (evaluation: dropping them would flatter WER).
    Transcripts with characters the vocabulary lacks are kept (they encode as [UNK]) and flagged.
    ``name`` is the split the report rows name. With a ``shard`` of several hosts this host decodes only
    its part of the clips and the hosts exchange the results (data/shards.py): every host gets the same
    dataset, whose audio holds this host's rows (``owners``).

    ``vocab=None`` (pretraining: audio without transcripts): texts are kept as written, never required
    or checked, labels are empty; instead clips with fewer than ``min_frames`` frames are dropped
    ("too_few_frames").
    """
    examples = list(examples)
    # Every clip goes into the cache, so it depends on the audio files only: changing the text
    # normalisation or the duration filters never re-decodes.
    if shard is not None and shard.count > 1:
        cache, failures = build_host_shard(examples, cache_dir, shard, sampling_rate=sampling_rate,
                                           num_workers=num_workers, name=name)
    else:
        cache, failures = build_audio_cache(
            examples, cache_dir, sampling_rate=sampling_rate, num_workers=num_workers
        )
    texts = [normalize(ex) if normalize is not None else ex.text for ex in examples]
    min_len = -np.inf if min_duration_s is None else min_duration_s * sampling_rate
    max_len = np.inf if max_duration_s is None else max_duration_s * sampling_rate
    keep, bad = _select(examples, texts, cache, failures, (min_len, max_len), sampling_rate, name,
                        need_text=vocab is not None)
    if vocab is None:
        keep, more = _drop_too_few_frames(examples, keep, cache.lengths, frames_fn, min_frames, name)
        bad += more
    else:
        bad += _flag_out_of_vocabulary([(i, examples[i], texts[i]) for i, _ in keep], vocab, name)

    labels = [vocab.encode(texts[i]) if vocab is not None else np.zeros(0, np.int32) for i, _ in keep]
    lengths = np.asarray([cache.lengths[r] for _, r in keep], dtype=np.int64)
    if frames_fn is not None and keep and vocab is not None:
        frames = np.asarray(frames_fn(lengths)).reshape(-1)
        needed = ctc_min_frames(labels)
        feasible = frames >= needed
        for (i, _), n, f, ok in zip(keep, needed, frames, feasible):
            if not ok:
                bad.append((i, BadClip(name, examples[i].source, examples[i].path, "infeasible",
                                       f"{n} CTC frames needed for the transcript, its audio gives {f}",
                                       dropped=drop_infeasible)))
        if drop_infeasible:
            keep = [k for k, ok in zip(keep, feasible) if ok]
            labels = [lab for lab, ok in zip(labels, feasible) if ok]
            lengths = lengths[feasible]

    audio = cache.take([r for _, r in keep])
    dataset = PreparedDataset(
        texts=[texts[i] for i, _ in keep],
        labels=labels,
        lengths=lengths,
        audio=audio,
        examples=[examples[i] for i, _ in keep],
        bad=[clip for _, clip in sorted(bad, key=lambda ic: ic[0])],  # in the sources' order
        owners=audio.owners if isinstance(audio, HostShardAudio) else None,
    )
    report = {"total": len(examples), "kept": len(dataset),
              "hours": float(lengths.sum()) / sampling_rate / 3600.0,
              **dict.fromkeys(REASONS, 0), **count_reasons(dataset.bad)}
    log_report(name, report, dataset.bad)
    return dataset, report


def _drop_too_few_frames(examples: list[Example], keep: list, samples: np.ndarray, frames_fn, min_frames: int,
                         split: str) -> tuple[list, list]:
    """(the kept (example index, cache row) pairs whose audio gives at least `min_frames` frames, [(example
    index, dropped BadClip)] of the others)."""
    if not keep or not min_frames or frames_fn is None:
        return keep, []
    frames = np.asarray(frames_fn(np.asarray([samples[r] for _, r in keep], np.int64))).reshape(-1)
    bad = [(i, BadClip(split, examples[i].source, examples[i].path, "too_few_frames",
                       f"{f} frames, fewer than the {min_frames} a masked span needs"))
           for (i, _), f in zip(keep, frames) if f < min_frames]
    return [k for k, f in zip(keep, frames) if f >= min_frames], bad


def _select(examples: list[Example], texts: list[str], cache, failures: list[DecodeFailure],
            length_range: tuple[float, float], sampling_rate: int, split: str, *,
            need_text: bool = True) -> tuple[list, list]:
    """([(example index, cache row)] of examples with audio, text (when `need_text`) and a length in
    range, [(example index, dropped BadClip)] of the others). One reason per clip: the audio's first,
    then the text's, then the length's."""
    row_of = np.full(len(texts), -1, dtype=np.int64)  # example index -> cache row
    row_of[cache.example_indices] = np.arange(len(cache))
    failed = {f.index: f for f in failures}
    keep, bad = [], []
    for i, (ex, text) in enumerate(zip(examples, texts)):
        row = int(row_of[i])
        if i in failed:
            # The message starts with the path, which the report has in its own column.
            problem = failed[i].reason, failed[i].message.removeprefix(f"{ex.path}: ")
        else:
            problem = clip_problem(ex, text if need_text else None, int(cache.lengths[row]), length_range,
                                   sampling_rate)
        if problem is None:
            keep.append((i, row))
            continue
        bad.append((i, BadClip(split, ex.source, ex.path, *problem)))
    return keep, bad


def clip_problem(example: Example, text: str | None, samples: int, length_range: tuple[float, float],
                 sampling_rate: int) -> tuple[str, str] | None:
    """(reason, detail) that drops a decoded clip of ``samples`` with normalised ``text``, or None: the
    text's reason first, then the length's (outside ``length_range``, in samples). ``text=None``: no
    transcript is needed (pretraining)."""
    min_len, max_len = length_range
    seconds = samples / sampling_rate
    if text is not None and not text:
        return "empty_text", f"transcript {example.text!r}"
    if samples < min_len:
        return "too_short", f"{seconds:.2f} s, shorter than {min_len / sampling_rate:g} s"
    if samples > max_len:
        return "too_long", f"{seconds:.2f} s, longer than {max_len / sampling_rate:g} s"
    return None


def infeasible_detail(label: np.ndarray, frames: int) -> str | None:
    """Why CTC cannot align ``label`` (int32 ``[chars]``) to ``frames`` output frames, or None."""
    needed = int(ctc_min_frames([label])[0])
    return None if frames >= needed else f"{needed} CTC frames needed for the transcript, its audio gives {frames}"


def missing_characters(text: str, vocab: Vocab) -> list[str]:
    """The characters of ``text`` that ``vocab`` lacks (they encode as [UNK]), sorted."""
    return sorted({c for c in text if c != " " and vocab.token_to_id(c) == vocab.unk_id})


def _flag_out_of_vocabulary(kept: list[tuple[int, Example, str]], vocab: Vocab, split: str) -> list:
    """[(example index, flagged BadClip)] of the kept (index, example, normalised text) whose text has
    characters ``vocab`` lacks. Flagged, not dropped: evaluation scores them as before (the reference
    keeps the characters, which the model cannot produce)."""
    flagged = []
    for i, ex, text in kept:
        missing = missing_characters(text, vocab)
        if missing:
            flagged.append((i, BadClip(split, ex.source, ex.path, "out_of_vocabulary",
                                       f"not in the vocabulary: {' '.join(missing)}", dropped=False)))
    return flagged


def log_report(name: str, report: dict, bad: list[BadClip]) -> None:
    """Log what `name` kept and dropped, by reason (`report`: prepare_dataset's counts {"kept", "total",
    "hours"}); also the streaming probe's summary."""
    dropped = count_reasons(c for c in bad if c.dropped)
    flagged = count_reasons(c for c in bad if not c.dropped)
    log.info("%s: kept %d of %d utterances (%.2f h); dropped %d: %s%s", name, report["kept"], report["total"],
             report["hours"], report["total"] - report["kept"], format_counts(dropped),
             f"; kept but flagged: {format_counts(flagged)}" if flagged else "")
