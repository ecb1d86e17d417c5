"""Length buckets: a few static padded lengths that waste as little compute as possible.

Every distinct batch shape costs an XLA compilation, so utterances are padded up to one of
``k`` bucket lengths. The lengths are placed by dynamic programming to minimise the total padding
over the dataset (quantile placement wastes more on skewed length distributions).
"""

from __future__ import annotations

import numpy as np

from xlsr_jax.data.audio import SAMPLING_RATE

MAX_BINS = 2000  # histogram bins for the O(bins^2 * k) dynamic programme


def _histogram(lengths: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Lengths rounded up to a grid -> (distinct values ``[bins]``, counts ``[bins]``, grid step).

    The grid starts at ``multiple`` and is coarsened (a multiple of it) until at most MAX_BINS
    distinct values remain.
    """
    step = multiple
    while True:
        rounded = -(-lengths // step) * step
        values, counts = np.unique(rounded, return_counts=True)
        if len(values) <= MAX_BINS:
            return values, counts, step
        step *= -(-len(values) // MAX_BINS)


def bucket_boundaries(lengths, num_buckets: int, *, multiple: int = 320) -> np.ndarray:
    """Padded lengths minimising total padding: int64 ``[k]``, ascending, ``k <= num_buckets``.

    Args:
      lengths: ``[n]`` utterance lengths (samples).
      num_buckets: at most this many buckets; fewer if fewer distinct rounded lengths exist.
      multiple: every boundary is a multiple of this (320 = one wav2vec2 frame at 16 kHz).
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0:
        raise ValueError("bucket_boundaries: no lengths")
    if num_buckets < 1 or multiple < 1:
        raise ValueError(f"bucket_boundaries: num_buckets={num_buckets} and "
                         f"multiple={multiple} must be >= 1")
    values, counts, _ = _histogram(np.maximum(lengths, 1), multiple)
    k = min(num_buckets, len(values))
    ends = _optimal_partition(values.astype(np.float64), counts.astype(np.float64), k)
    return values[ends].astype(np.int64)


def _optimal_partition(values: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Split bins ``[bins]`` into ``k`` contiguous groups, each padded to its largest value, with
    minimal total padding; return the index of each group's last bin ``[k]``.

    ``cost[i, j]`` pads bins ``i..j-1`` to ``values[j-1]``; ``best[j]`` is the least cost of the
    first ``j`` bins. Exact in float64 while counts * lengths stay below 2**53.
    """
    n = len(values)
    cum_c = np.concatenate([[0.0], np.cumsum(counts)])
    cum_s = np.concatenate([[0.0], np.cumsum(counts * values)])
    top = np.concatenate([[0.0], values])  # top[j] = values[j-1], the pad target of bins < j
    cost = top[None, :] * (cum_c[None, :] - cum_c[:, None]) - (cum_s[None, :] - cum_s[:, None])
    cost[np.tril_indices(n + 1)] = np.inf  # groups must be non-empty: i < j
    best = cost[0].copy()  # one group
    choice = np.zeros((k, n + 1), dtype=np.int64)
    for g in range(1, k):
        total = best[:, None] + cost  # [i, j]: first i bins in g groups, bins i..j-1 in one
        choice[g] = np.argmin(total, axis=0)
        best = total[choice[g], np.arange(n + 1)]
    ends, j = [], n
    for g in range(k - 1, -1, -1):
        ends.append(j - 1)
        j = choice[g, j]
    return np.asarray(ends[::-1], dtype=np.int64)


def assign_buckets(lengths, boundaries) -> np.ndarray:
    """Smallest bucket whose padded length fits each utterance: int64 ``[n]``."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    boundaries = np.asarray(boundaries, dtype=np.int64)
    if lengths.size and lengths.max() > boundaries[-1]:
        i = int(np.argmax(lengths))
        raise ValueError(f"utterance {i} has {lengths[i]} samples, more than the largest bucket "
                         f"({boundaries[-1]}); rebuild the boundaries or filter by duration")
    return np.searchsorted(boundaries, lengths, side="left").astype(np.int64)


def padding_fraction(lengths, boundaries) -> float:
    """Padded samples / all samples when each utterance is padded to its bucket."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    padded = np.asarray(boundaries, dtype=np.int64)[assign_buckets(lengths, boundaries)]
    total = padded.sum()
    return float((total - lengths.sum()) / total) if total else 0.0


def bucket_batch_sizes(boundaries_samples, audio_seconds_per_device: float, *, devices: int, accum: int,
                       sampling_rate: int = SAMPLING_RATE) -> list[int]:
    """Token-budget batching (fairseq's ``max_tokens``): global batch size per bucket, ``[k]``.

    Each device's micro-batch of bucket ``b`` holds the most clips whose padded audio fits the budget,
    ``max(1, floor(budget / bucket seconds))``; the global batch is that times ``devices * accum``, so
    it splits evenly over data-parallel devices and accumulation micro-batches. Shorter buckets get
    bigger batches, and every batch pads to about the same number of audio seconds.

    Args:
      boundaries_samples: ``[k]`` padded bucket lengths (samples).
      audio_seconds_per_device: padded audio seconds per device per micro-batch, > 0.
      devices: data-parallel devices (the batch axis of the mesh), >= 1.
      accum: gradient accumulation micro-batches per step, >= 1.
    """
    if not audio_seconds_per_device > 0 or devices < 1 or accum < 1:
        raise ValueError(f"bucket_batch_sizes: audio_seconds_per_device={audio_seconds_per_device} must "
                         f"be > 0, devices={devices} and accum={accum} >= 1")
    boundaries = np.asarray(boundaries_samples, dtype=np.int64).reshape(-1)
    if boundaries.size == 0 or boundaries.min() < 1:
        raise ValueError(f"bucket_batch_sizes: boundaries {boundaries.tolist()} must be >= 1 samples")
    # Integer samples, so that 3 s / 0.6 s is 5 clips and not float 4.999...
    budget = int(round(audio_seconds_per_device * sampling_rate))
    per_device = np.maximum(1, budget // boundaries)
    return [int(n) * devices * accum for n in per_device]
