"""Ending a run on what evaluation says: early stopping with patience (also across a resume) and the
caller's `on_eval` rule (what the sweep prunes with)."""

from __future__ import annotations

import json
import logging

import pytest

from _resumed import assert_resumed, tag_records
from _runs import tiny_run_config
from xlsr_jax.config import ConfigError, from_dict, to_dict
from xlsr_jax.rundir import EXPORT_INFO
from xlsr_jax.recipe import train
from xlsr_jax.train.stopping import EarlyStopping


def _evals(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/loss" in r]


def test_patience_counts_evaluations_without_a_better_value():
    stopping = EarlyStopping("eval/loss", "min", patience=2)
    seen = [stopping.update({"eval/loss": v}) for v in (3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.2)]
    # 2.0 again is not better; stops at the second evaluation in a row that did not beat 1.0
    assert seen == [False, False, False, True, False, False, True]
    assert stopping.best == 1.0
    higher = EarlyStopping("eval/acc", "max", patience=1)
    assert [higher.update({"eval/acc": v}) for v in (0.1, 0.2, 0.1)] == [False, False, True]


class _Kept:
    def __init__(self, metrics):
        self._metrics = metrics

    def all_steps(self):
        return sorted(self._metrics)

    def metrics(self, step):
        return self._metrics[step]


def test_resumed_state_is_the_newest_saved_at_or_before_the_start():
    saved = EarlyStopping("eval/wer", "min", 3, best=0.5, since_best=2).state()
    kept = _Kept({40: {"eval/wer": 0.5}, 60: {"eval/wer": 0.6, **saved}, 70: None,
                  80: {"eval/wer": 0.7, **EarlyStopping("eval/wer", "min", 3, best=0.5, since_best=3).state()}})
    stopping = EarlyStopping.resumed("eval/wer", "min", 3, kept, start=70)
    assert (stopping.best, stopping.since_best) == (0.5, 2)
    fresh = EarlyStopping.resumed("eval/wer", "min", 3, _Kept({10: None}), start=10)
    assert fresh.since_best == 0 and fresh.best != fresh.best  # nan: nothing seen yet


def test_patience_needs_an_eval_metric(cv_dir, tmp_path):
    config = to_dict(tiny_run_config(cv_dir, tmp_path, max_steps=4))
    config["train"]["early_stopping_patience"] = 2
    config["checkpoint"] = {"best_metric": None}
    with pytest.raises(ConfigError, match="train.early_stopping_patience needs checkpoint.best_metric"):
        from_dict(config)


@pytest.mark.slow  # trains
def test_early_stopping_ends_a_run_as_finished_and_keeps_its_last_state(cv_dir, tmp_path):
    # The tiny model's WER stays at or above 1.0 for its first steps: no evaluation after the first is better.
    config = to_dict(tiny_run_config(cv_dir, tmp_path, max_steps=40, eval_steps=1, save_steps=100))
    config["train"]["early_stopping_patience"] = 2
    config["checkpoint"] = {"best_metric": "eval/wer"}
    result = train(from_dict(config))
    run = tmp_path / "run"
    evals = _evals(run)
    wers = [r["eval/wer"] for r in evals]
    assert len(wers) == 3 and min(wers[1:]) >= wers[0], wers  # the first best, two evaluations without a better one
    assert result["run/stopped_early"] == 3.0
    finished = json.loads((run / "finished.json").read_text())
    assert finished["step"] == 3
    assert (run / "checkpoints" / "3").is_dir() and (run / "hf_model" / "config.json").is_file()
    again = train(from_dict(config))  # finished: not trained again
    assert again["run/already_finished"] == 1.0


@pytest.mark.slow  # trains
def test_a_run_stopped_early_exports_its_best_checkpoint(cv_dir, tmp_path):
    # "max" of a falling eval loss: the first evaluation stays the best, so the run stops at step 3 and
    # hf_model/ must hold step 1's parameters, not the last state's.
    config = to_dict(tiny_run_config(cv_dir, tmp_path, max_steps=40, eval_steps=1, save_steps=100))
    config["train"]["early_stopping_patience"] = 2
    config["checkpoint"] = {"best_metric": "eval/loss", "best_mode": "max"}
    result = train(from_dict(config))
    run = tmp_path / "run"
    losses = [r["eval/loss"] for r in _evals(run)]
    assert result["run/stopped_early"] == 3.0 and losses[0] > max(losses[1:])
    exported = json.loads((run / "hf_model" / EXPORT_INFO).read_text())
    assert (exported["step"], exported["selected"]) == (1, "best")


@pytest.mark.slow  # trains
def test_patience_carries_over_a_resume(cv_dir, tmp_path, caplog):
    config = to_dict(tiny_run_config(cv_dir, tmp_path, max_steps=2, eval_steps=1, save_steps=100))
    config["train"]["early_stopping_patience"] = 2
    config["optim"]["schedule"] = "constant"
    config["checkpoint"] = {"best_metric": "eval/wer"}
    first = train(from_dict(config))
    assert "run/stopped_early" not in first  # evaluations 1 and 2: one without a better WER
    config["train"]["max_steps"] = 40
    tagged = tag_records(tmp_path / "run")
    caplog.set_level(logging.INFO)
    resumed = train(from_dict(config))
    assert 3 in assert_resumed(tmp_path / "run", 2, tagged, caplog.text)  # a restart would stop at 3 as well
    assert resumed["run/stopped_early"] == 3.0  # the second in a row, counting the one before the resume
    assert [r["step"] for r in _evals(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.slow  # trains
def test_on_eval_returning_true_ends_the_run_after_that_evaluation(cv_dir, tmp_path):
    config = tiny_run_config(cv_dir, tmp_path, max_steps=40, eval_steps=2, save_steps=100)
    calls = []

    def prune(step, scores):
        calls.append((step, sorted(scores)))
        return step == 4

    result = train(config, on_eval=prune)
    assert [step for step, _ in calls] == [2, 4]
    assert "eval/cer" in calls[0][1]
    assert result["run/stopped_early"] == 4.0
    assert [r["step"] for r in _evals(tmp_path / "run")] == [2, 4]
