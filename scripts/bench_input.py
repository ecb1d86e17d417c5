#!/usr/bin/env python3
"""Audio-seconds per second the input pipeline delivers, on a Common Voice-like mix of 1-10 s clips.

    python scripts/bench_input.py                          # 300 clips; 1 and 2 workers
    python scripts/bench_input.py --clips 600 --workers 4  # more clips, 1 and 4 workers
    python scripts/bench_input.py --grain                  # also grain's loader on the same batches

Synthesises 48 kHz mono MP3s (a tone sweep plus noise, Common Voice's format and rate; durations
log-normal around 4.5 s, clipped to 1-10 s) in a temporary folder, then measures:
  (a) decoding them into the audio cache (MP3 -> 16 kHz int16), in-process and with N worker processes;
  (b) batches from the cache through BatchLoader at the shapes training uses (per-device batch size 16,
      ``--num-buckets`` length buckets, as configs/common_voice_tr.yaml), with 1 and N loader threads.
Audio-seconds count the clips' real samples, not padding. Then the padded fraction and the number of
batch shapes with bucketing, against random batches padded to the same buckets (or each to its own
longest clip, which needs one compiled shape per distinct length).

The last lines printed are
    cache_audio_s_per_s: X    batches from the cache, N loader threads
    mp3_audio_s_per_s: X      MP3 decoding into the cache, N workers
    padded_fraction: X        with bucketing (--num-buckets), over --plan-clips clips
    shapes: N                 batch shapes with bucketing
Needs numpy, soundfile and soxr, not jax.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsr_jax.data.buckets import assign_buckets, bucket_boundaries  # noqa: E402
from xlsr_jax.data.cache import build_audio_cache  # noqa: E402
from xlsr_jax.data.loader import BatchLoader  # noqa: E402
from xlsr_jax.data.prepare import PreparedDataset  # noqa: E402
from xlsr_jax.data.sources import Example  # noqa: E402

SAMPLING_RATE = 16000
MP3_RATE = 48000  # Common Voice's clips
FRAME = 320  # samples per wav2vec2 output frame: bucket lengths are multiples of it
CHARS_PER_SECOND = 14  # a transcript's length, roughly, in Common Voice


def clip_seconds(count: int, rng: np.random.Generator) -> np.ndarray:
    """Common Voice-like durations ``[count]``: log-normal around 4.5 s, clipped to 1-10 s."""
    return np.clip(rng.lognormal(np.log(4.5), 0.45, count), 1.0, 10.0)


def synthesise_clips(folder: Path, count: int, seed: int) -> list[Example]:
    """``count`` 48 kHz mono MP3s of 1-10 s in ``folder``, as Examples."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    seconds = clip_seconds(count, rng)
    examples = []
    for k, s in enumerate(seconds):
        path = folder / f"clip_{k:05d}.mp3"
        examples.append(Example(str(path), "x"))
        if path.exists():  # --dir of an earlier run: same durations (drawn above), reused
            continue
        n = int(round(s * MP3_RATE))
        t = np.arange(n) / MP3_RATE
        f0 = 120 + 80 * rng.random()  # a pitch-like sweep, so the encoder has something to code
        wav = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * np.sin(t))) + 0.02 * rng.standard_normal(n)
        sf.write(str(path), wav.astype(np.float32), MP3_RATE, format="MP3")
    return examples


