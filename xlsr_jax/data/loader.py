"""Bucketed, length-grouped, deterministic and resumable batches of fixed-shape numpy arrays.

Each epoch's plan is a pure function of (seed, epoch): examples are shuffled within their length
bucket and cut into full batches (so a batch holds similar lengths and little padding), then the
order of batches is shuffled (so the order of lengths is random). Every process computes the same
global plan and loads only its own rows, so hosts agree without talking to each other.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np

from xlsr_jax.data.audio import normalize_waveform
from xlsr_jax.data.buckets import assign_buckets
from xlsr_jax.data.prepare import PreparedDataset

LABEL_PAD = -100  # Hugging Face's ignore index for padded label positions
# The batch arrays the model steps take (`index` stays on the host).
MODEL_INPUTS = ("input_values", "attention_mask", "labels", "example_mask")


class BatchLoader:
    """Batches of one :class:`PreparedDataset`, padded to a bucket's static shape.

    A batch is a dict of numpy arrays holding this process's ``local = batch_size //
    process_count`` rows:
      input_values    float32 [local, S]  normalised per utterance, zeros on padding
      attention_mask  int32   [local, S]
      labels          int32   [local, L]  padded with -100
      example_mask    float32 [local]     0 for dummy rows that fill the epoch's last batch
      index           int64   [local]     example index, -1 for dummy rows
    with ``S = boundaries[bucket]`` and ``L`` the bucket's padded label length.
    """

    def __init__(self, dataset: PreparedDataset, *, batch_size: int, boundaries,
                 label_multiple: int = 16, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2):
        if len(dataset) == 0:
            raise ValueError("BatchLoader: the dataset is empty")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.boundaries = np.asarray(boundaries, dtype=np.int64)
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.buckets = assign_buckets(dataset.lengths, self.boundaries)  # [n]
        self.label_lengths = _bucket_label_lengths(
            self.buckets, dataset.labels, len(self.boundaries), label_multiple)
        self._members = [np.flatnonzero(self.buckets == b) for b in range(len(self.boundaries))]
        self.batches_per_epoch = -(-len(dataset) // batch_size)
        self._padding_fraction: float | None = None

    # ------------------------------------------------------------ plan

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global plan of one epoch: ``[(bucket, example indices int64 [batch_size])]``,
        ``-1`` marking dummy rows. A pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        bs, batches = self.batch_size, []
        carry = np.zeros(0, dtype=np.int64)
        last_bucket = 0
        for b, members in enumerate(self._members):
            if self.shuffle:
                members = rng.permutation(members)
            pool = np.concatenate([carry, members])
            if len(members):
                last_bucket = b
            full = len(pool) // bs
            batches.extend((b, pool[k * bs : (k + 1) * bs]) for k in range(full))
            # The remainder still fits the next larger bucket; it joins that one.
            carry = pool[full * bs :]
        if len(carry):
            dummies = np.full(bs - len(carry), -1, dtype=np.int64)
            batches.append((last_bucket, np.concatenate([carry, dummies])))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    @property
    def shapes(self) -> dict[int, tuple[int, int]]:
        """Bucket -> (padded samples S, padded label length L)."""
        return {b: (int(s), int(l)) for b, (s, l) in
                enumerate(zip(self.boundaries, self.label_lengths))}

    @property
    def padding_fraction(self) -> float:
        """Padded samples / all samples over an epoch plan (dummy rows count as padding)."""
        if self._padding_fraction is None:
            total = real = 0
            for b, idx in self.epoch_batches(0):
                total += int(self.boundaries[b]) * len(idx)
                real += int(self.dataset.lengths[idx[idx >= 0]].sum())
            self._padding_fraction = (total - real) / total
        return self._padding_fraction

    # ------------------------------------------------------------ batches

    def load_batch(self, bucket: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This process's rows of one planned global batch, as padded numpy arrays."""
        p, local = self.process_index, self.local_batch_size
        rows = np.asarray(indices, dtype=np.int64)[p * local : (p + 1) * local]
        samples, label_len = int(self.boundaries[bucket]), int(self.label_lengths[bucket])
        batch = {
            "input_values": np.zeros((local, samples), np.float32),
            "attention_mask": np.zeros((local, samples), np.int32),
            "labels": np.full((local, label_len), LABEL_PAD, np.int32),
            "example_mask": (rows >= 0).astype(np.float32),
            "index": rows.copy(),
        }
        for r, i in enumerate(rows):
            if i < 0:
                continue
            wav = self.dataset.audio[int(i)]
            n, label = len(wav), self.dataset.labels[i]
            if n != self.dataset.lengths[i]:
                raise ValueError(f"example {i} ({self.dataset.examples[i].path}): audio has {n} "
                                 f"samples, the dataset says {self.dataset.lengths[i]}")
            batch["input_values"][r, :n] = normalize_waveform(wav)
            batch["attention_mask"][r, :n] = 1
            batch["labels"][r, : len(label)] = label
        return batch

    def _produce(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            for bucket, indices in self.epoch_batches(epoch)[offset:]:
                yield self.load_batch(bucket, indices)
            epoch, offset = epoch + 1, 0

    def iter_from_step(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Infinite batches starting at global ``step`` (same batches as skipping from 0)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return _prefetched(self._produce(step), self.prefetch)

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the data (evaluation)."""
        plan = self.epoch_batches(epoch)
        return _prefetched((self.load_batch(b, idx) for b, idx in plan), self.prefetch)

    def __len__(self) -> int:
        return self.batches_per_epoch


def _bucket_label_lengths(buckets, labels, num_buckets: int, multiple: int) -> np.ndarray:
    """Padded label length per bucket: int64 ``[num_buckets]``. A bucket can receive examples of
    every smaller bucket (remainders move up), so its length is the running maximum."""
    longest = np.zeros(num_buckets, dtype=np.int64)
    np.maximum.at(longest, buckets, np.asarray([len(l) for l in labels], dtype=np.int64))
    longest = np.maximum(np.maximum.accumulate(longest), 1)
    return -(-longest // multiple) * multiple


# ---------------------------------------------------------------- prefetching


class _Raised:
    """An exception from the producer thread, carried to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _fill(source: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: move items from ``source`` into ``out`` until done or stopped."""
    try:
        for item in source:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        item = _DONE
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
        item = _Raised(exc)
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """Iterate ``source`` in a daemon thread, ``depth`` items ahead. Closing the returned
    generator (or dropping it) stops the thread."""
    if depth <= 0:
        yield from source
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_fill, args=(source, out, stop), daemon=True,
                              name="xlsr_jax-prefetch")
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
