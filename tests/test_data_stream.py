"""data.streaming: the stream's batches keep BatchLoader's contract, every clip comes once per epoch, the
shuffle buffer shuffles, bad clips are dropped and counted, hf: parquet shards stream from their bytes, and a
loader (or a training run) restored from a saved state continues bit for bit."""

from __future__ import annotations

import collections
import io
import json
import logging
import shutil

import numpy as np
import pytest
import soundfile as sf

from _resumed import assert_resumed, tag_records
from _runs import tiny_run_config
from xlsr_jax.config import ConfigError, from_dict, load_config, to_dict
from xlsr_jax.data.audio import normalize_int16_into
from xlsr_jax.data.cache import decode_clip
from xlsr_jax.data.report import count_reasons
from xlsr_jax.data.stream import ClipMaker, StreamingLoader, probe_dataset, stream_boundaries
from xlsr_jax.data.stream_sources import ElementStream, open_sources
from xlsr_jax.text import Vocab

SR = 16000
WORDS = ("bir", "iki", "üç", "dört", "beş", "altı")


def _tone(seconds: float, k: int) -> np.ndarray:
    n = int(round(seconds * SR))
    return (0.3 * np.sin(np.arange(n) * 0.02 * (1 + k % 7)) + 0.001 * k).astype(np.float32)


def _text(k: int) -> str:
    return f"{WORDS[k % 6]} {WORDS[(k // 6) % 6]}"


GOOD = 30  # clips of 0.55-1.95 s that every filter keeps


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """(spec, {path: text} of the good clips): a manifest of GOOD clips plus one of each way to be dropped."""
    root = tmp_path_factory.mktemp("stream_manifest")
    rng = np.random.default_rng(0)
    rows, good = [], {}
    for k in range(GOOD):
        path = root / f"c{k:02d}.wav"
        sf.write(str(path), _tone(rng.uniform(0.55, 1.95), k), SR)
        rows.append((path.name, _text(k)))
        good[str(path)] = _text(k)
    bad = {"short.wav": (_tone(0.3, 1), "bir"), "long.wav": (_tone(2.5, 2), "iki"),
           "silent.wav": (np.zeros(SR, np.float32), "üç"), "untitled.wav": (_tone(1.0, 3), ""),
           "crowded.wav": (_tone(0.6, 4), " ".join(WORDS) * 3)}  # 0.6 s: 30 frames for > 90 labels
    for name, (wav, text) in bad.items():
        sf.write(str(root / name), wav, SR)
        rows.append((name, text))
    rows.append(("gone.wav", "dört"))
    (root / "train.tsv").write_text("path\ttext\n" + "".join(f"{p}\t{t}\n" for p, t in rows), encoding="utf-8")
    return f"manifest:{root / 'train.tsv'}", good


DROPPED = {"missing_file": 1, "silence": 1, "too_short": 1, "too_long": 1, "empty_text": 1, "infeasible": 1}


