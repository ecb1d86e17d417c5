import itertools

import numpy as np
import pytest

from xlsr_jax.data import buckets as buckets_mod
from xlsr_jax.data.buckets import assign_buckets, bucket_batch_sizes, bucket_boundaries, padding_fraction


def lognormal_lengths(n: int = 20000, seed: int = 0) -> np.ndarray:
    """Common Voice-like clip lengths: lognormal around 4 s, clipped to 1-10 s, 16 kHz."""
    seconds = np.clip(np.random.default_rng(seed).lognormal(np.log(4.0), 0.45, n), 1.0, 10.0)
    return (seconds * 16000).astype(np.int64)


def quantile_boundaries(lengths, k, multiple=320):
    q = np.quantile(lengths, np.arange(1, k + 1) / k)
    return np.unique(-(-np.ceil(q).astype(np.int64) // multiple) * multiple)


def brute_force_padding(lengths, k, multiple):
    """Least padding over every choice of k boundaries among the rounded lengths."""
    values = np.unique(-(-lengths // multiple) * multiple)
    best = np.inf
    for combo in itertools.combinations(values[:-1], k - 1):
        bounds = np.array(list(combo) + [values[-1]])
        best = min(best, int(bounds[assign_buckets(lengths, bounds)].sum() - lengths.sum()))
    return best


def test_optimal_on_lognormal_mix():
    lengths = lognormal_lengths()
    for k, limit in ((16, 0.06), (8, 0.10)):
        bounds = bucket_boundaries(lengths, k)
        assert len(bounds) == k and bounds.dtype == np.int64
        assert np.all(np.diff(bounds) > 0) and np.all(bounds % 320 == 0)
        assert bounds[-1] >= lengths.max() > bounds[-2]
        dp = padding_fraction(lengths, bounds)
        assert dp < limit, (k, dp)
        assert dp <= padding_fraction(lengths, quantile_boundaries(lengths, k))


def test_matches_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(5):
        lengths = rng.integers(100, 4000, size=60)
        for k in (1, 2, 3, 4):
            bounds = bucket_boundaries(lengths, k, multiple=100)
            pad = int(bounds[assign_buckets(lengths, bounds)].sum() - lengths.sum())
            assert pad == brute_force_padding(lengths, k, 100), (trial, k)


def test_fewer_distinct_lengths_than_buckets():
    bounds = bucket_boundaries([320, 300, 640, 641, 10], 16)
    np.testing.assert_array_equal(bounds, [320, 640, 960])
    np.testing.assert_array_equal(bucket_boundaries([5], 4), [320])


def test_coarsened_histogram(monkeypatch):
    monkeypatch.setattr(buckets_mod, "MAX_BINS", 50)
    lengths = lognormal_lengths(3000)
    bounds = bucket_boundaries(lengths, 8)
    assert len(bounds) == 8 and np.all(bounds % 320 == 0) and bounds[-1] >= lengths.max()
    assert padding_fraction(lengths, bounds) < 0.12


def test_assign_and_padding_fraction():
    bounds = np.array([320, 640, 960])
    np.testing.assert_array_equal(assign_buckets([1, 320, 321, 960], bounds), [0, 0, 1, 2])
    assert padding_fraction([320, 480], bounds) == pytest.approx(160 / 960)
    with pytest.raises(ValueError, match="utterance 1 has 961 samples.*largest bucket"):
        assign_buckets([10, 961], bounds)
    with pytest.raises(ValueError, match="no lengths"):
        bucket_boundaries([], 4)


def test_bucket_batch_sizes_fill_the_audio_budget():
    # XLSR-53's recipe: 16 clips x 15 s per device; buckets of 3.2, 5, 7.5 and 15 s at 16 kHz.
    bounds = [51200, 80000, 120000, 240000]
    assert bucket_batch_sizes(bounds, 240.0, devices=1, accum=1) == [75, 48, 32, 16]
    # global = per device x data-parallel devices x accumulation steps: each splits evenly
    assert bucket_batch_sizes(bounds, 240.0, devices=4, accum=2) == [600, 384, 256, 128]
    # the most clips that fit (floor), at least one even when one clip is over the budget
    assert bucket_batch_sizes(bounds, 10.0, devices=2, accum=1, sampling_rate=16000) == [6, 4, 2, 2]
    assert bucket_batch_sizes([8000], 1.5, devices=1, accum=1, sampling_rate=8000) == [1]
    # counted in samples: 0.3 s / 0.1 s is 3 clips (float division would say 2.9999999999999996)
    assert bucket_batch_sizes([1600], 0.3, devices=1, accum=1) == [3]
    with pytest.raises(ValueError, match="audio_seconds_per_device=0 must be > 0"):
        bucket_batch_sizes(bounds, 0, devices=1, accum=1)
