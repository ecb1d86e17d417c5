"""Bucketed, length-grouped, deterministic and resumable batches of fixed-shape numpy arrays.

Each epoch's plan is a pure function of (seed, epoch): examples are shuffled within their length
bucket and cut into full batches (so a batch holds similar lengths and little padding), then the
order of batches is shuffled (so the order of lengths is random). With per-example weights (a mixture
of sources, `sources.source_weight`) an example of weight w appears w times per epoch on average:
floor(w) times, plus once more for a share of them drawn each epoch. Buckets share one batch size or
each has its own (token-budget batching: short clips in bigger batches, `buckets.bucket_batch_sizes`);
either way every bucket is one static shape. Every process computes the same global plan and loads
only its own rows, so hosts agree without talking to each other. When each host holds only the clips it
decoded (``owners``, see data/shards.py), each host's slice of every global batch holds only its own clips.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from xlsr_jax.data.audio import normalize_int16_into, normalize_waveform
from xlsr_jax.data.batch import empty_batch
from xlsr_jax.data.buckets import assign_buckets
from xlsr_jax.data.prepare import PreparedDataset


class BatchLoader:
    """Batches of one :class:`PreparedDataset`, padded to a bucket's static shape.

    ``batch_size`` is the global batch: one size for every bucket, or one per bucket (each a multiple
    of ``process_count``). A batch of bucket ``b`` is a dict of numpy arrays holding this process's
    ``local = batch_sizes[b] // process_count`` rows:
      input_values    float32 [local, S]  normalised per utterance, zeros on padding
      attention_mask  int32   [local, S]
      labels          int32   [local, L]  padded with -100
      example_mask    float32 [local]     0 for dummy rows that fill the epoch's last batch
      index           int64   [local]     example index, -1 for dummy rows
    with ``S = boundaries[bucket]`` and ``L`` the bucket's padded label length.

    ``owners`` (int64 ``[n]``, the process holding each example's audio; ignored in a one-process run)
    makes the plan give every process only rows it owns. None: any process loads any row.
    """

    def __init__(self, dataset: PreparedDataset, *, batch_size: int | Sequence[int], boundaries,
                 label_multiple: int = 16, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, workers: int = 1,
                 weights: Sequence[float] | None = None, owners: Sequence[int] | None = None,
                 augment: Callable[[np.ndarray, int, int], np.ndarray] | None = None):
        if len(dataset) == 0:
            raise ValueError("BatchLoader: the dataset is empty")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.dataset = dataset
        # (float32 [n], step, global row) -> float32 [n], for training batches (data/augment.py Augmenter)
        self.augment = augment
        self.boundaries = np.asarray(boundaries, dtype=np.int64)
        self.batch_sizes = per_bucket_sizes(batch_size, len(self.boundaries), process_count)  # global, [k]
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.workers = workers  # threads assembling batches (numpy releases the GIL in its loops)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_sizes = tuple(bs // process_count for bs in self.batch_sizes)
        self.buckets = assign_buckets(dataset.lengths, self.boundaries)  # [n]
        self.label_lengths = _bucket_label_lengths(
            self.buckets, dataset.labels, len(self.boundaries), label_multiple)
        members = [np.flatnonzero(self.buckets == b) for b in range(len(self.boundaries))]
        self.owners = _check_owners(owners, len(dataset), process_count)
        # The plan is cut from parts, each a list of per-bucket members: one part holding everything, or
        # one part per process holding the examples it owns.
        self._parts = ([members] if self.owners is None
                       else [[m[self.owners[m] == p] for m in members] for p in range(process_count)])
        self._draws = ([_weighted_draws(part, weights, len(dataset)) for part in self._parts] if shuffle
                       else [None] * len(self._parts))
        # How many batches a bucket yields depends on its size, never on the order of its members; the
        # weighted draws fix each (part, bucket) size per epoch: any epoch's plan has exactly this many batches.
        sizes = [[len(m) for m in part] if draws is None else [sum(count for _, count in groups) for groups in draws]
                 for part, draws in zip(self._parts, self._draws)]
        if sum(map(sum, sizes)) == 0:
            raise ValueError("BatchLoader: the weights draw no example per epoch; raise them")
        self.batches_per_epoch = len(self._cut([[np.zeros(n, np.int64) for n in part] for part in sizes]))
        self._padding_fraction: float | None = None

    # ------------------------------------------------------------ plan

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global plan of one epoch: ``[(bucket, example indices int64 [batch_sizes[bucket]])]``,
        ``-1`` marking dummy rows. A pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for part, draws in zip(self._parts, self._draws):
            if draws is not None:
                parts.append([rng.permutation(_draw(groups, rng)) for groups in draws])
            else:
                parts.append([rng.permutation(m) if self.shuffle else m for m in part])
        batches = self._cut(parts)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _cut(self, parts: list[list[np.ndarray]]) -> list[tuple[int, np.ndarray]]:
        """`cut_batches` with this loader's batch sizes: global ones for one part, local ones for a part
        per process."""
        return cut_batches(parts, self.batch_sizes if len(parts) == 1 else self.local_batch_sizes)

    @property
    def shapes(self) -> dict[int, tuple[int, int]]:
        """Bucket -> (padded samples S, padded label length L)."""
        return {b: (int(s), int(l)) for b, (s, l) in
                enumerate(zip(self.boundaries, self.label_lengths))}

    @property
    def batch_shapes(self) -> dict[int, tuple[int, int, int]]:
        """Bucket -> (global batch size B, padded samples S, padded label length L): every step shape."""
        return {b: (self.batch_sizes[b], s, l) for b, (s, l) in self.shapes.items()}

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

    def load_batch(self, bucket: int, indices: np.ndarray, step: int | None = None) -> dict[str, np.ndarray]:
        """This process's rows of one planned global batch, as padded numpy arrays; the batch of training
        step ``step`` is augmented (when the loader has ``augment``), each row as drawn for its position
        in the global batch."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) != self.batch_sizes[bucket]:
            raise ValueError(f"a batch of bucket {bucket} has {len(indices)} rows, the bucket's batch "
                             f"size is {self.batch_sizes[bucket]}")
        p, local = self.process_index, self.local_batch_sizes[bucket]
        rows = indices[p * local : (p + 1) * local]
        samples, label_len = int(self.boundaries[bucket]), int(self.label_lengths[bucket])
        batch = empty_batch(samples, label_len, rows)
        audio = self.dataset.audio
        augment = self.augment if step is not None else None
        # The cache's int16 samples normalised straight into the batch row: no float copy per clip.
        pcm = getattr(audio, "pcm", None) if augment is None else None
        for r, i in enumerate(rows):
            if i < 0:
                continue
            wav = pcm(int(i)) if pcm is not None else audio[int(i)]
            n, label = len(wav), self.dataset.labels[i]
            if n != self.dataset.lengths[i]:
                raise ValueError(f"example {i} ({self.dataset.examples[i].path}): audio has {n} "
                                 f"samples, the dataset says {self.dataset.lengths[i]}")
            if pcm is not None:
                normalize_int16_into(wav, batch["input_values"][r, :n])
            elif augment is not None:
                batch["input_values"][r, :n] = normalize_waveform(augment(wav, step, p * local + r))
            else:
                batch["input_values"][r, :n] = normalize_waveform(wav)
            batch["attention_mask"][r, :n] = 1
            batch["labels"][r, : len(label)] = label
        return batch

    def _plan_from(self, step: int) -> Iterator[tuple[int, np.ndarray, int]]:
        """The planned (bucket, indices, step) of every global step from ``step`` on, endlessly."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            for bucket, indices in self.epoch_batches(epoch)[offset:]:
                yield bucket, indices, step
                step += 1
            epoch, offset = epoch + 1, 0

    def _loaded(self, plan: Iterator[tuple]) -> Iterator[dict[str, np.ndarray]]:
        """``load_batch`` of each planned batch, in plan order, ``prefetch`` ahead, on ``workers``
        threads."""
        if self.workers > 1:
            return _loaded_in_threads(self.load_batch, plan, self.workers, self.prefetch)
        return prefetched((self.load_batch(*planned) for planned in plan), self.prefetch)

    def iter_from_step(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Infinite batches starting at global ``step`` (same batches as skipping from 0)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return self._loaded(self._plan_from(step))

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the data (evaluation)."""
        return self._loaded(iter(self.epoch_batches(epoch)))

    def __len__(self) -> int:
        return self.batches_per_epoch


def cut_batches(parts: list[list[np.ndarray]], sizes: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """Each part's members of each bucket (int64 indices, in the given order) cut into global batches of
    ``(bucket, indices)``, ``sizes[b]`` rows from each part per batch of bucket ``b``.

    One part (everything): full batches of each bucket's global size. One part per process: each
    global batch of bucket ``b`` is ``process_count`` local batches, the ``p``-th from part ``p``;
    every part gives a bucket as many local batches as the part with the fewest fills.
    What a part has left (a bucket's remainder, or its surplus over the other parts) still fits the
    next larger bucket, so it joins that bucket's members (whatever the sizes are); what is left
    after the largest non-empty bucket becomes batches of that bucket, filled with dummy rows (-1).
    """
    top = max(b for part in parts for b, m in enumerate(part) if len(m))
    batches, carry = [], [np.zeros(0, dtype=np.int64)] * len(parts)
    for b in range(top + 1):
        pools, bs = [np.concatenate([c, part[b]]) for c, part in zip(carry, parts)], sizes[b]
        full = min(len(pool) for pool in pools) // bs
        batches.extend((b, np.concatenate([pool[k * bs : (k + 1) * bs] for pool in pools]))
                       for k in range(full))
        carry = [pool[full * bs :] for pool in pools]
    bs = sizes[top]
    for k in range(-(-max(len(c) for c in carry) // bs)):
        batches.append((top, np.concatenate([_filled(c[k * bs : (k + 1) * bs], bs) for c in carry])))
    return batches


def _weighted_draws(members: list[np.ndarray], weights, n: int) -> list[list[tuple[np.ndarray, int]]] | None:
    """Per bucket, ``[(indices of one weight, how many of them an epoch draws)]``; None when every weight
    is 1 (the plain plan, unchanged).

    A weight's examples contribute ``round(w * count)`` draws per epoch, apportioned to the buckets by
    largest remainder, so each bucket's size, and with it the number of batches, is the same every epoch.
    """
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights has shape {weights.shape}, expected one per example ({n})")
    if not np.all(weights > 0):
        raise ValueError(f"weights must be > 0; got {weights.min()}")
    if np.all(weights == 1):
        return None
    draws: list[list[tuple[np.ndarray, int]]] = [[] for _ in members]
    for w in np.unique(weights):
        groups = [m[weights[m] == w] for m in members]
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        if not sizes.sum():  # no example of this weight among these members (another process's part)
            continue
        quota = round(w * sizes.sum()) * sizes / sizes.sum()  # [buckets], sums to the weight's draws
        counts = np.floor(quota).astype(np.int64)
        short = int(round(quota.sum())) - int(counts.sum())
        counts[np.argsort(-(quota - counts), kind="stable")[:short]] += 1
        for b, (g, c) in enumerate(zip(groups, counts)):
            if len(g):
                draws[b].append((g, int(c)))
    return draws


def _check_owners(owners, n: int, process_count: int) -> np.ndarray | None:
    """``owners`` as int64 ``[n]`` after checking it; None without owners or in a one-process run."""
    if owners is None or process_count == 1:
        return None
    owners = np.asarray(owners, dtype=np.int64)
    if owners.shape != (n,):
        raise ValueError(f"owners has shape {owners.shape}, expected one per example ({n})")
    if owners.size and not (0 <= owners.min() and owners.max() < process_count):
        raise ValueError(f"owners must be process indices in [0, {process_count}); got {owners.min()}..{owners.max()}")
    return owners


def _filled(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` followed by dummy rows (-1) up to ``size``: int64 ``[size]``."""
    return np.concatenate([rows, np.full(size - len(rows), -1, dtype=np.int64)])


def _draw(groups: list[tuple[np.ndarray, int]], rng: np.random.Generator) -> np.ndarray:
    """One epoch's members of a bucket: each group's indices ``count // len`` times over, plus
    ``count % len`` of them drawn without replacement."""
    parts = []
    for indices, count in groups:
        full, extra = divmod(count, len(indices))
        parts.extend([indices] * full)
        parts.append(rng.choice(indices, size=extra, replace=False))
    return np.concatenate(parts).astype(np.int64)


def per_bucket_sizes(batch_size: int | Sequence[int], num_buckets: int, process_count: int) -> tuple[int, ...]:
    """Global batch size per bucket ``[num_buckets]``: one size repeated, or one given per bucket."""
    if isinstance(batch_size, (int, np.integer)):
        sizes, names = (int(batch_size),) * num_buckets, ["batch_size"] * num_buckets
    else:
        sizes = tuple(int(bs) for bs in batch_size)
        names = [f"batch_size[{b}]" for b in range(len(sizes))]
        if len(sizes) != num_buckets:
            raise ValueError(f"batch_size has {len(sizes)} sizes for {num_buckets} buckets")
    for name, bs in zip(names, sizes):
        if bs < 1 or bs % process_count:
            raise ValueError(f"{name}={bs} must be a positive multiple of process_count={process_count}")
    return sizes


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


def prefetched(source: Iterator, depth: int) -> Iterator:
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


def _loaded_in_threads(load, plan: Iterator[tuple], workers: int, depth: int) -> Iterator:
    """``load(*planned)`` of each planned batch on a pool of ``workers`` threads, yielded in plan
    order, with ``max(depth, workers)`` batches in flight. Closing the generator cancels the rest."""
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xlsr_jax-loader")
    pending: collections.deque = collections.deque()
    try:
        for planned in itertools.islice(plan, max(depth, workers)):
            pending.append(pool.submit(load, *planned))
        while pending:
            batch = pending.popleft().result()
            for planned in itertools.islice(plan, 1):
                pending.append(pool.submit(load, *planned))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
