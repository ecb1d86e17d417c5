"""CTC fine-tuning as the loop's objective: the warning for a model that predicts only blanks."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from _runs import tiny_run_config
from xlsr_jax.config import Config, from_dict
from xlsr_jax.train.ctc import blank_collapse_advice


def _config(warmup: int, head_only: int = 0) -> Config:
    return from_dict({"optim": {"warmup_steps": warmup, "learning_rate": 0.5},
                      "model": {"freeze_transformer_steps": head_only}})


@pytest.mark.parametrize("step, blank, empty, warns", [
    (500, 1.0, 1.0, False),  # still in the warm-up: XLSR models do this at first
    (501, 1.0, 1.0, True),
    (800, 0.985, 0.2, True),  # a letter here and there is still a collapse
    (800, 0.9, 0.95, True),  # nearly every transcript empty
    (800, 0.7, 0.05, False),  # a working model: 30 % of frames to characters
])
def test_blank_collapse_is_named_past_the_warm_up(step, blank, empty, warns):
    advice = blank_collapse_advice(_config(500), step, {"eval/blank_frames": blank, "eval/empty": empty})
    assert (advice is not None) == warns
    if warns:
        assert advice.startswith(f"step {step}: the model predicts the blank on {100 * blank:.1f} % of eval frames")
        assert f"{step - 500} steps past the warm-up" in advice and "optim.learning_rate (0.5" in advice


def test_a_head_only_phase_is_part_of_the_warm_up():
    scores = {"eval/blank_frames": 1.0, "eval/empty": 1.0}
    assert blank_collapse_advice(_config(100, head_only=300), 400, scores) is None
    assert "1 steps past the warm-up" in blank_collapse_advice(_config(100, head_only=300), 401, scores)


@pytest.mark.slow  # trains
def test_a_run_collapsed_to_blanks_by_its_learning_rate_is_warned(cv_dir, tmp_path, caplog):
    """A learning rate of 0.5 drives the tiny model to blanks; its evaluation after the warm-up says so."""
    from xlsr_jax.recipe import train

    config = tiny_run_config(cv_dir, tmp_path, max_steps=6, eval_steps=6, save_steps=6)
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, learning_rate=0.5, warmup_steps=2))
    with caplog.at_level(logging.WARNING, logger="xlsr_jax.train.loop"):
        scores = train(config)
    assert scores["eval/blank_frames"] >= 0.98
    assert any("step 6: the model predicts the blank on" in r.message for r in caplog.records)
