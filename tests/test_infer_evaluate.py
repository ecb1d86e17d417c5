"""Evaluation: WER/CER equal jiwer's over batches with filler rows on 4 devices; `evaluate` on a run
writes the predictions TSV and eval_results.json and picks the asked checkpoint."""

from __future__ import annotations

import csv
import functools
import shutil

import jax
import jax.numpy as jnp
import jiwer
import numpy as np
import pytest

import _forced
from xlsr_jax import parallel
from xlsr_jax.config import MeshConfig
from xlsr_jax.data import BatchLoader, Example, PreparedDataset
from xlsr_jax.errors import UserError
from xlsr_jax.infer.evaluate import PREDICTION_COLUMNS, evaluate, format_summary, write_predictions
from xlsr_jax.infer.predict import predict, utterance_errors
from xlsr_jax.rundir import RunDir, read_eval_results
from xlsr_jax.text import Vocab

REFERENCES = ["bir iki üç", "dört beş", "altı yedi sekiz dokuz", "on", "bir bir iki", "kedi köpek kuş",
              "ağaç dal yaprak"]


def _dataset(vocab: Vocab) -> PreparedDataset:
    lengths = np.asarray([1600 + 320 * i for i in range(len(REFERENCES))])
    audio = [np.sin(np.arange(n) * 0.01).astype(np.float32) for n in lengths]
    return PreparedDataset(texts=list(REFERENCES), labels=[vocab.encode(t) for t in REFERENCES], lengths=lengths,
                           audio=audio, examples=[Example(f"/clips/{i}.mp3", t) for i, t in enumerate(REFERENCES)])


def _fake_eval(params, batch, *, swap, blank):
    """Predicts each row's own labels with one character swapped for another, a blank after every
    character (so CTC keeps repeats): hypotheses are known strings."""
    labels = batch["labels"]
    ids = jnp.where(labels == swap[0], swap[1], labels)
    ids = jnp.where(labels < 0, blank, ids)
    ids = jnp.stack([ids, jnp.full_like(ids, blank)], axis=-1).reshape(ids.shape[0], -1)
    return {"loss_sum": 1.5 * batch["example_mask"].sum(), "examples": batch["example_mask"].sum(),
            "pred_ids": ids, "frames": 2 * (labels >= 0).sum(-1)}


def test_error_rates_equal_jiwer_over_batches_with_filler_rows():
    vocab = Vocab.build(REFERENCES)
    mesh = parallel.make_mesh(MeshConfig())  # 4 devices, one row each
    dataset = _dataset(vocab)
    loader = BatchLoader(dataset, batch_size=4, boundaries=[3200, 4000], shuffle=False)
    plan = loader.epoch_batches(0)
    assert len(plan) == 2 and sum(int((idx < 0).sum()) for _, idx in plan) == 1, "one filler row"
    swap = (vocab.token_to_id("i"), vocab.token_to_id("e"))
    eval_fn = jax.jit(functools.partial(_fake_eval, swap=swap, blank=vocab.pad_id))
    metrics, predictions = predict({}, loader, eval_fn, vocab, mesh)

    expected = [t.replace("i", "e") for t in REFERENCES]
    assert [p.hypothesis for p in predictions] == expected
    assert [p.reference for p in predictions] == REFERENCES
    assert metrics["wer"] == pytest.approx(jiwer.wer(REFERENCES, expected), abs=1e-12)
    assert metrics["cer"] == pytest.approx(jiwer.cer(REFERENCES, expected), abs=1e-12)
    assert (metrics["wer"], metrics["cer"]) == pytest.approx((8 / 19, 10 / 81), abs=1e-12)  # counted by hand
    assert metrics["examples"] == 7 and metrics["loss"] == pytest.approx(1.5)


