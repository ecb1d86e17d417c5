import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xlsr_jax.data import cache as cache_mod
from xlsr_jax.data.audio import AudioError, load_audio
from xlsr_jax.data.cache import AudioCache, build_audio_cache
from xlsr_jax.data.sources import Example

from _signals import sigterm_midway


@pytest.fixture
def clips(tmp_path, audio_writer):
    """Five examples: three good clips in three formats/rates, one corrupt, one missing."""
    audio_writer(tmp_path / "a.wav", 0.3, 16000)
    audio_writer(tmp_path / "b.flac", 0.5, 22050, channels=2)
    (tmp_path / "c.mp3").write_bytes(b"\x00garbage" * 50)
    audio_writer(tmp_path / "d.mp3", 0.4, 48000)
    names = ["a.wav", "b.flac", "c.mp3", "d.mp3", "missing.wav"]
    return [Example(str(tmp_path / n), f"text {n}") for n in names]


def test_build_and_read(clips, tmp_path, caplog):
    cache, skipped = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    assert [(s.index, s.reason) for s in skipped] == [(2, "undecodable"), (4, "missing_file")]
    assert "c.mp3: cannot decode" in skipped[0].message and "missing.wav" in skipped[1].message
    assert "2 of 5 clips are skipped" in caplog.text
    assert len(cache) == 3
    np.testing.assert_array_equal(cache.example_indices, [0, 1, 3])
    np.testing.assert_array_equal(cache.lengths, [4800, 8000, 6400])
    assert cache.lengths.dtype == np.int64
    for row, i in enumerate(cache.example_indices):
        wav = cache[row]
        assert wav.dtype == np.float32
        np.testing.assert_allclose(wav, load_audio(clips[i].path), atol=1.0 / 32767)
    folder = cache.folder
    assert sorted(os.listdir(folder)) == [
        "audio.bin", "example_index.npy", "lengths.npy", "meta.json", "offsets.npy"]
    assert os.listdir(tmp_path / "cache") == [os.path.basename(folder)]  # no partial folder
    assert os.path.getsize(os.path.join(folder, "audio.bin")) == 2 * int(cache.lengths.sum())


def test_rerun_reuses_and_change_rebuilds(clips, tmp_path, monkeypatch):
    cache, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "load_audio", no_decoding)
        again, skipped = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    assert again.folder == cache.folder and [s.index for s in skipped] == [2, 4]
    assert [s.reason for s in skipped] == ["undecodable", "missing_file"]  # reasons survive the reuse
    other_rate, _ = build_audio_cache(clips, tmp_path / "cache", sampling_rate=8000,
                                      num_workers=0)
    assert other_rate.folder != cache.folder and other_rate.lengths[0] == 2400
    st = os.stat(clips[0].path)
    os.utime(clips[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    assert rebuilt.folder != cache.folder


def test_process_pool_matches_in_process(clips, tmp_path):
    serial, skipped_serial = build_audio_cache(clips, tmp_path / "one", num_workers=0)
    pooled, skipped_pooled = build_audio_cache(clips, tmp_path / "two", num_workers=2)
    assert skipped_serial == skipped_pooled
    np.testing.assert_array_equal(serial.lengths, pooled.lengths)
    for row in range(len(serial)):
        np.testing.assert_array_equal(serial[row], pooled[row])


def test_all_failing_is_fatal_and_leaves_nothing(clips, tmp_path):
    with pytest.raises(AudioError, match=r"none of the 2 clips.*c\.mp3"):
        build_audio_cache([clips[2], clips[4]], tmp_path / "cache", num_workers=0)
    assert os.listdir(tmp_path / "cache") == []


def test_take_and_pickle(clips, tmp_path):
    cache, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    view = cache.take([2, 0])
    np.testing.assert_array_equal(view.example_indices, [3, 0])
    np.testing.assert_array_equal(view[0], cache[2])
    np.testing.assert_array_equal(view.take([1])[0], cache[0])
    restored = pickle.loads(pickle.dumps(view))
    assert isinstance(restored, AudioCache) and len(restored) == 2
    np.testing.assert_array_equal(restored[1], cache[0])
    # The audio itself is not in the pickle, only the folder and the rows.
    assert len(pickle.dumps(view)) < 1000


def test_each_kind_of_bad_clip_gets_its_reason(tmp_path, audio_writer):
    import soundfile as sf

    audio_writer(tmp_path / "good.wav", 0.3, 16000)
    (tmp_path / "empty.mp3").write_bytes(b"")
    (tmp_path / "garbage.mp3").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "text.mp3").write_text("not audio, a text file\n" * 40)
    sf.write(str(tmp_path / "zeros.mp3"), np.zeros(8000, np.float32), 16000, format="MP3")
    sf.write(str(tmp_path / "hiss.wav"), np.full(8000, 5e-5, np.float32), 16000)  # under SILENCE_PEAK
    sf.write(str(tmp_path / "quiet.wav"), 1e-3 * np.sin(np.arange(8000, dtype=np.float32)), 16000)  # -60 dBFS: kept
    names = ["good.wav", "missing.mp3", "empty.mp3", "garbage.mp3", "text.mp3", "zeros.mp3", "hiss.wav", "quiet.wav"]
    cache, skipped = build_audio_cache([Example(str(tmp_path / n), "x") for n in names], tmp_path / "c",
                                       num_workers=0)
    assert [(names[s.index], s.reason) for s in skipped] == [
        ("missing.mp3", "missing_file"), ("empty.mp3", "empty_audio"), ("garbage.mp3", "undecodable"),
        ("text.mp3", "undecodable"), ("zeros.mp3", "silence"), ("hiss.wav", "silence")]
    assert all(s.message.startswith(str(tmp_path / names[s.index])) for s in skipped)
    assert "empty file, 0 bytes" in skipped[1].message and "peak amplitude 3.1e-05" in skipped[5].message  # 5e-5 as 16-bit PCM
    np.testing.assert_array_equal(cache.example_indices, [0, 7])


# Loaded by every Python process started with its folder on PYTHONPATH, the decoding workers included: each
# decode then takes 50 ms more and appends a byte to a marker file, slow enough to be stopped midway. With
# $DECODE_GATE set, a decode also waits (up to 5 minutes) for that file to exist: a barrier the test opens.
_SLOW_DECODE = """
import os, time
from xlsr_jax.data import cache

decode = cache.load_audio
def slow(path, rate):
    with open(os.environ["SLOW_DECODE_MARKER"], "a") as f:
        f.write("x")
    gate, deadline = os.environ.get("DECODE_GATE"), time.monotonic() + 300
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    return decode(path, rate)
cache.load_audio = slow
"""
_BUILD = """
import sys
from xlsr_jax.data.cache import build_audio_cache
from xlsr_jax.data.sources import Example
build_audio_cache([Example(p, "x") for p in sys.argv[3:]], sys.argv[1], num_workers=int(sys.argv[2]))
"""


def _files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _slow_build(tmp_path, audio_writer, clips: int):
    """(clip paths, cache folder, marker file, environment) for a `_BUILD` subprocess whose decoding is
    slowed by a sitecustomize module (which also touches the marker once decoding is under way)."""
    paths = []
    for k in range(clips):
        audio_writer(tmp_path / f"{k}.wav", 0.2, 16000, seed=k)
        paths.append(str(tmp_path / f"{k}.wav"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SLOW_DECODE)
    folder, marker = tmp_path / "cache", tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), SLOW_DECODE_MARKER=str(marker))
    return paths, folder, marker, env


