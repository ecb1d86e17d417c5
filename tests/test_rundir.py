"""The run directory: URLs kept as URLs, starting over deletes only the run's own files, whole-file
writes, and metrics.jsonl cut back to the step a run resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xlsr_jax.rundir import RunDir, as_path, read_metrics, write_atomically
from xlsr_jax.train.metrics import MetricsWriter, keep_metrics_through


def test_a_bucket_url_stays_a_url_and_a_local_path_stays_pathlib():
    run = RunDir("gs://bucket/runs/tr")
    assert str(run.path) == "gs://bucket/runs/tr"
    assert [str(p) for p in (run.checkpoints, run.metrics)] == ["gs://bucket/runs/tr/checkpoints",
                                                                 "gs://bucket/runs/tr/metrics.jsonl"]
    assert str(Path("gs://bucket/runs/tr")) == "gs:/bucket/runs/tr", "what pathlib alone would hand orbax"
    assert type(as_path("runs/tr")) is type(Path("runs/tr")) and RunDir("runs/tr").vocab == Path("runs/tr/vocab.json")


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what must come out of a refusal unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_clear_deletes_the_run_files_and_nothing_else(tmp_path):
    run = RunDir(tmp_path)
    for path in (run.config, run.vocab, run.metrics, run.finished, run.signature, run.eval_results):
        path.write_text("{}")
    for folder in (run.checkpoints / "4", run.checkpoints / "6.orbax-checkpoint-tmp-1733500000",
                   run.checkpoints / "2.damaged", run.checkpoints / "2.damaged-2", run.hf_model,
                   run.path / "tensorboard"):
        folder.mkdir(parents=True)
        (folder / "x").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "cache").mkdir()
    (run.checkpoints / "README.txt").write_text("my notes on these checkpoints")
    (run.checkpoints / "4-best").mkdir()  # a user's copy: not a step folder
    deleted, kept = run.clear()
    assert {"config.yaml", "vocab.json", "metrics.jsonl", "checkpoints/4", "checkpoints/2.damaged",
            "checkpoints/2.damaged-2", "checkpoints/6.orbax-checkpoint-tmp-1733500000", "hf_model",
            "run_signature.json", "finished.json", "eval_results.json"} <= set(deleted)
    assert kept == ["cache", "checkpoints/4-best", "checkpoints/README.txt", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "checkpoints", "notes.txt"]
    assert (run.checkpoints / "README.txt").read_text() == "my notes on these checkpoints"
    # checkpoints/ holding nothing of the user's goes with the run.
    (run.checkpoints / "README.txt").unlink()
    (run.checkpoints / "4-best").rmdir()
    (run.checkpoints / "8").mkdir()
    assert run.clear() == (["checkpoints/8"], ["cache", "notes.txt"])
    assert not run.checkpoints.exists()


def test_a_folder_is_a_run_by_its_signature_or_the_config_a_run_wrote(tmp_path):
    from xlsr_jax.config import Config, save_config
    from xlsr_jax.data.report import write_report
    from xlsr_jax.rundir import CONFIG_MARK

    run = RunDir(tmp_path / "run")
    assert run.foreign_files() == []  # no folder yet
    run.path.mkdir()
    (run.path / "notes.txt").write_text("mine")
    write_report(run.data_report, [])  # what a start that stopped at its data leaves: still ours
    assert (run.is_ours(), run.foreign_files()) == (False, [])
    save_config(Config(), run.config)  # a config.yaml not written by a run (the user's own, say)
    (run.path / "eval_results.json").write_text('{"results": []}')
    assert (run.is_ours(), run.foreign_files()) == (False, ["config.yaml", "eval_results.json"])
    run.data_report.write_text("my own table\n")
    assert run.foreign_files() == ["config.yaml", "data_report.tsv", "eval_results.json"]
    save_config(Config(), run.config, header=CONFIG_MARK)  # as train() writes it
    assert run.config.read_text().startswith(CONFIG_MARK + "\n") and run.is_ours() and run.foreign_files() == []
    run.config.unlink()
    run.signature.write_text("{}")  # a run from before the mark: its signature says it is one
    assert run.is_ours() and run.foreign_files() == []


def test_write_atomically_leaves_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "vocab.json"
    target.write_text("old")

    def dies(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, dies)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["vocab.json"]
    write_atomically(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["vocab.json"]


def test_resuming_cuts_metrics_back_to_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 4, "eval/wer": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "train/lo')  # killed mid-line
    assert keep_metrics_through(path, 2) == 3
    assert read_metrics(path) == lines[:2]
    writer = MetricsWriter(tmp_path)  # what the resumed run appends
    writer.write(3, {"train/loss": 0.25})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert keep_metrics_through(path, 0) == 3 and path.read_text() == "", "a fresh run keeps no old records"
    assert keep_metrics_through(tmp_path / "absent.jsonl", 3) == 0
