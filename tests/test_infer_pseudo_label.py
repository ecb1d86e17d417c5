"""`pseudo-label`: a model's transcripts of audio nobody transcribed, each with a confidence (the mean frame
log-prob of the greedy path), kept by threshold or top fraction, written as a manifest `train` reads back;
benchmark splits refused."""

from __future__ import annotations

import csv
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _forced import SPELLINGS, START, END, _targets
from xlsr_jax.data.sources import load_manifest, load_sources
from xlsr_jax.errors import UserError
from xlsr_jax.infer.predict import Prediction
from xlsr_jax.infer.pseudo_label import all_rows_path, pseudo_label, select
from xlsr_jax.infer.step import utterance_confidence
from xlsr_jax.text import Vocab


def _log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_confidence_is_the_mean_greedy_log_prob_over_the_valid_frames():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 9, 6)).astype(np.float32)
    frames = np.asarray([9, 5, 0])
    mask = np.arange(9)[None] < frames[:, None]
    got = np.asarray(utterance_confidence(jax.nn.log_softmax(jnp.asarray(logits)), jnp.asarray(mask)))
    want = [_log_softmax(logits[i, :n]).max(-1).mean() if n else 0.0 for i, n in enumerate(frames)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    noisy = logits.copy()
    noisy[1, 5:] = 50.0 * rng.normal(size=(4, 6))  # padding: nothing there may count
    np.testing.assert_array_equal(
        np.asarray(utterance_confidence(jax.nn.log_softmax(jnp.asarray(noisy)), jnp.asarray(mask))), got)


def test_a_clip_the_model_gets_wrong_ranks_below_one_it_gets_right():
    """Two clips of "merhaba": on one the model is sure of every character; on the other it hesitates on
    three frames, where a wrong character wins narrowly, so its greedy transcript is wrong."""
    vocab = Vocab.build(["merhaba dünya"])
    right = [vocab.token_to_id(c) for c in "merhaba"]
    logits = np.zeros((2, 2 * len(right), len(vocab)), np.float32)
    for i, token in enumerate(right):  # each character, then a blank
        logits[:, 2 * i, token] = 8.0
        logits[:, 2 * i + 1, vocab.pad_id] = 8.0
    wrong = vocab.token_to_id("ü")
    for frame in (2, 6, 8):  # r, b, a: a wrong character 0.3 above the right one, which is 1.0 above the rest
        logits[1, frame] = 0.0
        logits[1, frame, right[frame // 2]] = 1.0
        logits[1, frame, wrong] = 1.3
    mask = np.ones(logits.shape[:2], bool)
    confidence = np.asarray(utterance_confidence(jax.nn.log_softmax(jnp.asarray(logits)), jnp.asarray(mask)))
    texts = vocab.decode_ctc_batch(logits.argmax(-1), mask.sum(-1))
    assert texts[0] == "merhaba" and texts[1] != "merhaba"
    assert confidence[1] < confidence[0] < 0
    predictions = [Prediction(i, "", text, float(c)) for i, (text, c) in enumerate(zip(texts, confidence))]
    assert select(predictions, top_fraction=0.5) == [True, False]
    assert select(predictions, min_confidence=float(confidence[1] + confidence[0]) / 2) == [True, False]


def test_select_drops_empty_transcripts_and_combines_the_rules():
    predictions = [Prediction(i, "", text, c) for i, (text, c) in
                   enumerate([("a", -0.1), ("", -0.01), ("b", -0.5), ("c", -0.2), ("d", -0.2)])]
    assert select(predictions) == [True, False, True, True, True]
    assert select(predictions, min_confidence=-0.2) == [True, False, False, True, True]
    # top 60 % of 5 = 3 rows by confidence: -0.01 (empty, so not kept), -0.1, then the first -0.2 (row 3)
    assert select(predictions, top_fraction=0.6) == [True, False, False, True, False]
    assert select(predictions, top_fraction=0.6, min_confidence=-0.15) == [True, False, False, False, False]
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="--top-fraction"):
            select(predictions, top_fraction=bad)


@pytest.mark.parametrize("spec", ["cv:{cv}:other+test", "cv:{cv}:validated"])
def test_benchmark_audio_is_refused_before_anything_loads(spec, cv_dir, tmp_path):
    with pytest.raises(UserError, match="is the benchmark; transcripts of its audio must not reach training"):
        pseudo_label(str(tmp_path / "no-such-run"), [spec.format(cv=cv_dir)], tmp_path / "labels.tsv")
    assert not (tmp_path / "labels.tsv").exists()


def _expected_confidence(spelling, vocab: Vocab, frames: int) -> float:
    """The forced model's confidence for an utterance of `frames` frames (tests/_forced.py: its first START
    and last END frames, and every frame between, give the rows of `_targets`)."""
    best = _log_softmax(_targets(spelling, vocab)).max(-1)
    return float((best[:START].sum() + (frames - START - END) * best[START] + best[START + 1:].sum()) / frames)


@pytest.mark.slow  # the forced run (trained_run)
def test_a_forced_model_labels_untranscribed_clips_and_train_reads_them_back(forced_run, cv_dir, tmp_path):
    """The clips of train+dev listed in a manifest with no text column, labelled by the forced run's step 3
    (sure of "nasılsın") and step 6 ("nasılsan merhaba", a close second at one frame): every clip gets the
    step's transcript and the confidence its logits give; the kept half reads back as a manifest."""
    from xlsr_jax.infer.build_lm import build_lm
    from xlsr_jax.infer.load import load_run

    config, original = forced_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    clips = sorted(e.path for e in load_sources([f"cv:{cv_dir}:train+dev"]))
    manifest = tmp_path / "audio.tsv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in clips), encoding="utf-8")
    loaded = load_run(run)
    results = {}
    for step in (3, 6):
        out = tmp_path / f"labels{step}.tsv"
        results[step] = pseudo_label(str(run), [f"manifest:{manifest}"], out, step=step, top_fraction=0.5,
                                     cache_dir=config.data.cache_dir)
        assert (results[step]["labelled"], results[step]["kept"], results[step]["empty"]) == (6, 3, 0)
        with open(all_rows_path(out), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert sorted(r["path"] for r in rows) == clips
        assert {r["sentence"] for r in rows} == {SPELLINGS[step].greedy()}
        assert sum(int(r["kept"]) for r in rows) == 3 and "lm_score" not in rows[0]
        confidences = [float(r["confidence"]) for r in rows]
        assert confidences == sorted(confidences, reverse=True), "the surest first"
        for r in rows:
            samples = int(round(float(r["duration_s"]) * 16000))
            frames = int(loaded.model.output_lengths(np.asarray([samples]))[0])
            assert float(r["confidence"]) == pytest.approx(
                _expected_confidence(SPELLINGS[step], loaded.vocab, frames), abs=2e-3), r
        kept = load_manifest(str(out))
        assert len(kept) == 3 and {e.text for e in kept} == {SPELLINGS[step].greedy()}
        assert [e.path for e in kept] == [r["path"] for r in rows if r["kept"] == "1"]
        rows_of_step_6 = rows
    # The newest checkpoint's "nasılsan" (wrong) hesitates where the best one's "nasılsın" (right) does not.
    mean = {step: np.mean([float(r.split("\t")[2]) for r in all_rows_path(tmp_path / f"labels{step}.tsv")
                           .read_text(encoding="utf-8").splitlines()[1:]]) for step in (3, 6)}
    assert mean[6] < mean[3]
    # With an LM that knows "nasılsın" (tests/test_infer_build_lm.py), step 6's beams take it, scored.
    build_lm([f"cv:{cv_dir}:train+dev"], tmp_path / "lm.arpa", run=str(run))
    with_lm = pseudo_label(str(run), [f"manifest:{manifest}"], tmp_path / "lm.tsv", lm=str(tmp_path / "lm.arpa"),
                           alpha=0.5, beta=1.0, beam_width=16, cache_dir=config.data.cache_dir)
    rows = list(csv.DictReader(open(tmp_path / "lm.tsv", encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == 6 and {r["sentence"] for r in rows} == {"nasılsın merhaba"}
    assert all(float(r["lm_score"]) < 0 for r in rows)
    assert [float(r["confidence"]) for r in rows] == [float(r["confidence"]) for r in rows_of_step_6], \
        "the confidence is the model's, with or without an LM"