def _loader(specs, tmp_path, *, buffer=8, batch=4, buckets=3, probe=64, seed=0, prefetch=2, **kw):
    """A StreamingLoader as train/setup.py builds one, without a model: 320 samples per frame."""
    stream = ElementStream(open_sources(specs, seed=seed, cache_dir=str(tmp_path / "cv"),
                                        hub_cache_dir=str(tmp_path / "hub")), seed)
    head = stream.head(probe)
    vocab = Vocab.build([e.example.text for e in head])
    make = ClipMaker(vocab=vocab, normalize=lambda e: e.text, sampling_rate=SR, length_range=(0.5 * SR, 2.0 * SR),
                     frames_fn=lambda n: np.asarray(n) // 320)
    dataset, _ = probe_dataset(head, make, workers=2)
    return StreamingLoader(stream, make, probe=dataset, boundaries=stream_boundaries(dataset.lengths, buckets, 2 * SR),
                           batch_size=batch, shuffle_buffer=buffer, prefetch=prefetch, workers=2, **kw)


def _take(loader, n: int, start: int = 0) -> list[tuple[dict, dict]]:
    """(batch, the loader's state after it) for global steps start+1 .. start+n."""
    it = loader.iter_from_step(start)
    out = [(next(it), json.loads(json.dumps(loader.state_at(step)))) for step in range(start + 1, start + n + 1)]
    it.close()
    return out


def _by_epoch(taken) -> dict[int, list[dict]]:
    epochs = collections.defaultdict(list)
    for batch, state in taken:
        epochs[state["epoch"]].append(batch)
    return epochs


def _read_order(loader, epoch: int) -> list[str]:
    """Audio path of each ordinal (`index`) of ``epoch``."""
    return [element.example.path for element, _ in loader.stream.read(epoch)]


def test_batches_keep_the_loader_contract_and_every_clip_comes_once_per_epoch(manifest, tmp_path):
    spec, good = manifest
    loader = _loader([spec], tmp_path)
    assert loader.batch_shapes == {0: (4, 12800, 48), 1: (4, 25280, 80), 2: (4, 32000, 112)}
    taken = _take(loader, 30)
    epochs = _by_epoch(taken)
    assert 2 in epochs, "read past two whole epochs"
    orders = {}
    for epoch in (0, 1):
        order = _read_order(loader, epoch)
        seen = []
        for batch in epochs[epoch]:
            (bucket,) = [b for b, (bs, s, l) in loader.batch_shapes.items() if batch["input_values"].shape == (bs, s)]
            assert batch["labels"].shape == (4, loader.label_lengths[bucket])
            assert {k: v.dtype for k, v in batch.items()} == {
                "input_values": np.float32, "attention_mask": np.int32, "labels": np.int32,
                "example_mask": np.float32, "index": np.int64}
            for row, index in enumerate(batch["index"]):
                if index < 0:  # a dummy row of the epoch's last batch
                    assert batch["example_mask"][row] == 0 and not batch["attention_mask"][row].any()
                    assert (batch["labels"][row] == -100).all() and not batch["input_values"][row].any()
                    continue
                path = order[index]
                seen.append(path)
                pcm = decode_clip(path, SR)
                want = np.zeros(batch["input_values"].shape[1], np.float32)
                normalize_int16_into(pcm, want[: len(pcm)])
                np.testing.assert_array_equal(batch["input_values"][row], want)
                assert batch["attention_mask"][row].sum() == len(pcm) and batch["example_mask"][row] == 1
                label = loader.make.vocab.encode(good[path])
                np.testing.assert_array_equal(batch["labels"][row, : len(label)], label)
                assert (batch["labels"][row, len(label):] == -100).all()
        assert collections.Counter(seen) == collections.Counter(list(good)), f"epoch {epoch}: each kept clip once"
        orders[epoch] = seen
    assert orders[0] != orders[1], "a new order each epoch"
    reads = [_read_order(loader, epoch) for epoch in (0, 1)]
    assert sorted(reads[0]) == sorted(reads[1]) and len(reads[0]) == GOOD + len(DROPPED)
    assert reads[0] != reads[1], "the rows themselves are read in a new order each epoch, not only reshuffled"
    last_of_epoch_0 = max(step for step, (_, state) in enumerate(taken, 1) if state["epoch"] == 0)
    assert taken[last_of_epoch_0 - 1][1]["dropped"] == DROPPED
    assert loader.metrics_at(last_of_epoch_0) == {"data/epoch": 0.0, "data/clips_dropped": 6.0}
    assert count_reasons(loader.dataset.bad) == DROPPED, "the probe names each dropped clip"
    assert 0 < loader.padding_fraction < 0.5


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")

    def refuse(*_args, **_kwargs):
        raise AssertionError("datasets decoded audio (torchcodec): it must never")
    monkeypatch.setattr(datasets.Audio, "decode_example", refuse)
    return datasets


def _parquet_shards(datasets, root, shards: int, rows: int) -> dict[str, int]:
    """``shards`` parquet files of ``rows`` clips stored as WAV bytes; {sentence: samples}."""
    (root / "data").mkdir(parents=True)
    samples = {}
    for s in range(shards):
        clips, texts = [], []
        for r in range(rows):
            k = s * rows + r
            buf = io.BytesIO()
            wav = _tone(0.6 + 0.05 * k, k)
            sf.write(buf, wav, SR, format="WAV")
            clips.append({"bytes": buf.getvalue(), "path": f"clip_{k}.wav"})
            texts.append(f"{_text(k)} {k}")
            samples[texts[-1]] = len(wav)
        table = datasets.Dataset.from_dict({"audio": clips, "sentence": texts})
        table.cast_column("audio", datasets.Audio(decode=False)).to_parquet(
            str(root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet"))
    return samples


def test_shuffle_buffer_shuffles_a_stream_read_in_file_order(offline_hf, tmp_path):
    root = tmp_path / "one_shard"
    _parquet_shards(offline_hf, root, shards=1, rows=24)
    orders = {}
    for buffer in (1, 12):
        loader = _loader([f"hf:{root}"], tmp_path, buffer=buffer, buckets=1)
        epochs = _by_epoch(_take(loader, 13))
        orders[buffer] = [[int(i) for b in epochs[e] for i in b["index"]] for e in (0, 1)]
    assert orders[1] == [list(range(24))] * 2, "a buffer of one keeps the file's order"
    for epoch in orders[12]:
        assert sorted(epoch) == list(range(24)) and epoch != list(range(24))
    assert orders[12][0] != orders[12][1]


def test_hf_parquet_shards_stream_from_their_bytes_in_a_new_shard_order_each_epoch(offline_hf, tmp_path):
    root = tmp_path / "shards"
    samples = _parquet_shards(offline_hf, root, shards=3, rows=6)
    loader = _loader([f"hf:{root}"], tmp_path, buffer=4)
    shard_orders = set()
    for epoch in range(4):
        paths = _read_order(loader, epoch)
        shards = [int(p.split("#")[1].split("/")[0]) for p in paths]
        assert sorted(shards) == [0] * 6 + [1] * 6 + [2] * 6 and shards == sorted(shards, key=shards[::6].index)
        shard_orders.add(tuple(shards[::6]))
    assert len(shard_orders) > 1, "the shard order changes with the epoch"
    epochs = _by_epoch(_take(loader, 12))
    texts = [e.example.text for e, _ in loader.stream.read(0)]
    lengths = {texts[i]: int(b["attention_mask"][r].sum())
               for b in epochs[0] for r, i in enumerate(b["index"]) if i >= 0}
    assert lengths == samples, "every row once, decoded from its bytes"
    assert not (tmp_path / "hub").exists(), "no clip written to disk"


@pytest.mark.parametrize("kind", ["manifest", "hf"])
def test_a_restored_loader_continues_bit_for_bit_and_decodes_only_the_clips_it_holds(kind, manifest, offline_hf,
                                                                                     tmp_path):
    if kind == "hf":
        _parquet_shards(offline_hf, tmp_path / "shards", shards=3, rows=8)
        spec = f"hf:{tmp_path / 'shards'}"
    else:
        spec = manifest[0]
    reference = _take(_loader([spec], tmp_path, buffer=6), 24)
    phases = set()
    for step in range(1, 20):
        state = reference[step - 1][1]
        phases.add((state["phase"], bool(state["buffer"])))
        loader = _loader([spec], tmp_path, buffer=6, prefetch=0)
        decoded, make = [], loader.make
        loader.make = lambda element: decoded.append(element.ordinal) or make(element)
        loader.restore(json.loads(json.dumps(state)))
        resumed = _take(loader, 24 - step, start=step)
        held = (state["buffer"] + [k for b in state["buckets"] for k in b]
                + [k for _, ks in state["pending"] for k in ks if k])
        assert sorted(decoded[: len(held)]) == sorted(k[0] for k in held), f"step {step}: decoded again only those held"
        for (got, got_state), (want, want_state) in zip(resumed, reference[step:], strict=True):
            assert got_state == want_state
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"resumed at {step}: {key}")
    assert {("read", True), ("flush", False)} <= phases, "resumed mid-epoch and while flushing an epoch's end"


def test_a_loader_without_the_state_of_its_step_refuses_to_start(manifest, tmp_path):
    loader = _loader([manifest[0]], tmp_path)
    with pytest.raises(ValueError, match="cannot start at step 5 without its saved state"):
        loader.iter_from_step(5)


def test_streaming_refuses_what_it_cannot_honour(cv_dir, tmp_path):
    from xlsr_jax.train.setup import build_data

    with pytest.raises(ConfigError, match=r"--set data.streaming=true: train.max_steps must be > 0 with "
                                          r"data.streaming=true"):
        load_config(None, ["data.streaming=true"])
    with pytest.raises(ConfigError, match=r"data.max_train_examples must be null with data.streaming=true"):
        load_config(None, ["data.streaming=true", "train.max_steps=3", "data.max_train_examples=4"])
    tree = to_dict(tiny_run_config(cv_dir, tmp_path, max_steps=2))
    tree["data"].update(streaming=True, train=[f"cv:{cv_dir}:train?weight=2"])
    with pytest.raises(ConfigError, match=r"\?weight= is not supported with data.streaming=true"):
        build_data(from_dict(tree), tmp_path / "run", 4, 4, data_parallel=4)


@pytest.mark.slow  # trains
@pytest.mark.timeout(600)  # two runs, each compiling the stream's own bucket shapes
def test_a_streaming_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(cv_dir, tmp_path, caplog):
    from safetensors.numpy import load_file

    from xlsr_jax.recipe import train

    def config(out):
        tree = to_dict(tiny_run_config(cv_dir, out, max_steps=4, save_steps=2))
        tree["data"].update(streaming=True, eval=[], shuffle_buffer=3, streaming_probe=4, max_duration_s=1.5)
        tree["checkpoint"]["best_metric"] = None
        return from_dict(tree)

    train(config(tmp_path / "a"))
    first = tmp_path / "a" / "run"
    assert sorted(p.name for p in (first / "stream_state").iterdir()) == ["2.json", "4.json"]
    assert json.loads((first / "stream_state" / "4.json").read_text())["epoch"] >= 1, "4 steps span 2 epochs"
    resumed = tmp_path / "b" / "run"
    shutil.copytree(first, resumed)
    for name in ("checkpoints/4", "hf_model", "stream_state/4.json", "finished.json"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tagged = tag_records(resumed)
    caplog.set_level(logging.INFO)
    train(config(tmp_path / "b"))
    assert assert_resumed(resumed, 2, tagged, caplog.text) == [3, 4], "resumed after step 2"
    want = load_file(str(first / "hf_model" / "model.safetensors"))
    got = load_file(str(resumed / "hf_model" / "model.safetensors"))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