# Chunks of 200 // (4 * workers) clips: 50 in-process, 25 with two decoding processes.
@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("num_workers, chunk", [(0, 50), (2, 25)])
def test_sigterm_mid_build_keeps_decoded_chunks_and_resumes(tmp_path, audio_writer, num_workers, chunk, monkeypatch):
    clips, folder, marker, env = _slow_build(tmp_path, audio_writer, 200)
    status, err = sigterm_midway(_BUILD, [str(folder), str(num_workers), *clips], str(marker), after=60, env=env)
    assert status == 128 + signal.SIGTERM, err  # ended by the signal, after cleaning up (no traceback)
    assert "Traceback" not in err and "decoded clips for the next run" in err
    # Stopped: what the workers held was finished (at most 3 chunks: one each, one queued), the rest dropped.
    assert os.path.getsize(marker) <= 60 + 3 * chunk, err
    [building] = os.listdir(folder)  # no cache yet, no lock file: only what the next run resumes
    assert building.endswith(".building")
    done = sum(len(json.loads(line)["lengths"]) for line in (folder / building / "progress.jsonl").open())
    assert done % chunk == 0 and chunk <= done <= os.path.getsize(marker)  # whole chunks, at least one

    decoded = []
    decode = cache_mod.load_audio
    monkeypatch.setattr(cache_mod, "load_audio", lambda path, rate: decoded.append(path) or decode(path, rate))
    examples = [Example(p, "x") for p in clips]
    cache, skipped = build_audio_cache(examples, folder, num_workers=0)
    assert decoded == clips[done:]  # the completed chunks were not decoded again
    assert len(cache) == len(clips) and skipped == [] and os.listdir(folder) == [os.path.basename(cache.folder)]
    fresh, _ = build_audio_cache(examples, tmp_path / "fresh", num_workers=0)
    assert _files(Path(cache.folder)) == _files(Path(fresh.folder))


