"""Each host of a multi-host run decodes only its part of a corpus.

Example ``i`` (its position in the example list, the same on every host) belongs to host
``i % process_count``. Host ``p`` decodes its examples into its own cache folder
(``audio-<sr>-<key>-host<p>of<P>``, keyed on those examples, so caches of runs with other host counts
never collide), then the hosts exchange what each of them needs to filter and plan exactly like the
others: every example's decoded length and, for a skipped clip, its reason and message (the run's
data_report.tsv and the skip-fraction check see every host's skips). The dataset's audio on host ``p``
(:class:`HostShardAudio`) knows every clip's length and holds host ``p``'s samples only; the loader's plan
(``BatchLoader(owners=...)``) gives each host only its own rows.

numpy only: the exchange goes through the ``allgather`` the caller passes in (in a run,
``jax.experimental.multihost_utils.process_allgather``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Callable, Sequence

import numpy as np

from xlsr_jax.data.audio import AudioError
from xlsr_jax.data.cache import AudioCache, DecodeFailure, build_audio_cache
from xlsr_jax.data.report import REASONS
from xlsr_jax.data.sources import Example
from xlsr_jax.errors import UserError

log = logging.getLogger(__name__)

_REASONS = tuple(REASONS)  # a skip reason crosses hosts as its position here


@dataclasses.dataclass(frozen=True)
class HostShard:
    """This host's place in a multi-host run, and how to gather from every host.

    ``allgather(x)``: ``x`` has the same shape and dtype on every host; returns ``[count, *x.shape]``,
    host ``p``'s ``x`` in row ``p``. A collective: every host calls it, in the same order.
    """

    index: int
    count: int
    allgather: Callable[[np.ndarray], np.ndarray]

    @property
    def name(self) -> str:
        return f"host{self.index}of{self.count}"

    def owned(self, n: int) -> np.ndarray:
        """This host's examples among ``n``: int64 ``[ceil((n - index) / count)]``."""
        return np.arange(self.index, n, self.count, dtype=np.int64)


class HostShardAudio:
    """The audio of a dataset in a multi-host run: every kept clip's length, this host's samples.

    Row ``i`` is kept clip ``i`` of all hosts: ``lengths`` int64 ``[n]`` (samples), ``example_indices``
    int64 ``[n]`` (position in the examples), ``owners`` int64 ``[n]`` (the host holding its audio).
    ``self[i]`` (float32 ``[samples]``) and ``pcm(i)`` (int16 ``[samples]``) read a row this host holds;
    another host's row raises ValueError naming that host.
    """

    def __init__(self, local: AudioCache | None, lengths: np.ndarray, example_indices: np.ndarray,
                 owners: np.ndarray, local_rows: np.ndarray, host: int):
        self.local, self.host = local, host  # local: this host's cache (None when it owns no clip)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.example_indices = np.asarray(example_indices, dtype=np.int64)
        self.owners = np.asarray(owners, dtype=np.int64)
        self.local_rows = np.asarray(local_rows, dtype=np.int64)  # row in `local`, -1: another host's

    def __len__(self) -> int:
        return len(self.lengths)

    def _row(self, i: int) -> int:
        row = int(self.local_rows[i])
        if row < 0:
            raise ValueError(f"audio row {i} (example {self.example_indices[i]}) was decoded by host "
                             f"{self.owners[i]}, not by this one (host {self.host}): plan batches with "
                             "BatchLoader(owners=dataset.owners) so that each host loads only its own rows")
        return row

    def __getitem__(self, i: int) -> np.ndarray:
        return self.local[self._row(i)]

    def pcm(self, i: int) -> np.ndarray:
        return self.local.pcm(self._row(i))

    def take(self, rows: Sequence[int]) -> "HostShardAudio":
        """A view of the given rows: ``view[j] == self[rows[j]]``."""
        rows = np.asarray(rows, dtype=np.int64)
        return HostShardAudio(self.local, self.lengths[rows], self.example_indices[rows], self.owners[rows],
                              self.local_rows[rows], self.host)


def examples_digest(examples: Sequence[Example]) -> int:
    """A 31-bit hash of the examples' paths, in order (equal on hosts that read the same sources)."""
    h = hashlib.sha256("\0".join(ex.path for ex in examples).encode())
    return int.from_bytes(h.digest()[:4], "little") >> 1


