import dataclasses
import logging
import os

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
    assert report == dict(total=6, kept=1, bad_path=0, missing_file=0, undecodable=1, empty_audio=0, silence=0,
                          too_short=1, too_long=1, empty_text=1, out_of_vocabulary=0, infeasible=1,
                          too_few_frames=0, hours=pytest.approx(1 / 3600))
    evaluation, report = prepare_dataset(examples, drop_infeasible=False, name="dev", **common)
    assert evaluation.texts == ["merhaba", "bu çok uzun bir cümle ama ses kısa"]
    assert report["infeasible"] == 1 and report["kept"] == 2
    np.testing.assert_array_equal(evaluation.lengths, [16000, 8000])
    assert evaluation.audio[1].shape == (8000,)
    np.testing.assert_array_equal(evaluation.audio[0], train.audio[0])


def test_audio_only_keeps_clips_without_transcripts_and_drops_too_few_frames(tmp_path, audio_writer):
    """Pretraining (vocab=None): empty, punctuation-only and long transcripts are kept as they are, with
    empty labels; a clip under `min_frames` frames is dropped and counted; the other filters still act."""
    examples = _examples(tmp_path, audio_writer) + [Example(str(tmp_path / "a.wav"), "")]
    ds, report = prepare_dataset(examples, vocab=None, normalize=None, sampling_rate=16000, cache_dir=tmp_path / "c",
                                 num_workers=0, min_duration_s=0.3, max_duration_s=1.2, frames_fn=frames_320,
                                 min_frames=30)
    assert [os.path.basename(e.path) for e in ds.examples] == ["a.wav", "d.wav", "a.wav"]
    assert ds.texts == ["merhaba", "?!", ""] and all(len(label) == 0 for label in ds.labels)
    assert [(os.path.basename(c.path), c.reason) for c in ds.bad] == [
        ("b.wav", "too_short"), ("c.wav", "too_long"), ("e.mp3", "too_few_frames"), ("f.wav", "undecodable")]
    assert "25 frames, fewer than the 30" in ds.bad[2].detail
    assert report["kept"] == 3 and report["too_few_frames"] == 1 and report["empty_text"] == report["infeasible"] == 0


def test_repeats_count_towards_feasibility(tmp_path, audio_writer):
    audio_writer(tmp_path / "x.wav", 0.1, 16000)  # 1600 samples -> 5 frames
    examples = [Example(str(tmp_path / "x.wav"), "aabb"), Example(str(tmp_path / "x.wav"), "abab")]
    vocab = Vocab.build(["ab"])
    ds, report = prepare_dataset(examples, vocab=vocab, normalize=lambda e: e.text, sampling_rate=16000,
                                 cache_dir=tmp_path / "c", num_workers=0, frames_fn=frames_320)
    # 'aabb' needs 4 labels + 2 blanks = 6 > 5 frames; 'abab' needs 4.
    assert ds.texts == ["abab"] and report["infeasible"] == 1


def test_every_bad_clip_is_named_with_its_reason(tmp_path, audio_writer):
    examples = [dataclasses.replace(e, source="manifest:m.tsv") for e in _examples(tmp_path, audio_writer)]
    vocab = Vocab.build(tr_normalize(e) for e in examples)
    common = dict(vocab=vocab, normalize=tr_normalize, sampling_rate=16000, cache_dir=tmp_path / "cache",
                  num_workers=0, min_duration_s=0.3, max_duration_s=1.2, frames_fn=frames_320)
    train, _ = prepare_dataset(examples, **common)
    rows = [(os.path.basename(c.path), c.reason, c.dropped) for c in train.bad]
    assert rows == [("b.wav", "too_short", True), ("c.wav", "too_long", True), ("d.wav", "empty_text", True),
                    ("e.mp3", "infeasible", True), ("f.wav", "undecodable", True)]
    assert {(c.split, c.source) for c in train.bad} == {("train", "manifest:m.tsv")}
    details = {os.path.basename(c.path): c.detail for c in train.bad}
    assert details["b.wav"] == "0.25 s, shorter than 0.3 s" and details["c.wav"] == "1.50 s, longer than 1.2 s"
    assert details["d.wav"] == "transcript '?!'"
    assert details["e.mp3"] == "34 CTC frames needed for the transcript, its audio gives 25"  # 34 characters, 0.5 s
    assert details["f.wav"].startswith("cannot decode (")  # the path is the report's own column
    # Evaluation scores infeasible utterances: flagged, not dropped.
    evaluation, _ = prepare_dataset(examples, drop_infeasible=False, name="eval", **common)
    flagged = [(os.path.basename(c.path), c.split, c.dropped) for c in evaluation.bad if c.reason == "infeasible"]
    assert flagged == [("e.mp3", "eval", False)] and len(evaluation) == 2


def test_out_of_vocabulary_is_flagged_and_still_scored(tmp_path, audio_writer):
    audio_writer(tmp_path / "a.wav", 0.5, 16000)
    examples = [Example(str(tmp_path / "a.wav"), "abc"), Example(str(tmp_path / "a.wav"), "a xq b")]
    vocab = Vocab.build(["abc"])
    ds, report = prepare_dataset(examples, vocab=vocab, normalize=lambda e: e.text, sampling_rate=16000,
                                 cache_dir=tmp_path / "c", num_workers=0, drop_infeasible=False, name="eval")
    assert ds.texts == ["abc", "a xq b"]  # kept: the reference keeps the characters the model cannot write
    np.testing.assert_array_equal(ds.labels[1], vocab.encode("a xq b"))
    assert vocab.unk_id in ds.labels[1]
    assert [(c.reason, c.detail, c.dropped) for c in ds.bad] == [
        ("out_of_vocabulary", "not in the vocabulary: q x", False)]
    assert report["out_of_vocabulary"] == 1 and report["kept"] == 2


def test_log_counts_dropped_and_flagged_by_reason(tmp_path, audio_writer, caplog):
    examples = _examples(tmp_path, audio_writer)
    vocab = Vocab.build(tr_normalize(e) for e in examples)
    with caplog.at_level(logging.INFO, logger="xlsr_jax.data.prepare"):
        prepare_dataset(examples, vocab=vocab, normalize=tr_normalize, sampling_rate=16000,
                        cache_dir=tmp_path / "cache", num_workers=0, min_duration_s=0.3, max_duration_s=1.2,
                        frames_fn=frames_320, drop_infeasible=False, name="dev")
    assert ("dev: kept 2 of 6 utterances (0.00 h); dropped 4: 1 undecodable, 1 too_short, 1 too_long, "
            "1 empty_text; kept but flagged: 1 infeasible") in caplog.text