def test_predict_dispatches_the_next_batch_before_fetching_this_one(monkeypatch):
    """The precompiled eval step (one executable per bucket) and the jitted one give the same scores,
    and batch k+1 is on its way to the device before batch k's outputs are fetched."""
    from xlsr_jax.infer import predict as predict_module
    from xlsr_jax.aot import StepToCompile, compile_steps

    vocab = Vocab.build(REFERENCES)
    mesh = parallel.make_mesh(MeshConfig())
    loader = BatchLoader(_dataset(vocab), batch_size=4, boundaries=[3200, 4000], shuffle=False)
    swap = (vocab.token_to_id("i"), vocab.token_to_id("e"))
    jitted = jax.jit(functools.partial(_fake_eval, swap=swap, blank=vocab.pad_id))
    precompiled = compile_steps([StepToCompile("eval", jitted, {}, loader.batch_shapes.values())],
                                parallel.batch_sharding(mesh))["eval"]
    order = []

    def dispatch(params, batch):
        order.append("dispatch")
        return precompiled(params, batch)

    fetch = predict_module._fetch
    monkeypatch.setattr(predict_module, "_fetch", lambda *a: order.append("fetch") or fetch(*a))
    pipelined = predict({}, loader, dispatch, vocab, mesh)
    assert order == ["dispatch", "dispatch", "fetch", "fetch"], "two batches: the second is dispatched first"
    assert pipelined == predict({}, loader, jitted, vocab, mesh)


def test_per_utterance_errors_add_up_to_the_corpus_rates(tmp_path):
    refs, hyps = ["a b c", "d e", "f"], ["a x c d", "", "f"]
    rows = [utterance_errors(r, h) for r, h in zip(refs, hyps)]
    assert rows[0] == {"word_errors": 2, "reference_words": 3, "char_errors": 3, "reference_chars": 5}
    assert sum(r["word_errors"] for r in rows) / sum(r["reference_words"] for r in rows) == jiwer.wer(refs, hyps)
    assert sum(r["char_errors"] for r in rows) / sum(r["reference_chars"] for r in rows) == jiwer.cer(refs, hyps)
    from xlsr_jax.infer.predict import Prediction

    path = write_predictions(tmp_path / "p.tsv", [Prediction(i, r, h) for i, (r, h) in enumerate(zip(refs, hyps))],
                             ["x.mp3", "y.mp3", "z.mp3"])
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert tuple(table[0]) == PREDICTION_COLUMNS
    assert [(t["path"], t["hypothesis"], int(t["word_errors"])) for t in table] == \
        [("x.mp3", "a x c d", 2), ("y.mp3", "", 2), ("z.mp3", "f", 0)]


@pytest.fixture
def run_copy(trained_run, tmp_path):
    config, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return config, copy


def _read_tsv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_evaluate_a_run_writes_predictions_and_results(run_copy, cv_dir):
    config, run = run_copy
    result = evaluate(str(run), [f"cv:{cv_dir}:test"], cache_dir=config.data.cache_dir)
    rows = _read_tsv(result["predictions"])
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["common_voice_tr_7.mp3"]
    assert rows[0]["reference"] == "görüşürüz"  # normalised as the run trained (Turkish lowercasing)
    refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    assert result["wer"] == jiwer.wer(refs, hyps) and result["cer"] == jiwer.cer(refs, hyps)
    assert result["step"] == 6 and result["num_utterances"] == 1 and result["language"] == "tr"
    stored = read_eval_results(RunDir(run).eval_results)
    assert len(stored) == 1 and stored[0]["wer"] == result["wer"] and stored[0]["data"] == f"cv:{cv_dir}:test"
    lines = format_summary(result).splitlines()
    assert lines[-2:] == [f"wer: {result['wer']:.4f}", f"cer: {result['cer']:.4f}"]

    evaluate(str(run), [f"cv:{cv_dir}:test"], cache_dir=config.data.cache_dir)  # the same again: replaced
    evaluate(str(run), [f"cv:{cv_dir}:dev"], step=3, cache_dir=config.data.cache_dir)
    stored = read_eval_results(RunDir(run).eval_results)
    assert [(r["data"].rsplit(":", 1)[-1], r["step"]) for r in stored] == [("test", 6), ("dev", 3)]


