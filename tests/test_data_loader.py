import gc
import itertools
import threading

import numpy as np
import pytest

from xlsr_jax.data.audio import normalize_waveform
from xlsr_jax.data.buckets import bucket_boundaries
from xlsr_jax.data.loader import BatchLoader
from xlsr_jax.data.prepare import PreparedDataset, prepare_dataset
from xlsr_jax.data.sources import Example, parse_source
from xlsr_jax.text import Vocab, normalize_text


class FakeAudio:
    """Deterministic waveforms without files: clip ``i`` is a tone whose pitch depends on ``i``."""

    def __init__(self, lengths, fail_at=None):
        self.lengths, self.fail_at = lengths, fail_at

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(f"clip {i}: disk on fire")
        n = int(self.lengths[i])
        return (0.1 * np.sin(np.arange(n) * 0.01 * (i + 1)) + 0.001 * i).astype(np.float32)


def fake_dataset(n=53, seed=0, fail_at=None, max_len=16000) -> PreparedDataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1000, max_len, size=n).astype(np.int64)
    labels = [rng.integers(0, 30, size=max(1, int(l) // 400)).astype(np.int32) for l in lengths]
    return PreparedDataset(texts=[f"t{i}" for i in range(n)], labels=labels, lengths=lengths,
                           audio=FakeAudio(lengths, fail_at),
                           examples=[Example(f"/x/{i}.wav", f"t{i}") for i in range(n)])


def make_loader(ds, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("boundaries", bucket_boundaries(ds.lengths, 4))
    return BatchLoader(ds, **kw)


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_plan_covers_every_example_once_per_epoch():
    ds = fake_dataset()
    loader = make_loader(ds)
    assert loader.batches_per_epoch == len(loader) == 14  # ceil(53 / 4)
    plans = [loader.epoch_batches(e) for e in range(3)]
    for plan in plans:
        assert len(plan) == loader.batches_per_epoch
        rows = np.concatenate([idx for _, idx in plan])
        np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(len(ds)))
        assert (rows < 0).sum() == 14 * 4 - 53
        for bucket, idx in plan:  # every example fits its batch's bucket
            assert np.all(ds.lengths[idx[idx >= 0]] <= loader.boundaries[bucket])
    assert [b for b, _ in plans[0]] != [b for b, _ in plans[1]]  # lengths in random order
    assert make_loader(ds).epoch_batches(1)[3][1].tolist() == plans[1][3][1].tolist()


def test_exact_resume_and_determinism():
    ds = fake_dataset()
    loader = make_loader(ds, seed=7)
    stream = loader.iter_from_step(0)
    reference = list(itertools.islice(stream, 2 * loader.batches_per_epoch + 5))
    stream.close()
    for step in (0, 1, 13, 14, 15, 30):
        resumed = make_loader(ds, seed=7).iter_from_step(step)
        assert_same_batch(next(resumed), reference[step])
        assert_same_batch(next(resumed), reference[step + 1])
        resumed.close()
    other_seed = next(make_loader(ds, seed=8).iter_from_step(0))
    assert not np.array_equal(other_seed["index"], reference[0]["index"])


def test_batch_contents_and_static_shapes():
    ds = fake_dataset()
    loader = make_loader(ds, label_multiple=8)
    plan = loader.epoch_batches(0)
    shapes = set()
    for (bucket, idx), batch in zip(plan, loader.iter_epoch(0)):
        samples, label_len = loader.shapes[bucket]
        assert batch["input_values"].shape == batch["attention_mask"].shape == (4, samples)
        assert batch["labels"].shape == (4, label_len) and label_len % 8 == 0
        assert batch["input_values"].dtype == np.float32 and batch["labels"].dtype == np.int32
        assert batch["attention_mask"].dtype == np.int32 and batch["index"].dtype == np.int64
        np.testing.assert_array_equal(batch["index"], idx)
        np.testing.assert_array_equal(batch["example_mask"], (idx >= 0).astype(np.float32))
        for r, i in enumerate(idx):
            if i < 0:
                assert not batch["attention_mask"][r].any() and (batch["labels"][r] == -100).all()
                assert not batch["input_values"][r].any()
                continue
            n, label = ds.lengths[i], ds.labels[i]
            np.testing.assert_allclose(batch["input_values"][r, :n],
                                       normalize_waveform(ds.audio[i]), atol=1e-6)
            assert not batch["input_values"][r, n:].any()
            assert batch["attention_mask"][r].sum() == n and batch["attention_mask"][r, :n].all()
            np.testing.assert_array_equal(batch["labels"][r, : len(label)], label)
            assert (batch["labels"][r, len(label):] == -100).all()
        shapes.add((batch["input_values"].shape, batch["labels"].shape))
    assert len(shapes) == len({b for b, _ in plan})


def test_eval_order_is_stable_and_sorted():
    ds = fake_dataset()
    loader = make_loader(ds, shuffle=False)
    plan = loader.epoch_batches(0)
    buckets = [b for b, _ in plan]
    assert buckets == sorted(buckets)
    assert [i.tolist() for _, i in plan] == [i.tolist() for _, i in loader.epoch_batches(5)]
    rows = np.concatenate([i for _, i in plan])
    np.testing.assert_array_equal(rows[rows >= 0], np.argsort(loader.buckets, kind="stable"))


def test_process_split_concatenates_to_global_batch():
    ds = fake_dataset()
    whole = make_loader(ds, batch_size=4).iter_from_step(3)
    halves = [make_loader(ds, batch_size=4, process_index=p, process_count=2).iter_from_step(3)
              for p in (0, 1)]
    for _ in range(5):
        full, parts = next(whole), [next(h) for h in halves]
        assert parts[0]["input_values"].shape[0] == 2
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(ValueError, match="batch_size=5.*process_count=2"):
        make_loader(ds, batch_size=5, process_count=2)


def test_padding_beats_random_batching():
    rng = np.random.default_rng(0)
    seconds = np.clip(rng.lognormal(np.log(4.0), 0.45, 4000), 1.0, 10.0)
    lengths = (seconds * 16000).astype(np.int64)
    ds = PreparedDataset(texts=[""] * len(lengths), labels=[np.zeros(3, np.int32)] * len(lengths),
                         lengths=lengths, audio=None, examples=[])
    loader = BatchLoader(ds, batch_size=16, boundaries=bucket_boundaries(lengths, 16))
    batches = rng.permutation(len(lengths))[: len(lengths) // 16 * 16].reshape(-1, 16)
    padded = lengths[batches].max(axis=1).sum() * 16
    random_padding = 1 - lengths[batches].sum() / padded
    assert loader.padding_fraction < 0.07 < 0.3 < random_padding


def test_prefetch_propagates_errors_and_stops():
    ds = fake_dataset(fail_at=5)
    loader = make_loader(ds, prefetch=2)
    with pytest.raises(OSError, match="clip 5: disk on fire"):
        for _ in loader.iter_epoch(0):
            pass

    def prefetch_threads():
        gc.collect()
        return [t for t in threading.enumerate() if t.name == "xlsr_jax-prefetch" and t.is_alive()]

    ok = make_loader(fake_dataset(), prefetch=3)
    for k, _ in enumerate(ok.iter_from_step(0)):  # infinite; abandon it half-way
        if k == 2:
            break
    for _ in range(50):
        if not prefetch_threads():
            break
        threading.Event().wait(0.05)
    assert not prefetch_threads()


def test_loader_threads_keep_the_order_propagate_errors_and_stop():
    ds = fake_dataset()
    one, three = make_loader(ds, prefetch=2), make_loader(ds, prefetch=2, workers=3)
    for a, b in zip(itertools.islice(one.iter_from_step(5), 20), itertools.islice(three.iter_from_step(5), 20)):
        assert_same_batch(a, b)
    with pytest.raises(OSError, match="clip 5: disk on fire"):
        for _ in make_loader(fake_dataset(fail_at=5), workers=2).iter_epoch(0):
            pass

    for k, _ in enumerate(three.iter_from_step(0)):  # infinite; abandon it half-way
        if k == 2:
            break
    # Dropped (no gc needed: nothing else refers to it), the generator shut its threads down, and waited.
    assert not [t for t in threading.enumerate() if t.name.startswith("xlsr_jax-loader") and t.is_alive()]


def test_cache_rows_are_normalised_from_int16(tmp_path, audio_writer):
    from xlsr_jax.data.cache import build_audio_cache

    clips = []
    for k, seconds in enumerate([0.3, 0.7, 0.5, 1.2]):
        audio_writer(tmp_path / f"{k}.wav", seconds, 16000, seed=k)
        clips.append(Example(str(tmp_path / f"{k}.wav"), "x"))
    cache, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    ds = PreparedDataset(texts=["x"] * 4, labels=[np.ones(3, np.int32)] * 4, lengths=cache.lengths.copy(),
                         audio=cache, examples=clips)
    batch = make_loader(ds, batch_size=4, boundaries=[20000], shuffle=False).load_batch(0, np.arange(4))
    for row, i in enumerate(batch["index"]):
        n = int(ds.lengths[i])
        np.testing.assert_allclose(batch["input_values"][row, :n], normalize_waveform(cache[i]), atol=1e-6)
        np.testing.assert_array_equal(batch["input_values"][row, n:], 0.0)


def test_real_cache_end_to_end(cv_dir, tmp_path):
    examples = parse_source(f"cv:{cv_dir}:train+dev")
    def normalize(example):
        return normalize_text(example.text, language="tr")

    vocab = Vocab.build(normalize(e) for e in examples)
    ds, _ = prepare_dataset(examples, vocab=vocab, normalize=normalize, sampling_rate=16000,
                            cache_dir=tmp_path, num_workers=0)
    loader = BatchLoader(ds, batch_size=2, boundaries=bucket_boundaries(ds.lengths, 2))
    seen = []
    for batch in loader.iter_epoch(0):
        seen.extend(batch["index"][batch["index"] >= 0].tolist())
        for i, row in zip(batch["index"], batch["labels"]):
            text = "".join(vocab.tokens[t] for t in row[row >= 0]).replace("|", " ")
            assert text == ds.texts[i]
    assert sorted(seen) == list(range(6))


# ---------------------------------------------------------------- per-bucket batch sizes (token budget)

BUDGET_SIZES = [8, 6, 4, 2]  # decreasing, as a token budget gives: bucket b holds about 2 / S_b seconds


def test_per_bucket_batches_have_their_bucket_shape_and_cover_every_example():
    ds = fake_dataset(n=97)
    loader = make_loader(ds, batch_size=BUDGET_SIZES, label_multiple=8)
    assert loader.batch_sizes == tuple(BUDGET_SIZES)
    shapes = loader.batch_shapes
    assert {b: bs for b, (bs, _, _) in shapes.items()} == dict(enumerate(BUDGET_SIZES))
    for epoch in range(3):
        plan = loader.epoch_batches(epoch)
        rows = np.concatenate([idx for _, idx in plan])
        np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(len(ds)))
        assert sum((idx < 0).any() for _, idx in plan) <= 1  # only the epoch's last batch has dummies
        for bucket, idx in plan:
            assert len(idx) == shapes[bucket][0]
            assert np.all(ds.lengths[idx[idx >= 0]] <= loader.boundaries[bucket])
    used = set()
    for (bucket, idx), batch in zip(loader.epoch_batches(0), loader.iter_epoch(0)):
        size, samples, label_len = shapes[bucket]
        assert batch["input_values"].shape == batch["attention_mask"].shape == (size, samples)
        assert batch["labels"].shape == (size, label_len)
        np.testing.assert_array_equal(batch["index"], idx)
        used.add(bucket)
    assert used == set(shapes), "97 clips over 4 buckets should use every bucket"


def test_token_budget_gives_short_buckets_bigger_batches():
    from xlsr_jax.data.buckets import bucket_batch_sizes

    ds = fake_dataset(n=200)
    boundaries = bucket_boundaries(ds.lengths, 4)
    sizes = bucket_batch_sizes(boundaries, 2.0, devices=2, accum=1)
    loader = make_loader(ds, batch_size=sizes, boundaries=boundaries)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 2 * sizes[-1]
    for bucket, idx in loader.epoch_batches(0):
        per_device_seconds = len(idx) // 2 * loader.boundaries[bucket] / 16000
        assert per_device_seconds <= 2.0 or len(idx) == 2, (bucket, len(idx))
    # fewer, fuller steps than a fixed batch of the largest bucket's size
    fixed = make_loader(ds, batch_size=sizes[-1], boundaries=boundaries)
    assert loader.batches_per_epoch < fixed.batches_per_epoch


@pytest.mark.parametrize("sizes", [[8, 6, 4, 2], [2, 4, 6, 8], [3, 7, 2, 5], [1, 1, 1, 1], [16, 16, 16, 1],
                                   [97, 1, 1, 1]])
def test_batches_per_epoch_is_exact_for_any_sizes(sizes):
    for n, seed in ((97, 0), (53, 1), (8, 2), (1, 3)):
        ds = fake_dataset(n=n, seed=seed)
        # all buckets used, the largest empty, only the smallest used
        for boundaries in ([4000, 8000, 12000, 16000], [4000, 8000, 16000, 20000],
                           [16000, 17000, 18000, 19000]):
            loader = make_loader(ds, batch_size=sizes, boundaries=boundaries, seed=seed)
            for epoch in range(4):
                plan = loader.epoch_batches(epoch)
                assert len(plan) == loader.batches_per_epoch == len(loader), (n, boundaries, epoch)
                rows = np.concatenate([idx for _, idx in plan])
                assert np.array_equal(np.sort(rows[rows >= 0]), np.arange(n))


def test_per_bucket_resume_matches_skipping_from_zero():
    ds = fake_dataset(n=97)
    loader = make_loader(ds, batch_size=BUDGET_SIZES, seed=3)
    per_epoch = loader.batches_per_epoch
    stream = loader.iter_from_step(0)
    reference = list(itertools.islice(stream, 2 * per_epoch + 3))
    stream.close()
    for step in (1, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch):
        resumed = make_loader(ds, batch_size=BUDGET_SIZES, seed=3).iter_from_step(step)
        assert_same_batch(next(resumed), reference[step])
        assert_same_batch(next(resumed), reference[step + 1])
        resumed.close()


def test_per_bucket_process_rows_partition_each_global_batch():
    ds = fake_dataset(n=97)
    whole = make_loader(ds, batch_size=BUDGET_SIZES)
    halves = [make_loader(ds, batch_size=BUDGET_SIZES, process_index=p, process_count=2) for p in (0, 1)]
    assert halves[1].local_batch_sizes == (4, 3, 2, 1)
    streams = [whole.iter_from_step(0)] + [h.iter_from_step(0) for h in halves]
    for bucket, _ in whole.epoch_batches(0):
        full, *parts = [next(s) for s in streams]
        assert parts[0]["input_values"].shape[0] == BUDGET_SIZES[bucket] // 2
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key], err_msg=key)
    with pytest.raises(ValueError, match=r"batch_size\[1\]=3 must be a positive multiple of process_count=2"):
        make_loader(ds, batch_size=[8, 3, 4, 2], process_count=2)
    with pytest.raises(ValueError, match="batch_size has 3 sizes for 4 buckets"):
        make_loader(ds, batch_size=[8, 6, 4])


# ---------------------------------------------------------------- weighted mixtures


def test_weighted_mixture_shares_resume_and_fixed_epoch_size():
    ds = fake_dataset(n=90, seed=5)
    a, b = np.arange(60), np.arange(60, 90)  # source A: 60 examples, source B: 30
    # Weights 1 and 3: B's share of each epoch is 3 x 30 / (60 + 90) = 0.6 exactly; every B example thrice.
    loader = make_loader(ds, batch_size=BUDGET_SIZES, seed=2, weights=[1.0] * 60 + [3.0] * 30)
    for epoch in range(3):
        plan = loader.epoch_batches(epoch)
        assert len(plan) == loader.batches_per_epoch
        rows = np.concatenate([idx for _, idx in plan])
        counts = np.bincount(rows[rows >= 0], minlength=90)
        assert np.all(counts[a] == 1) and np.all(counts[b] == 3)
        for bucket, idx in plan:
            assert np.all(ds.lengths[idx[idx >= 0]] <= loader.boundaries[bucket])
    # Weights 0.5 and 2.5: an epoch draws 30 of A and 75 of B (share 75 / 105 = 0.714 exactly), a random
    # half of A and a random half of B a third time; over 40 epochs each example's mean count lands near
    # its weight (binomial spread: |mean - w| < 0.3 is > 3.7 sigma for 40 draws of p = 0.5).
    loader = make_loader(ds, batch_size=BUDGET_SIZES, seed=2, weights=[0.5] * 60 + [2.5] * 30)
    sizes = {len(loader.epoch_batches(e)) for e in range(40)}
    assert sizes == {loader.batches_per_epoch}
    counts = np.zeros((40, 90))
    for epoch in range(40):
        rows = np.concatenate([idx for _, idx in loader.epoch_batches(epoch)])
        counts[epoch] = np.bincount(rows[rows >= 0], minlength=90)
        assert (counts[epoch, a].sum(), counts[epoch, b].sum()) == (30, 75)
    assert set(np.unique(counts[:, a])) == {0, 1} and set(np.unique(counts[:, b])) == {2, 3}
    mean = counts.mean(axis=0)
    assert np.all(np.abs(mean[a] - 0.5) < 0.3) and np.all(np.abs(mean[b] - 2.5) < 0.3)
    assert abs(mean[a].mean() - 0.5) < 1e-12 and abs(mean[b].mean() - 2.5) < 1e-12
    # Exact resume over the mixture, across an epoch boundary.
    per_epoch = loader.batches_per_epoch
    stream = loader.iter_from_step(0)
    reference = list(itertools.islice(stream, 2 * per_epoch + 2))
    stream.close()
    for step in (1, per_epoch - 1, per_epoch, 2 * per_epoch):
        resumed = make_loader(ds, batch_size=BUDGET_SIZES, seed=2,
                              weights=[0.5] * 60 + [2.5] * 30).iter_from_step(step)
        assert_same_batch(next(resumed), reference[step])
        assert_same_batch(next(resumed), reference[step + 1])
        resumed.close()


def test_unit_weights_keep_the_plain_plan():
    ds = fake_dataset()
    plain, ones = make_loader(ds, seed=4), make_loader(ds, seed=4, weights=np.ones(len(ds)))
    for epoch in range(2):
        for (b1, i1), (b2, i2) in zip(plain.epoch_batches(epoch), ones.epoch_batches(epoch)):
            assert b1 == b2 and i1.tolist() == i2.tolist()
    with pytest.raises(ValueError, match="one per example"):
        make_loader(ds, weights=[1.0, 2.0])
