import os

import numpy as np
import pytest

from xlsr_jax.data import audio as audio_mod
from xlsr_jax.data.audio import AudioError, load_audio, normalize_int16_into, normalize_waveform


def _peak_hz(x: np.ndarray, sampling_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sampling_rate / len(x))


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3"])
@pytest.mark.parametrize("rate", [48000, 22050, 16000])
def test_formats_and_rates(tmp_path, audio_writer, suffix, rate):
    path = tmp_path / f"clip{suffix}"
    audio_writer(path, 0.5, rate, freq=440.0)
    wav = load_audio(str(path))
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 8000) <= 1  # 0.5 s at 16 kHz
    assert abs(_peak_hz(wav, 16000) - 440.0) < 4.0
    assert 0.15 < np.abs(wav).max() < 0.4  # amplitude 0.3 (+ noise) survives decode/resample


@pytest.mark.parametrize("rates", [(48000, 16000), (22050, 16000), (16000, 8000)])
def test_resample_is_librosa_soxr_hq(rates):
    import librosa

    x = np.random.default_rng(1).standard_normal(12345).astype(np.float32)
    expected = librosa.resample(x, orig_sr=rates[0], target_sr=rates[1], res_type="soxr_hq")
    ours = audio_mod.resample(x, *rates)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_lossless_matches_reference_resampling(tmp_path, audio_writer):
    import librosa

    data = audio_writer(tmp_path / "a.flac", 0.4, 22050)[:, 0]
    expected = librosa.resample(data, orig_sr=22050, target_sr=16000, res_type="soxr_hq")
    # FLAC stores 16-bit samples: the difference is quantisation noise only.
    np.testing.assert_allclose(load_audio(str(tmp_path / "a.flac")), expected, atol=2e-4)
    data16 = audio_writer(tmp_path / "b.wav", 0.3, 16000)[:, 0]
    np.testing.assert_allclose(load_audio(str(tmp_path / "b.wav")), data16, atol=4e-5)


def test_stereo_is_mixed_to_mono(tmp_path, audio_writer):
    data = audio_writer(tmp_path / "s.wav", 0.25, 16000, channels=2)
    np.testing.assert_allclose(load_audio(str(tmp_path / "s.wav")), data.mean(axis=1), atol=4e-5)
    audio_writer(tmp_path / "s.mp3", 0.25, 48000, channels=2)
    assert load_audio(str(tmp_path / "s.mp3")).shape == (4000,)


def test_librosa_fallback_for_other_containers(tmp_path, audio_writer, monkeypatch):
    audio_writer(tmp_path / "a.wav", 0.3, 22050)
    direct = load_audio(str(tmp_path / "a.wav"))
    os.rename(tmp_path / "a.wav", tmp_path / "a.m4a")

    def unreadable(*args, **kwargs):
        raise RuntimeError("format not recognised")

    monkeypatch.setattr(audio_mod.sf, "read", unreadable)
    np.testing.assert_allclose(load_audio(str(tmp_path / "a.m4a")), direct, atol=1e-5)


def test_no_fallback_for_broken_soundfile_formats(tmp_path, monkeypatch):
    def no_fallback(*args, **kwargs):
        raise AssertionError("librosa fallback used")

    monkeypatch.setattr(audio_mod, "_librosa_load", no_fallback)
    (tmp_path / "broken.flac").write_bytes(b"fLaC-but-not-really" * 10)
    with pytest.raises(AudioError, match=r"broken\.flac: cannot decode \(.+\)"):
        load_audio(str(tmp_path / "broken.flac"))


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"this is not audio" * 10)
    with pytest.raises(AudioError, match=r"broken\.mp3: cannot decode") as err:
        load_audio(str(bad))
    assert err.value.reason == "undecodable"
    with pytest.raises(AudioError, match=r"missing\.wav: cannot decode \(no such file\)") as err:
        load_audio(str(tmp_path / "missing.wav"))
    assert err.value.reason == "missing_file"
    (tmp_path / "empty.m4a").write_bytes(b"")  # not libsndfile's: still no ffmpeg start for 0 bytes
    with pytest.raises(AudioError, match=r"empty\.m4a: cannot decode \(empty file, 0 bytes\)") as err:
        load_audio(str(tmp_path / "empty.m4a"))
    assert err.value.reason == "empty_audio"


def test_normalize_matches_hf_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in (1600, 4000, 2500)]
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    out = extractor(clips, sampling_rate=16000, padding=True, return_attention_mask=True,
                    return_tensors="np")
    for row, clip in enumerate(clips):
        n = len(clip)
        ours = normalize_waveform(clip)
        assert ours.dtype == np.float32
        assert np.abs(ours - out["input_values"][row, :n]).max() <= 1e-5
        assert out["attention_mask"][row, :n].all() and not out["attention_mask"][row, n:].any()
        np.testing.assert_array_equal(out["input_values"][row, n:], 0.0)
    assert abs(float(normalize_waveform(clips[0]).std()) - 1.0) < 1e-3
    np.testing.assert_array_equal(normalize_waveform(np.zeros(5, np.float32)), 0.0)


def _normalized_float64(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, dtype=np.float64)
    return (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-7)


def test_float32_normalisation_matches_float64_on_a_long_clip():
    # 20 s at 16 kHz with a DC offset of 1/4 of the standard deviation: a mean and variance
    # accumulated in float32 one sample after another (np.cumsum) is off by 6e-5 here; ours within 1e-6.
    rng = np.random.default_rng(3)
    pcm = np.clip(rng.standard_normal(320000) * 4000 + 1000, -32768, 32767).astype(np.int16)
    wav = pcm.astype(np.float32) / 32767.0
    expected = _normalized_float64(wav)
    ours = normalize_waveform(wav)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-6 * np.abs(expected).max()

    row = np.full(320010, 7.0, np.float32)  # a batch row longer than the clip
    normalize_int16_into(pcm, row[:320000])
    assert np.abs(row[:320000] - expected).max() <= 1e-6 * np.abs(expected).max()
    np.testing.assert_array_equal(row[320000:], 7.0)  # padding untouched
    silent = np.full(4, -3.0, np.float32)
    normalize_int16_into(np.zeros(4, np.int16), silent)
    np.testing.assert_array_equal(silent, 0.0)
