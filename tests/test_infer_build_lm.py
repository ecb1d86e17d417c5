"""`build-lm`: an ARPA from training transcripts normalised as the run trained, never from a Common
Voice test split; `evaluate --lm` decodes with it and records the decoder."""

from __future__ import annotations

import csv
import shutil

import jiwer
import kenlm
import pytest

from _forced import REFERENCES
from xlsr_jax.errors import UserError
from xlsr_jax.infer.build_lm import build_lm
from xlsr_jax.infer.evaluate import evaluate
from xlsr_jax.infer.ngram import read_unigrams
from xlsr_jax.rundir import RunDir, read_eval_results


def test_lm_words_are_normalised_like_the_run(trained_run, cv_dir, tmp_path):
    _, run = trained_run
    out = build_lm([f"cv:{cv_dir}:train"], tmp_path / "lm.arpa", run=str(run))
    # train.tsv: 'Bu "çok" güzel bir gün.', "İstanbul'da IŞIK var", "Ağaç, dal ve yaprak!", 'O dedi ki: "gel"'
    assert (out["sentences"], out["words"]) == (4, 16)
    words = read_unigrams(tmp_path / "lm.arpa")
    assert "istanbulda" in words and "ışık" in words and "ağaç" in words  # Turkish lowercasing, no punctuation
    assert not any(c in w for w in words for c in ',."!:')
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    assert model.order == 3
    assert model.score("o dedi ki gel") > model.score("gel ki dedi o")


def test_a_test_split_is_refused(cv_dir, tmp_path):
    with pytest.raises(UserError, match="test split"):
        build_lm([f"cv:{cv_dir}:train+test"], tmp_path / "lm.arpa", language="tr")
    assert not (tmp_path / "lm.arpa").exists()


def test_evaluate_with_the_lm_records_the_decoder(forced_run, cv_dir, tmp_path):
    """The newest forced checkpoint spells "nasılsan merhaba" greedily, "ı" a close second to the "a" of
    "nasılsan": an LM that knows "nasılsın" (built from train+dev text) takes it."""
    config, original = forced_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    build_lm([f"cv:{cv_dir}:train+dev"], tmp_path / "lm.arpa", run=str(run))
    greedy = evaluate(str(run), [f"cv:{cv_dir}:dev"], cache_dir=config.data.cache_dir)
    with_lm = evaluate(str(run), [f"cv:{cv_dir}:dev"], lm=str(tmp_path / "lm.arpa"), alpha=0.5, beta=1.0,
                       beam_width=16, cache_dir=config.data.cache_dir)
    assert with_lm["decoder"] == {"type": "lm", "lm": str(tmp_path / "lm.arpa"), "alpha": 0.5, "beta": 1.0,
                                  "beam_width": 16}
    for result, transcript in ((greedy, "nasılsan merhaba"), (with_lm, "nasılsın merhaba")):
        assert (result["step"], result["num_utterances"]) == (6, 2)
        with open(result["predictions"], encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert [(r["reference"], r["hypothesis"]) for r in rows] == [(r, transcript) for r in REFERENCES["dev"]]
        assert result["wer"] == pytest.approx(jiwer.wer(REFERENCES["dev"], [transcript] * 2), abs=1e-12)
    assert (greedy["wer"], with_lm["wer"]) == pytest.approx((4 / 3, 1.0), abs=1e-12)  # counted by hand
    assert with_lm["predictions"].endswith("-lm.tsv")
    stored = read_eval_results(RunDir(run).eval_results)
    assert [(r["decoder"]["type"], r["wer"]) for r in stored] == [("greedy", greedy["wer"]), ("lm", with_lm["wer"])]
