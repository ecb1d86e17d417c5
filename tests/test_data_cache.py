import os
import pickle

import numpy as np
import pytest

from xlsr_jax.data import cache as cache_mod
from xlsr_jax.data.audio import AudioError, load_audio
from xlsr_jax.data.cache import AudioCache, build_audio_cache
from xlsr_jax.data.sources import Example


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
    assert [i for i, _ in skipped] == [2, 4]
    assert "c.mp3: cannot decode" in skipped[0][1] and "missing.wav" in skipped[1][1]
    assert "2 of 5 clips could not be decoded" in caplog.text
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
    assert again.folder == cache.folder and [i for i, _ in skipped] == [2, 4]
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