def bench_decode(examples: list[Example], cache_dir: Path, workers: int):
    """Decode into a fresh cache -> (audio-s/s, cache)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    cache, skipped = build_audio_cache(examples, cache_dir, sampling_rate=SAMPLING_RATE, num_workers=workers)
    elapsed = time.perf_counter() - start
    if skipped:
        raise SystemExit(f"{len(skipped)} synthetic clips failed to decode: {skipped[0].message}")
    return float(cache.lengths.sum()) / SAMPLING_RATE / elapsed, cache


def dataset_of(cache, seed: int, lengths: np.ndarray | None = None) -> PreparedDataset:
    """The cache as a training dataset, with random labels of a transcript's length; or, with
    ``lengths`` ``[n]`` and no cache, a dataset for planning only (no audio)."""
    rng = np.random.default_rng(seed)
    lengths = cache.lengths.copy() if lengths is None else lengths
    labels = [rng.integers(0, 40, max(1, int(n / SAMPLING_RATE * CHARS_PER_SECOND))).astype(np.int32)
              for n in lengths]
    return PreparedDataset(texts=["x"] * len(lengths), labels=labels, lengths=lengths, audio=cache,
                           examples=[Example(f"clip {i}", "x") for i in range(len(lengths))])


def bench_batches(loader: BatchLoader, min_seconds: float) -> float:
    """Real (unpadded) audio-seconds per second from ``loader.iter_from_step``, for at least
    ``min_seconds`` after one warm-up batch."""
    batches = loader.iter_from_step(0)
    try:
        return _delivered(batches, loader.dataset.lengths, min_seconds)
    finally:
        batches.close()


def _delivered(batches, lengths: np.ndarray, min_seconds: float) -> float:
    """Real audio-seconds per second of ``batches`` (dicts with an ``index`` row, -1 for fillers) over at
    least ``min_seconds`` after one warm-up batch; ``lengths`` in samples ``[n]``."""
    next(batches)
    audio, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        index = next(batches)["index"]
        audio += float(lengths[index[index >= 0]].sum()) / SAMPLING_RATE
    return audio / (time.perf_counter() - start)


def random_batch_padding(lengths: np.ndarray, boundaries: np.ndarray, batch_size: int, seed: int):
    """Random batches (no length grouping): (padded fraction when each is padded to the buckets,
    shapes used that way, padded fraction and shapes when each is padded to its own longest clip)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    longest = np.asarray([lengths[b].max() for b in batches])
    bucketed = boundaries[assign_buckets(longest, boundaries)]
    own = -(-longest // FRAME) * FRAME
    real = sum(float(lengths[b].sum()) for b in batches)
    total_bucketed, total_own = float(bucketed.sum()) * batch_size, float(own.sum()) * batch_size
    return (1 - real / total_bucketed, len(np.unique(bucketed)), 1 - real / total_own, len(np.unique(own)))


class _GrainPlan:
    """grain's data source: the i-th planned batch ``(bucket, indices)`` of epoch 0."""

    def __init__(self, loader: BatchLoader):
        self.plan = loader.epoch_batches(0)

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        return self.plan[i]


class _GrainLoad:
    """grain's map: a planned batch -> ``BatchLoader.load_batch`` (pickled into grain's workers)."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def map(self, planned):
        return self.loader.load_batch(*planned)


def bench_grain(loader: BatchLoader, workers: int, min_seconds: float) -> float:
    """grain's DataLoader over the same planned batches (``load_batch`` as its map), audio-s/s."""
    from absl import flags
    import grain.python as grain

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; a script without absl.app must say so

    class Load(_GrainLoad, grain.MapTransform):  # grain's base class, defined once grain is imported
        pass

    sampler = grain.IndexSampler(len(_GrainPlan(loader)), shuffle=False, num_epochs=None,
                                 shard_options=grain.NoSharding(), seed=0)
    # worker_count=0: in the main process; >0: that many worker processes, batches come back by shared memory.
    data = grain.DataLoader(data_source=_GrainPlan(loader), sampler=sampler, operations=[Load(loader)],
                            worker_count=workers, worker_buffer_size=2)
    return _delivered(iter(data), loader.dataset.lengths, min_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=300, help="synthetic clips (default 300)")
    parser.add_argument("--workers", type=int, default=2, help="N: decoding processes and loader threads")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per batch (common_voice_tr.yaml: 16)")
    parser.add_argument("--num-buckets", type=int, default=8, help="length buckets (data.num_buckets)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time each loader setting this long")
    parser.add_argument("--plan-clips", type=int, default=20000,
                        help="clips (lengths only, no audio) for padding and shapes: a training set's size")
    parser.add_argument("--dir", help="keep the clips and caches here (default: a temporary folder)")
    parser.add_argument("--grain", action="store_true", help="also time grain's DataLoader")
    args = parser.parse_args(argv)
    if args.clips < args.batch_size:
        parser.error(f"--clips {args.clips} must be >= --batch-size {args.batch_size}")

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_input_"))
    try:
        (root / "clips").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        examples = synthesise_clips(root / "clips", args.clips, seed=0)
        print(f"{args.clips} clips of 48 kHz MP3 in {root / 'clips'} ({time.perf_counter() - start:.1f} s)")

        mp3 = {}
        for workers in sorted({1, args.workers}):
            mp3[workers], cache = bench_decode(examples, root / f"cache-{workers}", workers)
            print(f"decode MP3 -> cache, {workers} worker(s): {mp3[workers]:,.0f} audio-s/s")
        hours = float(cache.lengths.sum()) / SAMPLING_RATE / 3600
        print(f"audio: {hours * 60:.1f} min, clips {cache.lengths.min() / SAMPLING_RATE:.1f}-"
              f"{cache.lengths.max() / SAMPLING_RATE:.1f} s, mean {cache.lengths.mean() / SAMPLING_RATE:.1f} s")

        dataset = dataset_of(cache, seed=0)
        boundaries = bucket_boundaries(dataset.lengths, args.num_buckets, multiple=FRAME)

        def make_loader(workers: int, prefetch: int = 4) -> BatchLoader:
            return BatchLoader(dataset, batch_size=args.batch_size, boundaries=boundaries, seed=0,
                               prefetch=prefetch, workers=workers)

        cache_rate = {}
        for workers in sorted({1, args.workers}):
            cache_rate[workers] = bench_batches(make_loader(workers), args.seconds)
            print(f"batches from the cache, {workers} loader thread(s): {cache_rate[workers]:,.0f} audio-s/s")
        if args.grain:
            for workers in (0, args.workers):
                rate = bench_grain(make_loader(1, prefetch=0), workers, args.seconds)
                print(f"grain DataLoader, worker_count={workers}: {rate:,.0f} audio-s/s")

        loader = make_loader(1)
        print(f"bucketing the {len(dataset)} clips above: padded {loader.padding_fraction:.1%}, "
              f"{len(loader.batch_shapes)} shapes")
        # Padding and shapes on a training set's worth of clips: the epoch's last, partly dummy batch and
        # the remainders that move up a bucket weigh less than on a few hundred clips.
        lengths = np.round(clip_seconds(args.plan_clips, np.random.default_rng(1)) * SAMPLING_RATE).astype(np.int64)
        planned = dataset_of(None, seed=1, lengths=lengths)
        print(f"{args.plan_clips} clips (lengths only), batch size {args.batch_size}:")
        for k in sorted({4, 8, 16, args.num_buckets}):
            b = bucket_boundaries(lengths, k, multiple=FRAME)
            plan = BatchLoader(planned, batch_size=args.batch_size, boundaries=b, seed=0)
            print(f"  bucketing, {k} buckets: padded {plan.padding_fraction:.1%}, {len(plan.batch_shapes)} shapes")
        boundaries = bucket_boundaries(lengths, args.num_buckets, multiple=FRAME)
        plan = BatchLoader(planned, batch_size=args.batch_size, boundaries=boundaries, seed=0)
        padded, shapes = plan.padding_fraction, len(plan.batch_shapes)
        r_padded, r_shapes, own_padded, own_shapes = random_batch_padding(lengths, boundaries, args.batch_size,
                                                                          seed=0)
        print(f"  random batches, the {args.num_buckets} buckets: padded {r_padded:.1%}, {r_shapes} shapes")
        print(f"  random batches, each padded to its longest clip: padded {own_padded:.1%}, {own_shapes} shapes")

        print(f"cache_audio_s_per_s: {cache_rate[args.workers]:.0f}")
        print(f"mp3_audio_s_per_s: {mp3[args.workers]:.0f}")
        print(f"padded_fraction: {padded:.4f}")
        print(f"shapes: {shapes}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
