"""Per-host shards of the decoded-audio cache (data/shards.py) and the plan that gives each host only its
own clips (BatchLoader(owners=...)). Hosts are threads here, exchanging through a barrier; the real
collective runs in test_train_multiprocess.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import threading

import numpy as np
import pytest

from xlsr_jax.data.audio import AudioError
from xlsr_jax.data.buckets import bucket_boundaries
from xlsr_jax.data.cache import DecodeFailure
from xlsr_jax.data.loader import BatchLoader
from xlsr_jax.data.prepare import PreparedDataset, prepare_dataset
from xlsr_jax.data.shards import HostShard, examples_digest, exchange_decode_results
from xlsr_jax.data.sources import Example
from xlsr_jax.errors import UserError
from xlsr_jax.text import Vocab

BUDGET_SIZES = [8, 6, 4, 2]  # global, per bucket: multiples of 2 hosts


class FakeHosts:
    """`count` hosts as threads: `run(fn)` calls `fn(shard)` on each, their `allgather` meeting at a barrier.
    Returns each host's result, or raises the first host's exception after all have finished."""

    def __init__(self, count: int):
        self.count, self.barrier, self.slots = count, threading.Barrier(count, timeout=60), [None] * count
        self.calls = 0

    def _allgather(self, host: int, x: np.ndarray) -> np.ndarray:
        self.slots[host] = np.array(x)
        self.barrier.wait()
        gathered = np.stack(self.slots)  # raises, like the real collective, if the shapes differ
        if host == 0:
            self.calls += 1
        self.barrier.wait()
        return gathered

    def run(self, fn) -> list:
        results, errors = [None] * self.count, [None] * self.count

        def host(p: int) -> None:
            try:
                results[p] = fn(HostShard(p, self.count, lambda x: self._allgather(p, x)))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors[p] = exc
                self.barrier.abort()

        threads = [threading.Thread(target=host, args=(p,)) for p in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for exc in errors:
            if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
                raise exc
        return results


# ---------------------------------------------------------------- the plan with owners


class _Audio:
    def __init__(self, lengths):
        self.lengths = lengths

    def __getitem__(self, i):
        return np.full(int(self.lengths[i]), 0.01 * (i + 1), np.float32)


def _dataset(n=90, seed=3, max_len=16000) -> PreparedDataset:
    """tests/test_data_loader.py's fake dataset, copied so that the pinned plans below never move."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1000, max_len, size=n).astype(np.int64)
    labels = [rng.integers(0, 30, size=max(1, int(l) // 400)).astype(np.int32) for l in lengths]
    return PreparedDataset(texts=[f"t{i}" for i in range(n)], labels=labels, lengths=lengths,
                           audio=_Audio(lengths), examples=[Example(f"/x/{i}.wav", f"t{i}") for i in range(n)])


def _loader(ds, loader_class=BatchLoader, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("boundaries", bucket_boundaries(ds.lengths, 4))
    return loader_class(ds, **kw)


def _plan_hash(loader, epochs=3) -> str:
    h = hashlib.sha256()
    for epoch in range(epochs):
        for bucket, idx in loader.epoch_batches(epoch):
            h.update(int(bucket).to_bytes(8, "little") + np.asarray(idx, np.int64).tobytes())
    return h.hexdigest()[:16]


# (seed, loader arguments) -> the plan hash of 3 epochs, computed by the loader before owners existed
# (git 211976b). Runs in progress and their stored signatures rely on one-host plans never changing.
PINNED = {
    (0, "plain"): "30adbd394bc5701f", (0, "budget"): "fd627077475224e1", (0, "weighted"): "e636f42af654a506",
    (0, "two processes"): "926f4c87e7fb7443", (1, "plain"): "f6805ac185a5bd8f", (1, "budget"): "7dc0804d87bad561",
    (1, "weighted"): "ab36a822df508e46", (1, "two processes"): "e4af765e7b8e5744", (7, "plain"): "763a457591ca1821",
    (7, "budget"): "e64595e0f312a048", (7, "weighted"): "b00fb635abdcf878", (7, "two processes"): "e4a51b2fc137b3b9",
    (0, "eval"): "9d59ba0c1b0573c6",
}
KINDS = {"plain": {}, "budget": {"batch_size": BUDGET_SIZES},
         "weighted": {"batch_size": BUDGET_SIZES, "weights": [0.5] * 60 + [2.5] * 30},
         "two processes": {"batch_size": 8, "process_count": 2, "process_index": 1},
         "eval": {"shuffle": False, "batch_size": 6}}


@pytest.mark.parametrize("seed, kind", sorted(PINNED))
def test_plans_without_owners_are_the_plans_of_before(seed, kind):
    ds = _dataset()
    assert _plan_hash(_loader(ds, seed=seed, **KINDS[kind])) == PINNED[seed, kind]
    # owners change nothing in a one-process run
    if "process_count" not in KINDS[kind]:
        owners = np.arange(len(ds)) % 3
        assert _plan_hash(_loader(ds, seed=seed, owners=owners, **KINDS[kind])) == PINNED[seed, kind]


def test_pinned_plans_are_those_of_the_loader_before_owners(tmp_path):
    """The pins above come from the loader of git 211976b (when the repository holds it)."""
    try:
        source = subprocess.run(["git", "show", "211976b:xlsr_jax/data/loader.py"], capture_output=True, text=True,
                                check=True, cwd=os.path.dirname(__file__)).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git history not available")
    path = tmp_path / "old_loader.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_loader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ds = _dataset()
    for seed, kind in PINNED:
        assert _plan_hash(_loader(ds, module.BatchLoader, seed=seed, **KINDS[kind])) == PINNED[seed, kind]


def _host_rows(loader, plan, host):
    local = loader.local_batch_sizes
    return [(b, idx[host * local[b] : (host + 1) * local[b]]) for b, idx in plan]


@pytest.mark.parametrize("hosts, batch_size, owners", [
    (2, 4, "round robin"), (2, BUDGET_SIZES, "round robin"), (3, [9, 6, 3, 3], "round robin"),
    (2, 4, "lopsided"), (2, [2, 4, 6, 8], "lopsided"), (4, 4, "round robin")])
def test_plan_with_owners_gives_each_host_its_own_clips_once_per_epoch(hosts, batch_size, owners):
    ds = _dataset(n=97)
    rng = np.random.default_rng(5)
    # lopsided: host 0 owns 3/4 of the clips, and most of the short ones
    owner = (np.arange(97) % hosts if owners == "round robin"
             else np.where(rng.random(97) < 0.5 + 0.4 * (ds.lengths < 8000), 0, 1))
    loader = _loader(ds, batch_size=batch_size, seed=2, owners=owner, process_count=hosts)
    sizes = loader.batch_sizes
    counts = set()
    for epoch in range(4):
        plan = loader.epoch_batches(epoch)
        counts.add(len(plan))
        rows = np.concatenate([idx for _, idx in plan])
        np.testing.assert_array_equal(np.sort(rows[rows >= 0]), np.arange(97))  # every clip once
        for bucket, idx in plan:
            assert len(idx) == sizes[bucket]
            assert np.all(ds.lengths[idx[idx >= 0]] <= loader.boundaries[bucket])
        for host in range(hosts):
            mine = np.concatenate([idx for _, idx in _host_rows(loader, plan, host)])
            assert np.all(owner[mine[mine >= 0]] == host), (epoch, host)
    assert counts == {loader.batches_per_epoch}, "batches per epoch are the same every epoch"


def test_plan_with_owners_loads_and_resumes_each_hosts_rows():
    ds = _dataset(n=41)
    owner = np.arange(41) % 2
    loaders = [_loader(ds, seed=1, batch_size=BUDGET_SIZES, owners=owner, process_count=2, process_index=p)
               for p in (0, 1)]
    per_epoch = loaders[0].batches_per_epoch
    for p, loader in enumerate(loaders):
        batches = list(loader.iter_epoch(1))
        assert len(batches) == per_epoch
        for (bucket, idx), batch in zip(_host_rows(loader, loader.epoch_batches(1), p), batches):
            np.testing.assert_array_equal(batch["index"], idx)
            assert np.all(owner[idx[idx >= 0]] == p)
        resumed = loader.iter_from_step(per_epoch + 1)
        np.testing.assert_array_equal(next(resumed)["index"], batches[1]["index"])
        resumed.close()


def test_weighted_plan_with_owners_has_a_fixed_size_per_host_and_bucket():
    ds = _dataset(n=90)
    owner = np.arange(90) % 2
    weights = np.asarray([0.5] * 60 + [2.5] * 30)
    loader = _loader(ds, batch_size=BUDGET_SIZES, seed=2, weights=weights, owners=owner, process_count=2)
    shapes = set()
    for epoch in range(5):
        plan = loader.epoch_batches(epoch)
        assert len(plan) == loader.batches_per_epoch
        for host in (0, 1):
            mine = np.concatenate([idx for _, idx in _host_rows(loader, plan, host)])
            mine = mine[mine >= 0]
            assert np.all(owner[mine] == host)
            # each host draws its 30 clips of weight 0.5 as 15 and its 15 clips of weight 2.5 as 38 (37.5 rounded)
            assert (weights[mine] == 0.5).sum() == 15 and (weights[mine] == 2.5).sum() == 38
        shapes.add(tuple(sorted(b for b, _ in plan)))
    assert len(shapes) == 1, "each bucket has the same number of batches every epoch"
    # one host owns every clip of weight 2.5, the other every clip of weight 0.5
    loader = _loader(ds, batch_size=BUDGET_SIZES, seed=2, weights=weights, owners=(weights > 1).astype(int),
                     process_count=2)
    for epoch in range(3):
        plan = loader.epoch_batches(epoch)
        assert len(plan) == loader.batches_per_epoch
        rows = np.concatenate([idx for _, idx in plan])
        assert (weights[rows[rows >= 0]] == 0.5).sum() == 30 and (weights[rows[rows >= 0]] == 2.5).sum() == 75


def test_bad_owners_are_refused():
    ds = _dataset(n=10)
    with pytest.raises(ValueError, match="owners has shape"):
        _loader(ds, owners=[0, 1], process_count=2)
    with pytest.raises(ValueError, match=r"owners must be process indices in \[0, 2\)"):
        _loader(ds, owners=np.arange(10) % 3, process_count=2)


# ---------------------------------------------------------------- decoding each host's part


@pytest.fixture
def corpus(tmp_path, audio_writer):
    """Seven examples: five good clips of different lengths, one missing, one garbage file."""
    examples = []
    for k, seconds in enumerate([0.6, 0.9, 0.7, None, 1.2, 0.8, "garbage"]):
        path = tmp_path / f"clip{k}.wav"
        if seconds == "garbage":
            path.write_bytes(b"\x00not audio" * 40)
        elif seconds is not None:
            audio_writer(path, seconds, 16000, freq=200.0 + 30 * k, seed=k)
        examples.append(Example(str(path), f"sözcük {k}", source="manifest:x"))
    return examples


def _prepare(examples, cache_dir, shard=None):
    vocab = Vocab.build([e.text for e in examples])
    return prepare_dataset(examples, vocab=vocab, normalize=lambda e: e.text, sampling_rate=16000,
                           cache_dir=cache_dir, num_workers=0, shard=shard)[0]


def test_each_host_decodes_its_part_and_every_host_gets_the_same_dataset(corpus, tmp_path):
    single = _prepare(corpus, tmp_path / "one")
    hosts = FakeHosts(2)
    shards = hosts.run(lambda shard: _prepare(corpus, tmp_path / "two", shard))
    for ds in shards:  # what filtering and planning see: identical to one host decoding everything
        assert ds.texts == single.texts and ds.examples == single.examples and ds.bad == single.bad
        np.testing.assert_array_equal(ds.lengths, single.lengths)
    assert [(c.path.rsplit("/", 1)[1], c.reason) for c in single.bad] == [
        ("clip3.wav", "missing_file"), ("clip6.wav", "undecodable")]
    assert hosts.calls == 3, "header, table, messages"
    kept = [corpus.index(e) for e in single.examples]  # [0, 1, 2, 4, 5]
    np.testing.assert_array_equal(shards[0].owners, np.asarray(kept) % 2)
    np.testing.assert_array_equal(shards[1].owners, shards[0].owners)
    # each host's cache folder holds its own examples: 0, 2, 4, 6 and 1, 3, 5
    folders = sorted(os.listdir(tmp_path / "two"))
    assert sorted(f.rsplit("-", 1)[1] for f in folders) == ["host0of2", "host1of2"]
    for folder in folders:
        host = int(folder[-4])
        meta = json.loads((tmp_path / "two" / folder / "meta.json").read_text())
        assert meta["num_examples"] == [4, 3][host]
        assert meta["num_kept"] == len(np.load(tmp_path / "two" / folder / "lengths.npy")) == [3, 2][host]
    for host, ds in enumerate(shards):
        for row in range(len(ds)):
            if ds.owners[row] == host:
                np.testing.assert_array_equal(ds.audio.pcm(row), single.audio.pcm(row))
                np.testing.assert_array_equal(ds.audio[row], single.audio[row])
            else:
                with pytest.raises(ValueError, match=f"decoded by host {1 - host}, not by this one"):
                    ds.audio.pcm(row)
    # a second start reuses both hosts' caches (nothing decoded again: the folders are unchanged)
    hosts.run(lambda shard: _prepare(corpus, tmp_path / "two", shard))
    assert sorted(os.listdir(tmp_path / "two")) == folders


def test_hosts_without_clips_or_without_good_clips_still_take_part(corpus, tmp_path):
    # three hosts, three examples: host 2's one example is missing, so its cache keeps nothing
    examples = [corpus[0], corpus[1], corpus[3]]
    shards = FakeHosts(3).run(lambda shard: _prepare(examples, tmp_path / "a", shard))
    assert [len(ds) for ds in shards] == [2, 2, 2] and shards[2].bad[0].reason == "missing_file"
    # more hosts than examples: host 1 owns none
    shards = FakeHosts(2).run(lambda shard: _prepare(corpus[:1], tmp_path / "b", shard))
    assert [len(ds) for ds in shards] == [1, 1] and list(shards[1].owners) == [0]
    np.testing.assert_array_equal(shards[0].audio.pcm(0), _prepare(corpus[:1], tmp_path / "c").audio.pcm(0))
    # no host decodes anything: the same error on every host
    with pytest.raises(AudioError, match="none of the 2 clips could be decoded"):
        FakeHosts(2).run(lambda shard: _prepare([corpus[3], corpus[6]], tmp_path / "d", shard))


def test_exchange_carries_lengths_reasons_and_messages_of_every_host():
    n, hosts = 5, FakeHosts(2)
    failures = {0: [DecodeFailure(2, "silence", "x/2.wav: silent (peak ≈ 0)")],
                1: [DecodeFailure(1, "undecodable", "x/1.wav: cannot decode"),
                    DecodeFailure(3, "missing_file", "x/3.wav: no such file")]}
    lengths = {0: [100, -1, 300], 1: [-1, -1]}  # examples 0, 2, 4 and 1, 3
    results = hosts.run(lambda s: exchange_decode_results(s, n, 7, lengths[s.index], failures[s.index]))
    for all_lengths, all_failures in results:
        np.testing.assert_array_equal(all_lengths, [100, -1, -1, -1, 300])
        assert all_failures == [failures[1][0], failures[0][0], failures[1][1]]


def test_hosts_reading_different_examples_stop_naming_them():
    examples = [Example(f"/x/{i}.wav", "t") for i in range(4)]
    mine = {0: examples, 1: examples[::-1]}  # same count, other order
    with pytest.raises(UserError, match=r"disagree on eval\.examples \(process \d has 4; processes \[\d\] differ\)"):
        FakeHosts(2).run(lambda s: exchange_decode_results(s, 4, examples_digest(mine[s.index]),
                                                           [-1, -1], [], name="eval"))
    sizes = {0: 4, 1: 3}
    with pytest.raises(UserError, match="disagree on train.examples"):
        FakeHosts(2).run(lambda s: exchange_decode_results(s, sizes[s.index], 1, [-1] * len(s.owned(sizes[s.index])),
                                                           []))
