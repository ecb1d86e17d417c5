"""Training curves: metrics.jsonl (resumed runs included) -> points -> PNG."""

from __future__ import annotations

import json

from xlsr_jax.plots import plot_training_curves, read_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_png_is_written_for_a_run(tmp_path):
    records = [{"step": s, "train/loss": 10.0 / s, "train/learning_rate": 1e-4} for s in range(20, 220, 20)]
    records += [{"step": 100, "eval/loss": 3.0, "eval/wer": 0.95, "eval/cer": 0.4},
                {"step": 200, "eval/loss": 2.0, "eval/wer": 0.88, "eval/cer": 0.29}]
    metrics = _write_lines(tmp_path / "metrics.jsonl", records)

    out = plot_training_curves(metrics, tmp_path / "plots" / "training_curves.png")

    assert out == tmp_path / "plots" / "training_curves.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    # 11x4 in at 100 dpi: the IHDR chunk holds width and height, big-endian, at bytes 16..24.
    assert int.from_bytes(data[16:20], "big") == 1100
    assert int.from_bytes(data[20:24], "big") == 400
    assert 10_000 < len(data) < 1_000_000


def test_nothing_to_plot_gives_none_and_no_file(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    only_lr = _write_lines(tmp_path / "lr.jsonl", [{"step": 1, "train/learning_rate": 1e-4}])

    assert plot_training_curves(empty, tmp_path / "a.png") is None
    assert plot_training_curves(only_lr, tmp_path / "b.png") is None
    assert plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.jsonl", "metrics.jsonl"]


def test_resumed_run_later_lines_win(tmp_path):
    # Run 1 logged steps 1-4 (and evaluated at 4), died; run 2 resumed from the step-2 checkpoint.
    records = [
        {"step": 1, "train/loss": 9.0}, {"step": 2, "train/loss": 8.0},
        {"step": 3, "train/loss": 7.0}, {"step": 4, "train/loss": 6.0},
        {"step": 4, "eval/loss": 5.5, "eval/wer": 0.9},
        {"step": 3, "train/loss": 7.5}, {"step": 4, "train/loss": 6.5},
        {"step": 5, "train/loss": 5.0}, {"step": 5, "eval/wer": 0.8, "eval/cer": 0.3},
    ]
    curves = read_curves(_write_lines(tmp_path / "metrics.jsonl", records))

    assert curves["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.5), (4, 6.5), (5, 5.0)]
    # The abandoned run's step-4 evaluation is gone: the resumed run never made it.
    assert curves["eval/wer"] == [(5, 0.8)]
    assert curves["eval/cer"] == [(5, 0.3)]
    assert "eval/loss" not in curves


def test_same_step_lines_merge_and_truncated_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 10, "train/loss": 4.0}) + "\n"
        + json.dumps({"step": 10, "eval/loss": 3.0, "eval/wer": 0.5}) + "\n"
        + '{"step": 20, "train/lo'  # the process died mid-write
    )
    curves = read_curves(path)

    assert curves == {"train/loss": [(10, 4.0)], "eval/loss": [(10, 3.0)], "eval/wer": [(10, 0.5)]}