def exchange_decode_results(shard: HostShard, n: int, digest: int, lengths: np.ndarray,
                            failures: Sequence[DecodeFailure], name: str = "train"
                            ) -> tuple[np.ndarray, list[DecodeFailure]]:
    """Every host's decode results, identical on every host: (int64 ``[n]`` samples of each example,
    -1 for a skipped one; the skipped examples of all hosts, by example index).

    ``lengths`` int64 ``[len(shard.owned(n))]``: this host's examples, -1 where skipped; ``failures``:
    this host's skipped examples, indexed among the ``n``. ``digest`` (:func:`examples_digest`) and ``n``
    must agree on every host, else UserError (hosts reading different sources). Three collectives.
    """
    owned = shard.owned(n)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != owned.shape:
        raise ValueError(f"{name}: {len(lengths)} lengths for the {len(owned)} examples of {shard.name}")
    messages = {f.index: f.message.encode("utf-8") for f in failures}
    blob = b"".join(messages.get(int(i), b"") for i in owned)
    header = shard.allgather(np.asarray([n, digest, len(blob)], dtype=np.int32))  # [hosts, 3]
    differ = np.flatnonzero((header[:, :2] != header[shard.index, :2]).any(axis=1))
    if len(differ):
        raise UserError(f"the processes of this run disagree on {name}.examples (process {shard.index} has "
                        f"{n}; processes {differ.tolist()} differ). Every host must read the same sources, "
                        "with the same data.* keys, to decode its part of them")
    # Per owned example: samples (-1 skipped), reason (position in REASONS, -1 kept), message bytes.
    # Hosts own ceil(n / count) or one fewer: padded rows have length -2.
    table = np.full((-(-n // shard.count), 3), [-2, -1, 0], dtype=np.int32)
    table[: len(owned), 0] = lengths
    for f in failures:
        k = int(np.searchsorted(owned, f.index))
        if f.reason not in _REASONS:
            raise ValueError(f"{name}: example {f.index} skipped for an unknown reason {f.reason!r}")
        table[k, 1:] = _REASONS.index(f.reason), len(messages[f.index])
    tables = shard.allgather(table)  # [hosts, rows, 3]
    width = int(header[:, 2].max())
    blobs = shard.allgather(np.frombuffer(blob.ljust(width, b"\0"), np.uint8)) if width else None
    all_lengths, all_failures = np.full(n, -1, dtype=np.int64), []
    for host in range(shard.count):
        examples = np.arange(host, n, shard.count)
        rows = tables[host, : len(examples)]
        all_lengths[examples] = rows[:, 0]
        ends = np.cumsum(rows[:, 2])
        for i, (_, reason, size), end in zip(examples, rows, ends):
            if reason >= 0:
                message = bytes(blobs[host, end - size : end]).decode("utf-8")
                all_failures.append(DecodeFailure(int(i), _REASONS[reason], message))
    return all_lengths, sorted(all_failures, key=lambda f: f.index)


def build_host_shard(examples: Sequence[Example], cache_dir: str | os.PathLike, shard: HostShard, *,
                     sampling_rate: int, num_workers: int, name: str = "train"
                     ) -> tuple[HostShardAudio, list[DecodeFailure]]:
    """Decode this host's examples (or reuse their cache), exchange the results with the other hosts ->
    (audio of every kept clip, every host's skipped clips), the same on every host but for the samples.

    Raises AudioError when no host could decode any clip.
    """
    examples = list(examples)
    n, owned = len(examples), shard.owned(len(examples))
    local, lengths, failures = None, np.full(len(owned), -1, dtype=np.int64), []
    if len(owned):
        local, skipped = build_audio_cache([examples[i] for i in owned], cache_dir, sampling_rate=sampling_rate,
                                           num_workers=num_workers, suffix=f"-{shard.name}", allow_none_kept=True)
        lengths[local.example_indices] = local.lengths
        failures = [DecodeFailure(int(owned[f.index]), f.reason, f.message) for f in skipped]
    log.info("%s: decoded %d of %d clips (host %d of %d)", name, len(owned), n, shard.index, shard.count)
    all_lengths, all_failures = exchange_decode_results(shard, n, examples_digest(examples), lengths, failures,
                                                        name)
    kept = np.flatnonzero(all_lengths >= 0)
    if not len(kept):
        first = "; ".join(f.message for f in all_failures[:3])
        raise AudioError(f"none of the {n} clips could be decoded: {first}")
    local_rows = np.full(n, -1, dtype=np.int64)
    if local is not None:
        local_rows[owned[local.example_indices]] = np.arange(len(local))
    audio = HostShardAudio(local, all_lengths[kept], kept, kept % shard.count, local_rows[kept], shard.index)
    return audio, all_failures
