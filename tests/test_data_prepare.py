import logging

import numpy as np
import pytest

from xlsr_jax.data.prepare import ctc_min_frames, prepare_dataset
from xlsr_jax.data.sources import Example, parse_source
from xlsr_jax.text import Vocab, normalize_text


def tr_normalize(example):
    return normalize_text(example.text, language="tr")


def frames_320(samples: np.ndarray) -> np.ndarray:
    """Output frames of a model with a 320-sample stride (wav2vec2 at 16 kHz, roughly)."""
    return np.asarray(samples) // 320


def test_ctc_min_frames():
    labels = [np.array([1, 2, 3]), np.array([1, 1, 2, 2, 2]), np.array([4])]
    np.testing.assert_array_equal(ctc_min_frames(labels), [3, 8, 1])


def test_common_voice_end_to_end(cv_dir, tmp_path, caplog):
    examples = parse_source(f"cv:{cv_dir}:train+dev")
    vocab = Vocab.build(tr_normalize(e) for e in examples)
    with caplog.at_level(logging.INFO):
        ds, report = prepare_dataset(
            examples, vocab=vocab, normalize=tr_normalize, sampling_rate=16000,
            cache_dir=tmp_path, num_workers=0, name="cv-train")
    assert len(ds) == 6 and report["kept"] == 6 and report["total"] == 6
    assert ds.texts[1] == "istanbulda ışık var"
    np.testing.assert_array_equal(ds.labels[1], vocab.encode("istanbulda ışık var"))
    assert ds.labels[1].dtype == np.int32 and ds.lengths.dtype == np.int64
    # clip_durations.tsv and the decoded lengths agree (MP3 at 48 kHz -> 16 kHz).
    expected = np.array([e.duration_s for e in examples]) * 16000
    np.testing.assert_allclose(ds.lengths, expected, atol=2)
    assert report["hours"] == pytest.approx(ds.lengths.sum() / 16000 / 3600)
    for i in range(len(ds)):
        assert ds.audio[i].shape == (ds.lengths[i],)
    assert "cv-train: kept 6 of 6" in caplog.text


def _examples(tmp_path, audio_writer):
    """Six clips (0.25 s to 1.5 s) with texts designed to hit every filter."""
    specs = [("a.wav", 1.0, "merhaba"), ("b.wav", 0.25, "kısa"), ("c.wav", 1.5, "uzun ses"),
             ("d.wav", 1.0, "?!"), ("e.mp3", 0.5, "bu çok uzun bir cümle ama ses kısa"),
             ("f.wav", 1.0, "bozuk")]
    examples = []
    for name, seconds, text in specs:
        audio_writer(tmp_path / name, seconds, 16000)
        examples.append(Example(str(tmp_path / name), text))
    (tmp_path / "f.wav").write_bytes(b"RIFF broken")
    return examples


def test_filters_and_report(tmp_path, audio_writer):
    examples = _examples(tmp_path, audio_writer)
    vocab = Vocab.build(tr_normalize(e) for e in examples)
    common = dict(vocab=vocab, normalize=tr_normalize, sampling_rate=16000,
                  cache_dir=tmp_path / "cache", num_workers=0, min_duration_s=0.3,
                  max_duration_s=1.2, frames_fn=frames_320)
    train, report = prepare_dataset(examples, **common)
    # e: 25 frames for 33 characters -> infeasible, dropped for training.
    assert train.texts == ["merhaba"]
    assert [e.path for e in train.examples] == [examples[0].path]
    assert report == dict(total=6, kept=1, skipped_decode=1, empty_text=1, too_short=1,
                          too_long=1, infeasible=1, hours=pytest.approx(1 / 3600))
    evaluation, report = prepare_dataset(examples, drop_infeasible=False, name="dev", **common)
    assert evaluation.texts == ["merhaba", "bu çok uzun bir cümle ama ses kısa"]
    assert report["infeasible"] == 1 and report["kept"] == 2
    np.testing.assert_array_equal(evaluation.lengths, [16000, 8000])
    assert evaluation.audio[1].shape == (8000,)
    np.testing.assert_array_equal(evaluation.audio[0], train.audio[0])


def test_repeats_count_towards_feasibility(tmp_path, audio_writer):
    audio_writer(tmp_path / "x.wav", 0.1, 16000)  # 1600 samples -> 5 frames
    examples = [Example(str(tmp_path / "x.wav"), "aabb"), Example(str(tmp_path / "x.wav"), "abab")]
    vocab = Vocab.build(["ab"])
    ds, report = prepare_dataset(examples, vocab=vocab, normalize=lambda e: e.text, sampling_rate=16000,
                                 cache_dir=tmp_path / "c", num_workers=0, frames_fn=frames_320)
    # 'aabb' needs 4 labels + 2 blanks = 6 > 5 frames; 'abab' needs 4.
    assert ds.texts == ["abab"] and report["infeasible"] == 1