@pytest.mark.parametrize("audio_lost", [False, True])
def test_interrupted_build_resumes_byte_identical(tmp_path, audio_writer, monkeypatch, audio_lost):
    names = []
    for k in range(12):  # 12 clips in-process: chunks of 3; clip 4 is broken, clip 7 missing
        name = f"{k}.mp3" if k != 7 else "missing.mp3"
        if k == 4:
            (tmp_path / name).write_bytes(b"\x00garbage" * 50)
        elif k != 7:
            audio_writer(tmp_path / name, 0.1 + 0.05 * k, 48000, seed=k)
        names.append(str(tmp_path / name))
    examples = [Example(p, "x") for p in names]
    reference, ref_skipped = build_audio_cache(examples, tmp_path / "reference", num_workers=0)

    calls = []
    decode = cache_mod.load_audio

    def failing_at_8(path, rate):
        calls.append(path)
        if len(calls) == 8:  # in the third chunk: two chunks (6 clips) are complete
            raise RuntimeError("interrupted")
        return decode(path, rate)

    monkeypatch.setattr(cache_mod, "load_audio", failing_at_8)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_audio_cache(examples, tmp_path / "cache", num_workers=0)
    building = tmp_path / "cache" / (os.path.basename(reference.folder) + ".building")
    assert len((building / "progress.jsonl").read_text().splitlines()) == 2
    if audio_lost:  # less audio than progress.jsonl vouches for: nothing can be trusted, start over
        os.truncate(building / "audio.bin", 10)
    else:  # clip 6's audio was written but its line was not: the resumed build cuts it off, decodes it again
        (building / "audio.bin").open("ab").write(b"\x01\x02" * 100)
    calls.clear()
    monkeypatch.setattr(cache_mod, "load_audio", lambda path, rate: calls.append(path) or decode(path, rate))
    cache, skipped = build_audio_cache(examples, tmp_path / "cache", num_workers=0)
    assert calls == (names if audio_lost else names[6:])
    assert skipped == ref_skipped and [s.index for s in skipped] == [4, 7]
    assert os.path.basename(cache.folder) == os.path.basename(reference.folder)
    assert _files(Path(cache.folder)) == _files(Path(reference.folder))
    assert os.listdir(tmp_path / "cache") == [os.path.basename(cache.folder)]


def test_changed_setting_rebuilds(clips, tmp_path, monkeypatch):
    cache, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    assert cache.meta["resampler"] == "soxr_hq" and cache.meta["silence_peak"] == cache_mod.SILENCE_PEAK
    keys = {os.path.basename(cache.folder)}
    for change in (lambda m: m.setitem(cache_mod.DECODE_SETTINGS, "resampler", "soxr_vhq"),
                   lambda m: m.setitem(cache_mod.DECODE_SETTINGS, "channels", "first"),
                   lambda m: m.setattr(cache_mod, "SILENCE_PEAK", 1e-3),
                   lambda m: m.setattr(cache_mod, "_FORMAT_VERSION", 99)):
        with monkeypatch.context() as m:
            change(m)
            rebuilt, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
        keys.add(os.path.basename(rebuilt.folder))
    assert len(keys) == 5 and len(os.listdir(tmp_path / "cache")) == 5
    again, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)  # settings back: reused
    assert again.folder == cache.folder


def test_pcm_is_the_stored_int16(clips, tmp_path):
    cache, _ = build_audio_cache(clips, tmp_path / "cache", num_workers=0)
    view = cache.take([2, 0])
    pcm = view.pcm(0)
    assert pcm.dtype == np.int16 and isinstance(pcm, np.memmap) and len(pcm) == 6400
    np.testing.assert_array_equal(pcm.astype(np.float32) / 32767.0, view[0])


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Poll `condition()` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow  # subprocesses
def test_concurrent_builds_decode_once(tmp_path, audio_writer):
    """The first build holds the lock and stops at its first clip until the second has said it waits for
    that lock: the two overlap by construction, not by timing."""
    clips, folder, marker, env = _slow_build(tmp_path, audio_writer, 20)
    gate, second_log = tmp_path / "gate", tmp_path / "second.log"
    env["DECODE_GATE"] = str(gate)
    args = [sys.executable, "-c", _BUILD, str(folder), "0", *clips]
    first = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    second = None
    try:
        _wait_for(lambda: marker.exists() and marker.stat().st_size >= 1, "first decode (the lock is held)")
        with second_log.open("w") as log:
            second = subprocess.Popen(args, env=env, stderr=log)
            _wait_for(lambda: "another process is building" in second_log.read_text()  # or what fails below:
                      or second.poll() is not None or marker.stat().st_size > 1,  # it ended, or it decodes
                      "second build waiting for the lock")
            gate.touch()  # the first build goes on; the second wakes up when it is done
            assert first.wait(timeout=120) == 0 and second.wait(timeout=120) == 0, second_log.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert "another process is building" in second_log.read_text()
    assert marker.stat().st_size == len(clips)  # every clip decoded once, by the first
    [name] = os.listdir(folder)  # the cache; no lock file, no build folder
    assert not name.endswith((".lock", ".building"))