def test_evaluate_best_uses_the_best_checkpoint(forced_run, cv_dir, tmp_path):
    """Forced checkpoints: step 3 (saved with eval/wer 0.75) spells "nasılsın", the newer step 6 (1.5)
    "nasılsan merhaba"; on dev they score 2/3 and 4/3."""
    config, original = forced_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    result = evaluate(str(run), [f"cv:{cv_dir}:dev"], best=True, cache_dir=config.data.cache_dir)
    assert result["step"] == 3
    assert [r["hypothesis"] for r in _read_tsv(result["predictions"])] == ["nasılsın"] * 2
    assert result["wer"] == pytest.approx(jiwer.wer(_forced.REFERENCES["dev"], ["nasılsın"] * 2), abs=1e-12)
    newest = evaluate(str(run), [f"cv:{cv_dir}:dev"], cache_dir=config.data.cache_dir)  # what a wrong pick scores
    assert newest["step"] == 6
    assert (result["wer"], newest["wer"]) == pytest.approx((2 / 3, 4 / 3), abs=1e-12)  # counted by hand
    with pytest.raises(UserError, match="no checkpoint for step 5"):
        evaluate(str(run), [f"cv:{cv_dir}:dev"], step=5, cache_dir=config.data.cache_dir)


def test_dataset_description_for_the_card():
    from xlsr_jax.infer.evaluate import describe_dataset

    assert describe_dataset("cv:/data/cv-corpus-23.0-2025-09-05/tr:test", None) == \
        {"type": "common_voice", "name": "Common Voice 23.0 (tr)", "config": "tr", "split": "test"}
    assert describe_dataset("cv:data/demo_tr:dev+test", "tr")["split"] == "dev+test"
    assert describe_dataset("manifest:/x/eval.tsv", "de")["type"] == "manifest"
    assert describe_dataset("hf:google/fleurs:tr_tr:test?text=transcription", "tr") == \
        {"type": "google/fleurs", "name": "google/fleurs", "config": "tr_tr", "split": "test"}
    assert describe_dataset("hf:mozilla-foundation/common_voice_17_0:test", "tr") == \
        {"type": "mozilla-foundation/common_voice_17_0", "name": "mozilla-foundation/common_voice_17_0",
         "config": "tr", "split": "test"}
    assert describe_dataset("cv:/data/tr:test?language=tr", None)["split"] == "test"


def test_evaluate_an_exported_folder_scores_like_its_run(run_copy, cv_dir, tmp_path):
    config, run = run_copy
    folder = tmp_path / "hf_model"
    shutil.copytree(run / "hf_model", folder)
    from_folder = evaluate(str(folder), [f"cv:{cv_dir}:dev"], cache_dir=config.data.cache_dir,
                           out=str(tmp_path / "folder.tsv"))
    from_run = evaluate(str(run), [f"cv:{cv_dir}:dev"], cache_dir=config.data.cache_dir,
                        out=str(tmp_path / "run.tsv"))
    assert from_folder["step"] == from_run["step"] == 6  # the export knows the step it came from
    assert _read_tsv(tmp_path / "folder.tsv") == _read_tsv(tmp_path / "run.tsv")
    assert read_eval_results(folder / "eval_results.json")[0]["wer"] == from_run["wer"]
    with pytest.raises(UserError, match="--step, --best and --average choose among a training run's checkpoints"):
        evaluate(str(folder), [f"cv:{cv_dir}:dev"], best=True)


def test_summary_counts_skipped_and_scored_problems_by_reason():
    report = dict(total=12, kept=9, hours=0.01, missing_file=1, undecodable=0, empty_audio=0, silence=1,
                  too_short=0, too_long=0, empty_text=1, out_of_vocabulary=2, infeasible=1)
    result = dict(report=report, step=6, decoder={"type": "greedy"}, headline="wer", source="run", data="cv:x:dev",
                  num_utterances=9, language="tr", predictions="p.tsv", results_file="r.json", wer=0.5, cer=0.25)
    assert format_summary(result).splitlines()[1] == (
        "utterances: 9 scored; 3 skipped (1 missing_file, 1 silence, 1 empty_text); 1 longer in characters than "
        "the model has frames and 2 with characters outside the vocabulary (scored)")


def test_collapse_shares_count_blank_frames_and_empty_transcripts():
    from xlsr_jax.infer.predict import Prediction, collapse_shares

    predictions = [Prediction(0, "a b", "", frames=50, blank_frames=50), Prediction(1, "c", "c", frames=30, blank_frames=20),
                   Prediction(2, "d", " ", frames=20, blank_frames=20)]
    assert collapse_shares(predictions) == {"blank_frames": 0.9, "empty": 2 / 3}
    assert collapse_shares([]) == {"blank_frames": 0.0, "empty": 0.0}
