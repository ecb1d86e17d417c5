"""`xlsr-jax sweep`: search spaces, trial parameters, pruning, failures, resuming (grid, random, tpe), and
a 2-trial sweep of the tiny model killed with SIGKILL mid-trial and continued by the same command.

Most tests stand a scripted trainer in for `train` (same run-directory contract: metrics.jsonl,
finished.json, "already finished" on a rerun) so that the sweep's own logic is checked in seconds; the
kill test trains for real in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _runs import tiny_run_config
from xlsr_jax import cli
from xlsr_jax.config import ConfigError, load_config, save_config
from xlsr_jax.errors import UserError
from xlsr_jax.rundir import RunDir
from xlsr_jax.sweep import search as sweep_module
from xlsr_jax.train.summary import write_finished
from xlsr_jax.sweep.search import SweepDir, format_results, median_rule, run_sweep
from xlsr_jax.sweep.space import SpaceError, check_params, load_space

PNG = b"\x89PNG\r\n\x1a\n"


def _space(tmp_path, name: str = "space.yaml", **tree) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


class ScriptedTrain:
    """Stands in for `train.loop.train`: evaluates at steps 2 and 4 with `score(config, step)` as every
    eval metric, writing metrics.jsonl and asking `on_eval` as the loop does, then finished.json. A run
    dir named in `interrupt` stops after its first evaluation without finished.json, as a SIGTERM
    leaves a run (once). `score` may raise, as a failing run does."""

    def __init__(self, score, interrupt=()):
        self.score, self.interrupt, self.calls = score, set(interrupt), []

    def __call__(self, config, *, on_eval=None):
        run = RunDir(config.train.output_dir)
        self.calls.append((run.path.name, config.optim.learning_rate))
        if run.finished.exists():
            return {**json.loads(run.finished.read_text())["metrics"], "run/already_finished": 1.0}
        run.path.mkdir(parents=True, exist_ok=True)
        last = {}
        for step in (2, 4):
            value = float(self.score(config, step))
            last = {"eval/loss": value, "eval/wer": value, "eval/cer": value}
            with run.metrics.open("a") as f:
                f.write(json.dumps({"step": step, **last}) + "\n")
            if on_eval(step, last):
                last["run/stopped_early"] = float(step)
                break
            if run.path.name in self.interrupt:
                self.interrupt.discard(run.path.name)
                return last
        write_finished(run, config, step, 4, last, best_step=None)
        return last


@pytest.fixture
def base(cv_dir, tmp_path):
    return tiny_run_config(cv_dir, tmp_path, max_steps=4, eval_steps=2)


def _rows(path: Path) -> list[dict[str, str]]:
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(header, row)) for row in rows]


# --- the space -----------------------------------------------------------------------------------------


def test_grid_and_random_params_are_a_pure_function_of_space_seed_and_number(tmp_path):
    grid = load_space(_space(tmp_path, "grid.yaml", method="grid", params={
        "optim.learning_rate": {"choice": [1e-3, 3e-4]}, "model.layerdrop": {"choice": [0.0, 0.05, 0.1]}}))
    assert grid.grid_size() == 6
    assert [grid.trial_params(n) for n in (0, 1, 3, 5)] == [
        {"optim.learning_rate": 1e-3, "model.layerdrop": 0.0}, {"optim.learning_rate": 1e-3, "model.layerdrop": 0.05},
        {"optim.learning_rate": 3e-4, "model.layerdrop": 0.0}, {"optim.learning_rate": 3e-4, "model.layerdrop": 0.1}]
    params = {"optim.learning_rate": {"log_uniform": [1e-4, 1e-2]}, "model.mask_time_prob": {"uniform": [0.0, 0.1]},
              "model.mask_time_length": {"int": [2, 4]}, "model.layerdrop": {"choice": [0.0, 0.1]}}
    space = load_space(_space(tmp_path, "r.yaml", method="random", seed=7, params=params))
    drawn = [space.trial_params(n) for n in range(40)]
    again = load_space(_space(tmp_path, "r2.yaml", method="random", seed=7, params=params))
    assert [again.trial_params(n) for n in reversed(range(40))] == drawn[::-1]  # no order dependence
    other = load_space(_space(tmp_path, "r3.yaml", method="random", seed=8, params=params))
    assert other.trial_params(0) != drawn[0]
    lrs = [d["optim.learning_rate"] for d in drawn]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and min(lrs) < 1e-3 < max(lrs)  # spread over decades
    assert {d["model.mask_time_length"] for d in drawn} == {2, 3, 4}  # int bounds inclusive
    assert {d["model.layerdrop"] for d in drawn} == {0.0, 0.1}
    assert all(0.0 <= d["model.mask_time_prob"] <= 0.1 for d in drawn)


def test_the_shipped_demo_space_fits_the_demo_config():
    root = Path(__file__).resolve().parent.parent
    space = load_space(root / "configs" / "sweep_demo.yaml")
    assert space.params[0].values == (3e-4, 3e-3)  # `3e-4`: a string to PyYAML, a float here
    check_params(load_config(root / "configs" / "demo.yaml"), space, trials=8)
    assert (space.method, space.metric, space.keys) == (
        "random", "eval/cer", ["optim.learning_rate", "model.mask_time_prob", "model.layerdrop"])


@pytest.mark.parametrize("tree, message", [
    ({"method": "grid", "params": {"optim.learning_rate": {"uniform": [1e-4, 1e-3]}}},
     r"params.optim.learning_rate method grid takes \{choice: \[...\]\} only, got uniform"),
    ({"method": "random", "params": {"optim.learning_rate": {"log_uniform": [0, 1e-3]}}},
     r"params.optim.learning_rate log_uniform needs lo > 0"),
    ({"method": "random", "params": {"model.layerdrop": {"beta": [1, 2]}}}, r"params.model.layerdrop must be one of"),
    ({"method": "random", "metric": "eval/acc", "params": {"model.layerdrop": {"choice": [0.1]}}},
     r"metric must be one of eval/wer, eval/cer, eval/loss"),
    ({"method": "random", "prams": {}}, r"unknown key prams; did you mean 'params'\?"),
    ({"method": "tpe", "params": {"data.train": {"choice": [["cv:a"], ["cv:b"]]}}},
     r"params.data.train method tpe takes numbers, strings, booleans or null as choices"),
])
def test_a_bad_space_file_names_the_file_and_the_key(tmp_path, tree, message):
    path = _space(tmp_path, **tree)
    with pytest.raises(SpaceError, match=f"{path}: {message}"):
        load_space(path)


def test_unknown_or_bad_config_keys_fail_before_any_trial(base, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("a trial ran"))
    typo = load_space(_space(tmp_path, method="random", params={"model.mask_tim_prob": {"uniform": [0, 0.1]}}))
    with pytest.raises(ConfigError, match=r"params.model.mask_tim_prob=0.0: unknown key model.mask_tim_prob; "
                                          r"did you mean 'mask_time_prob'\?"):
        run_sweep(base, typo, sweep_dir=tmp_path / "sweep", trials=3)
    # every grid point is checked up front: the third trial's layerdrop is out of range
    bad = load_space(_space(tmp_path, "b.yaml", method="grid", params={"model.layerdrop": {"choice": [0.0, 0.5, 1.5]}}))
    with pytest.raises(ConfigError, match=r"params.model.layerdrop=1.5: model.layerdrop must be in \[0, 1\]"):
        run_sweep(base, bad, sweep_dir=tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_median_rule_prunes_worse_than_the_median_of_completed_trials_at_that_step():
    completed = [{2: 0.5, 4: 0.3}, {2: 0.7, 4: 0.4}, {2: 0.9}]
    prune = median_rule("min", completed)
    assert prune(2, 0.71) and not prune(2, 0.7)  # median of 0.5, 0.7, 0.9 is 0.7
    assert prune(4, 0.36) and not prune(4, 0.35)  # two trials reached step 4: median 0.35
    assert not prune(6, 99.0)  # no completed trial evaluated step 6
    assert not median_rule("min", completed[:1])(2, 99.0)  # one completed trial: too few to judge
    assert median_rule("max", completed)(2, 0.69) and not median_rule("max", completed)(2, 0.7)


# --- running trials (scripted trainer) -----------------------------------------------------------------


def test_grid_sweep_prunes_a_bad_trial_records_a_failed_one_and_goes_on(base, tmp_path, monkeypatch):
    def score(config, step):
        lr = config.optim.learning_rate
        if lr == 5e-4:
            raise RuntimeError("device out of memory\nsecond line")
        return lr * 1000 / step  # lr 1e-3 -> 0.5, 0.25; lr 2e-3 -> 1.0, 0.5; lr 9e-3 -> 4.5 at step 2

    scripted = ScriptedTrain(score)
    monkeypatch.setattr(sweep_module, "train", scripted)
    space = load_space(_space(tmp_path, method="grid", metric="eval/cer", prune=True, params={
        "optim.learning_rate": {"choice": [1e-3, 2e-3, 5e-4, 9e-3]}}))
    result = run_sweep(base, space, sweep_dir=tmp_path / "sweep")
    assert [(t.number, t.state, t.value, t.steps) for t in result.trials] == [
        (0, "complete", 0.25, 4), (1, "complete", 0.5, 4), (2, "failed", None, None), (3, "pruned", 4.5, 2)]
    assert result.trials[2].error == "RuntimeError: device out of memory"
    rows = _rows(tmp_path / "sweep" / "results.tsv")
    assert [(r["trial"], r["state"], r["eval/cer"], r["optim.learning_rate"], r["steps"]) for r in rows] == [
        ("000", "complete", "0.25", "0.001", "4"), ("001", "complete", "0.5", "0.002", "4"),
        ("002", "failed", "", "0.0005", ""), ("003", "pruned", "4.5", "0.009", "2")]
    assert rows[2]["error"] == "RuntimeError: device out of memory"
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == PNG
    text = format_results(result)
    assert "best: trial 000, eval/cer 0.25 (optim.learning_rate=0.001)" in text
    # Rerun: every trial has ended, none trains again; the report is the same.
    scripted.calls.clear()
    again = run_sweep(base, space, sweep_dir=tmp_path / "sweep", trials=0)
    assert scripted.calls == [] and format_results(again) == text


def test_without_prune_a_bad_trial_completes(base, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_module, "train", ScriptedTrain(lambda c, step: c.optim.learning_rate * 1000 / step))
    space = load_space(_space(tmp_path, method="grid", params={"optim.learning_rate": {"choice": [1e-3, 2e-3, 9e-3]}}))
    result = run_sweep(base, space, sweep_dir=tmp_path / "sweep")
    assert [t.state for t in result.trials] == ["complete"] * 3 and result.trials[2].value == 2.25


def test_an_interrupted_trial_continues_with_its_params_and_a_changed_space_is_refused(base, tmp_path, monkeypatch):
    scripted = ScriptedTrain(lambda c, step: c.optim.learning_rate, interrupt={"trial-001"})
    monkeypatch.setattr(sweep_module, "train", scripted)
    space_file = _space(tmp_path, method="random", seed=3,
                        params={"optim.learning_rate": {"log_uniform": [1e-4, 1e-2]}})
    space, sweep_dir = load_space(space_file), tmp_path / "run-sweep"
    first = run_sweep(base, space, sweep_dir=sweep_dir, trials=3)
    assert first.interrupted == 1 and [t.state for t in first.trials] == ["complete", "running"]
    assert "stopped during trial 001 (signal); rerun the same command to continue it" in format_results(first)
    second = run_sweep(base, space, sweep_dir=sweep_dir, trials=3)
    assert second.interrupted is None and [t.state for t in second.trials] == ["complete"] * 3
    lr = [space.trial_params(n)["optim.learning_rate"] for n in range(3)]
    assert scripted.calls == [("trial-000", lr[0]), ("trial-001", lr[1]), ("trial-001", lr[1]), ("trial-002", lr[2])]
    starts = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert [s["trial"] for s in starts if "params" in s] == [0, 1, 2]  # trial 1's params written once
    # The default sweep dir is <train.output_dir>-sweep.
    assert Path(base.train.output_dir + "-sweep") == sweep_dir
    assert run_sweep(base, space, trials=0).trials == second.trials

    space_file.write_text(space_file.read_text().replace("0.01", "0.02"))
    with pytest.raises(UserError, match=r"run-sweep: this sweep searched another space \(sha256 [0-9a-f]{12}, now"):
        run_sweep(base, load_space(space_file), sweep_dir=sweep_dir, trials=4)
    changed = dataclasses.replace(base, optim=dataclasses.replace(base.optim, warmup_steps=3))
    with pytest.raises(UserError, match=r"another base config:\n  optim.warmup_steps: 2 -> 3"):
        run_sweep(changed, space, sweep_dir=sweep_dir, trials=4)


def test_cli_report_only(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_module, "train", ScriptedTrain(lambda c, step: c.optim.learning_rate))
    space_file = _space(tmp_path, method="grid", metric="eval/loss",
                        params={"optim.learning_rate": {"choice": [1e-3, 3e-3]}})
    config_file = tmp_path / "base.yaml"
    save_config(base, config_file)
    args = ["sweep", "--config", str(config_file), "--space", str(space_file), "--sweep-dir", str(tmp_path / "s")]
    assert cli.main(args + ["--trials", "0"]) == 2
    assert "no sweep here yet (no sweep.json); run with --trials N" in capsys.readouterr().err
    assert cli.main(args) == 0
    ran = capsys.readouterr().out
    assert cli.main(args + ["--trials", "0"]) == 0
    report = capsys.readouterr().out
    assert report == ran  # the same table, nothing trained again
    header, first, second = report.splitlines()[:3]
    assert header.split() == ["trial", "state", "eval/loss", "optim.learning_rate", "steps", "minutes"]
    assert first.split()[:5] == ["000", "complete", "0.001", "0.001", "4"]
    assert second.split()[:5] == ["001", "complete", "0.003", "0.003", "4"]


# --- tpe -----------------------------------------------------------------------------------------------


def test_tpe_without_optuna_says_how_to_install_it(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    space = load_space(_space(tmp_path, method="tpe", params={"optim.learning_rate": {"log_uniform": [1e-4, 1e-2]}}))
    with pytest.raises(UserError, match=r"method tpe needs optuna: pip install 'xlsr-jax\[sweep\]'"):
        run_sweep(base, space, sweep_dir=tmp_path / "s", trials=2)


def test_tpe_prunes_with_optuna_and_resumes_an_interrupted_trial_unchanged(base, tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna", reason="method tpe needs optuna (pip install 'xlsr-jax[sweep]')")

    def score(config, step):  # trial 3 is far worse than the others at step 2
        return 50.0 if config.train.output_dir.endswith("trial-003") else config.optim.learning_rate * 100 / step

    scripted = ScriptedTrain(score, interrupt={"trial-002"})
    monkeypatch.setattr(sweep_module, "train", scripted)
    space = load_space(_space(tmp_path, method="tpe", metric="eval/wer", prune=True, seed=1, params={
        "optim.learning_rate": {"log_uniform": [1e-4, 1e-2]}, "model.layerdrop": {"choice": [0.0, 0.1]}}))
    sweep_dir = tmp_path / "s"
    first = run_sweep(base, space, sweep_dir=sweep_dir, trials=4)
    assert first.interrupted == 2
    second = run_sweep(base, space, sweep_dir=sweep_dir, trials=4)  # a new study object, as a new process has
    assert [t.state for t in second.trials] == ["complete", "complete", "complete", "pruned"]
    assert second.trials[3].value == 50.0 and second.trials[3].steps == 2
    assert [name for name, _ in scripted.calls] == ["trial-000", "trial-001", "trial-002", "trial-002", "trial-003"]
    assert scripted.calls[2] == scripted.calls[3]  # the same learning rate after the interruption

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    frozen = study.get_trials()
    assert [t.state.name for t in frozen] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]  # no re-sampled trial
    assert [t.params for t in frozen] == [t.params for t in second.trials]
    assert [t.value for t in frozen[:3]] == pytest.approx([t.value for t in second.trials[:3]])
    lrs = [t.params["optim.learning_rate"] for t in frozen]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 4  # the rerun drew new values


# --- the tiny model, killed mid-sweep ------------------------------------------------------------------


def _sweep_process(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA_FLAGS, HOME and its compilation cache: conftest's
    return subprocess.Popen([sys.executable, "-m", "xlsr_jax.cli", "sweep", *args], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two trainings in a subprocess, twice
def test_a_two_trial_sweep_killed_mid_trial_continues_and_writes_its_table_and_plot(cv_dir, tmp_path):
    # The seed is searched, not a learning rate: it is not a constant in the compiled steps, so every trial
    # and the rerun load them from the test run's compilation cache (any tiny run's; a learning rate per trial
    # compiled both steps of each trial again). The sweep's machinery is the same whatever a trial searches.
    config = tiny_run_config(cv_dir, tmp_path, max_steps=4, eval_steps=2, save_steps=2)
    save_config(config, tmp_path / "base.yaml")
    space_file = _space(tmp_path, method="random", metric="eval/cer", seed=3, params={
        "train.seed": {"int": [0, 1000]}})
    sweep_dir, log = tmp_path / "sweep", tmp_path / "sweep.log"
    args = ["--config", str(tmp_path / "base.yaml"), "--space", str(space_file), "--trials", "2",
            "--sweep-dir", str(sweep_dir)]
    second = sweep_dir / "trial-001" / "checkpoints" / "2"

    process, deadline = _sweep_process(args, log), time.monotonic() + 600
    while process.poll() is None and not second.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (sweep_dir / "trial-001" / "finished.json").exists()
    first_metrics = (sweep_dir / "trial-000" / "metrics.jsonl").read_bytes()

    log.write_text("")
    assert _sweep_process(args, log).wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"restoring checkpoint {sweep_dir}/trial-001/checkpoints/2" in text, text[-3000:]
    assert "trial 0:" not in text  # trial 0 was not trained again
    assert (sweep_dir / "trial-000" / "metrics.jsonl").read_bytes() == first_metrics
    space = load_space(space_file)
    journal = SweepDir(sweep_dir).read_trials()
    assert [journal[n].params for n in (0, 1)] == [space.trial_params(n) for n in (0, 1)]
    assert journal[0].params != journal[1].params
    rows = _rows(sweep_dir / "results.tsv")
    assert [(r["trial"], r["state"], r["steps"]) for r in rows] == [("000", "complete", "4"), ("001", "complete", "4")]
    for n, row in enumerate(rows):
        run = RunDir(sweep_dir / f"trial-{n:03d}")
        assert float(row["eval/cer"]) == pytest.approx(run.last_eval()["eval/cer"], rel=1e-5)
        seed = space.trial_params(n)["train.seed"]
        assert int(row["train.seed"]) == seed == yaml.safe_load((run.path / "config.yaml").read_text())["train"]["seed"]
        assert [r["step"] for r in run.read_metrics() if "eval/cer" in r] == [2, 4]  # step 4 evaluated once
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == PNG
    assert "best: trial 00" in text and f"results: {sweep_dir / 'results.tsv'}" in text
