"""`xlsr-jax sweep`: hyperparameter search over config keys, one trial after another, each trial a run
directory. A killed sweep resumes: the same command skips the trials that ended and continues the one
that was running, with the same parameters, from its checkpoints.

```
SWEEP/                     --sweep-dir, default <train.output_dir>-sweep
  sweep.json               the search space (and its sha256) and the base config; a rerun must match both
  trials.jsonl             per trial: its parameters (written before it starts), a pruning decision, its end
  optuna.db                method tpe: optuna's study (sqlite), loaded again by a rerun
  trial-NNN/               trial NNN's run directory (its train.output_dir), NNN from 000
  results.tsv              trial, state, metric, searched keys, steps, minutes, error
  sweep.png                the metric against each searched key
```

Pruning (`prune: true`) ends a trial after an evaluation whose metric is worse than the median of the
completed trials at the same step, once two trials have completed (optuna's MedianPruner for tpe, the
same rule by hand for grid and random). A trial's value is its last evaluation's metric.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from xlsr_jax.config import Config, to_dict
from xlsr_jax.errors import UserError
from xlsr_jax.plots import plot_sweep, read_curves
from xlsr_jax.rundir import RunDir, write_atomically
from xlsr_jax.recipe import train
from xlsr_jax.train.signature import differences
from xlsr_jax.sweep.space import Space, check_params, with_params

logger = logging.getLogger(__name__)

ENDED = ("complete", "pruned", "failed")


@dataclasses.dataclass
class TrialRecord:
    """A trial as trials.jsonl tells it; `state` is "running" until it ends (or while it is interrupted)."""

    number: int
    params: dict[str, Any]
    state: str = "running"
    value: float | None = None
    steps: int | None = None
    minutes: float | None = None
    error: str | None = None
    pruned_at: int | None = None  # the step at which the pruning rule ended it


@dataclasses.dataclass
class SweepResult:
    path: Path
    space: Space
    trials: list[TrialRecord]
    interrupted: int | None = None  # the trial a signal stopped (the sweep stopped with it)


class SweepDir:
    """The files of one sweep directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    meta = property(lambda self: self.path / "sweep.json")
    journal = property(lambda self: self.path / "trials.jsonl")
    optuna_db = property(lambda self: self.path / "optuna.db")
    results = property(lambda self: self.path / "results.tsv")
    plot = property(lambda self: self.path / "sweep.png")

    def trial_dir(self, number: int) -> Path:
        return self.path / f"trial-{number:03d}"

    def append(self, record: dict[str, Any]) -> None:
        """One line of trials.jsonl, on disk before this returns (a kill right after must not lose it)."""
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_trials(self) -> dict[int, TrialRecord]:
        """Every trial trials.jsonl names, later lines updating earlier ones; a line cut short by a kill is
        skipped (its trial then starts, or continues, as if it had not been written)."""
        trials: dict[int, TrialRecord] = {}
        if not self.journal.exists():
            return trials
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                number = int(record.pop("trial"))
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: skipped an unreadable line: %r", self.journal, line[:80])
                continue
            if "params" in record:
                trials.setdefault(number, TrialRecord(number, record["params"]))
            elif number in trials:
                for name, value in record.items():
                    setattr(trials[number], name, value)
        return trials

    def check_same_sweep(self, config: Config, space: Space, *, create: bool) -> None:
        """A rerun must search the same space from the same base config as the sweep it continues."""
        base = json.loads(json.dumps(_base_tree(config)))
        if self.meta.exists():
            saved = json.loads(self.meta.read_text(encoding="utf-8"))
            if saved["space_sha256"] != space.sha256:
                raise UserError(f"{self.path}: this sweep searched another space (sha256 {saved['space_sha256'][:12]}, "
                                f"now {space.sha256[:12]} from {space.source}); rerun it with the space it started "
                                f"with (kept in {self.meta}), or start a new sweep with another --sweep-dir")
            changed = differences(_flat(saved["config"]), _flat(base))
            if changed:
                raise UserError(f"{self.path}: this sweep's trials ran with another base config:\n  "
                                + "\n  ".join(changed) + "\nundo the change, or start a new sweep with another "
                                "--sweep-dir")
        elif create:
            self.path.mkdir(parents=True, exist_ok=True)
            meta = {"space_sha256": space.sha256, "space": space.tree, "config": base}
            write_atomically(self.meta, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
        else:
            raise UserError(f"{self.path}: no sweep here yet (no sweep.json); run with --trials N to start one")


def _base_tree(config: Config) -> dict[str, Any]:
    tree = to_dict(config)
    tree["train"].pop("output_dir")  # each trial sets its own
    return tree


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def planned_trials(space: Space, trials: int | None) -> int:
    """How many trials the sweep holds: `trials`, at most the grid's size; the whole grid by default."""
    if trials is not None and trials < 0:
        raise UserError(f"--trials must be >= 0, got {trials}")
    if space.method == "grid":
        size = space.grid_size()
        if trials is not None and trials > size:
            logger.info("%s: the grid has %d points: %d trials, not %d", space.source, size, size, trials)
        return size if trials is None else min(trials, size)
    if trials is None:
        raise UserError(f"{space.source}: method {space.method} needs --trials N (how many trials to run)")
    return trials


def run_sweep(config: Config, space: Space, *, sweep_dir: str | os.PathLike | None = None,
              trials: int | None = None) -> SweepResult:
    """Run (or continue) the sweep until it holds `trials` ended trials; `trials=0` only reports.

    Writes results.tsv and sweep.png after each trial. A trial stopped by SIGINT/SIGTERM stops the sweep
    (`interrupted`); rerunning the same command continues it.
    """
    sweep = SweepDir(sweep_dir or f"{config.train.output_dir}-sweep")
    total = planned_trials(space, trials)
    if total:
        check_params(config, space, total)  # every key and value, before any trial runs
    sweep.check_same_sweep(config, space, create=total > 0)
    records = sweep.read_trials()
    searcher = _OptunaSearch(space, sweep) if space.method == "tpe" and total else _FixedSearch(space, sweep)
    searcher.settle(records)
    interrupted = None
    for number in range(total):
        if number in records and records[number].state in ENDED:
            continue
        record = _run_trial(config, space, sweep, searcher, number, records)
        if record is None:
            interrupted = number
            break
        records[number] = record
        write_results(sweep, space, records)
    records = sweep.read_trials()  # with the trial a signal interrupted, if one did
    write_results(sweep, space, records)
    return SweepResult(sweep.path, space, [records[n] for n in sorted(records)], interrupted)


def _run_trial(config: Config, space: Space, sweep: SweepDir, searcher, number: int,
               records: dict[int, TrialRecord]) -> TrialRecord | None:
    """Train trial `number` (or continue it); its record, or None when a signal stopped it."""
    params = searcher.params(number)
    if number not in records:
        sweep.append({"trial": number, "params": params, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    run_dir = sweep.trial_dir(number)
    trial_config = with_params(config, {**params, "train.output_dir": str(run_dir)}, f"trial {number}")
    logger.info("sweep %s: trial %d: %s", sweep.path, number, ", ".join(f"{k}={v!r}" for k, v in params.items()))
    should_prune = searcher.pruning_rule(number, _completed_curves(sweep, space, records))

    def on_eval(step: int, scores) -> bool:
        value = float(scores[space.metric])
        if not (space.prune and should_prune(step, value)):
            return False
        sweep.append({"trial": number, "pruned_at": step, "value": value})
        logger.info("sweep: pruning trial %d at step %d (%s %.4f)", number, step, space.metric, value)
        return True

    began = time.monotonic()
    try:
        train(trial_config, on_eval=on_eval)
    except Exception as err:  # the sweep goes on; the traceback stays in the log
        logger.exception("sweep: trial %d failed", number)
        error = (f"{type(err).__name__}: {err}".splitlines() or [""])[0]
        record = TrialRecord(number, params, "failed", minutes=(time.monotonic() - began) / 60, error=error)
    else:
        run = RunDir(run_dir)
        if not run.finished.exists():  # train stopped on a signal, with a checkpoint: so does the sweep
            return None
        finished = json.loads(run.finished.read_text(encoding="utf-8"))
        journal = sweep.read_trials()[number]
        # Pruned if the run ended at the step the rule chose (not by train.early_stopping_patience).
        pruned = journal.pruned_at is not None and finished["metrics"].get("run/stopped_early") == journal.pruned_at
        value = run.last_eval().get(space.metric)
        record = TrialRecord(number, params, "pruned" if pruned else "complete",
                             value=None if value is None else float(value), steps=int(finished["step"]),
                             minutes=(time.monotonic() - began) / 60, pruned_at=journal.pruned_at if pruned else None)
    searcher.finish(record)
    sweep.append({"trial": number, **{k: v for k, v in dataclasses.asdict(record).items()
                                      if k not in ("number", "params")}})
    return record


def _completed_curves(sweep: SweepDir, space: Space, records: dict[int, TrialRecord]) -> list[dict[int, float]]:
    """{step: metric} of each completed trial: what the median rule compares against."""
    curves = []
    for record in records.values():
        metrics = RunDir(sweep.trial_dir(record.number)).metrics
        if record.state == "complete" and metrics.exists():
            curves.append(dict(read_curves(metrics, (space.metric,)).get(space.metric, [])))
    return curves


def median_rule(mode: str, completed: list[dict[int, float]], min_trials: int = 2) -> Callable[[int, float], bool]:
    """`prune(step, value)`: worse than the median of the completed trials' values at `step`, when at
    least `min_trials` of them were evaluated at that step."""
    def prune(step: int, value: float) -> bool:
        seen = [curve[step] for curve in completed if step in curve]
        if len(seen) < min_trials:
            return False
        median = statistics.median(seen)
        return value > median if mode == "min" else value < median
    return prune


class _FixedSearch:
    """grid and random: parameters are a pure function of (space, seed, trial number)."""

    def __init__(self, space: Space, sweep: SweepDir):
        self.space = space

    def settle(self, records: dict[int, TrialRecord]) -> None:
        pass

    def params(self, number: int) -> dict[str, Any]:
        return self.space.trial_params(number)

    def pruning_rule(self, number: int, completed: list[dict[int, float]]) -> Callable[[int, float], bool]:
        return median_rule(self.space.mode, completed)

    def finish(self, record: TrialRecord) -> None:
        pass


class _OptunaSearch:
    """tpe: optuna's TPE sampler and MedianPruner over a study kept in SWEEP/optuna.db. Optuna's trial
    numbers are the sweep's: trial N is the study's N-th trial."""

    def __init__(self, space: Space, sweep: SweepDir):
        try:
            import optuna
        except ImportError:
            raise UserError(f"{space.source}: method tpe needs optuna: pip install 'xlsr-jax[sweep]' "
                            "(or pip install optuna)") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.space = optuna, space
        self.study = optuna.create_study(
            storage=f"sqlite:///{sweep.optuna_db.absolute()}", study_name="sweep", load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            direction="minimize" if space.mode == "min" else "maximize")
        # The sampler's random state is not stored: seeded alike, a resumed sweep would draw its first
        # trials' values again. Seeded by the trials so far, it draws new ones, the same on every rerun.
        self.study.sampler = optuna.samplers.TPESampler(seed=space.seed + len(self.study.get_trials(deepcopy=False)))
        self._trials: dict[int, Any] = {}

    def settle(self, records: dict[int, TrialRecord]) -> None:
        """Tell optuna how trials ended that a kill kept it from hearing of."""
        for record in records.values():
            if record.state in ENDED:
                self.finish(record)

    def _trial(self, number: int):
        existing = self.study.get_trials(deepcopy=False)
        if number < len(existing):
            # The trial that was running when the sweep was killed goes on as the same optuna trial: its
            # parameters are read back (suggest returns the stored value) and its reports continue.
            return self.optuna.trial.Trial(self.study, existing[number]._trial_id)
        if number > len(existing):
            raise UserError(f"{self.space.source}: optuna's study holds {len(existing)} trials, "
                            f"but trials.jsonl goes on to trial {number}")
        trial = self.study.ask()
        assert trial.number == number, (trial.number, number)
        return trial

    def params(self, number: int) -> dict[str, Any]:
        trial = self._trials[number] = self._trial(number)
        return {p.key: _suggest(trial, p.key, p.kind, p.values) for p in self.space.params}

    def pruning_rule(self, number: int, completed: list[dict[int, float]]) -> Callable[[int, float], bool]:
        trial = self._trials[number]
        # A resumed trial may evaluate a step again; optuna keeps the first report of a step (and warns).
        reported = set(self.study.get_trials(deepcopy=False)[number].intermediate_values)

        def prune(step: int, value: float) -> bool:
            if step not in reported:
                trial.report(value, step)
            return trial.should_prune()
        return prune

    def finish(self, record: TrialRecord) -> None:
        state = self.optuna.trial.TrialState
        if record.state == "complete" and record.value is not None:
            self.study.tell(record.number, record.value, skip_if_finished=True)
        elif record.state == "pruned":
            self.study.tell(record.number, state=state.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(record.number, state=state.FAIL, skip_if_finished=True)


def _suggest(trial, key: str, kind: str, values: tuple) -> Any:
    if kind == "choice":
        return trial.suggest_categorical(key, list(values))
    if kind == "int":
        return trial.suggest_int(key, *values)
    return trial.suggest_float(key, *values, log=kind == "log_uniform")


# --- results -------------------------------------------------------------------------------------------


def _rows(space: Space, records: dict[int, TrialRecord]) -> list[list[str]]:
    header = ["trial", "state", space.metric, *space.keys, "steps", "minutes", "error"]
    rows = [header]
    for n in sorted(records):
        r = records[n]
        rows.append([f"{n:03d}", r.state, _show(r.value), *(_show(r.params.get(k)) for k in space.keys),
                     _show(r.steps), "" if r.minutes is None else f"{r.minutes:.2f}", r.error or ""])
    return rows


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_results(sweep: SweepDir, space: Space, records: dict[int, TrialRecord]) -> None:
    """results.tsv (one row per trial) and sweep.png (the metric against each searched key)."""
    if not sweep.path.is_dir():
        return
    text = "".join("\t".join(cell.replace("\t", " ") for cell in row) + "\n" for row in _rows(space, records))
    write_atomically(sweep.results, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    points = [(r.params, r.value, r.state) for r in records.values() if r.value is not None]
    log_keys = {p.key for p in space.params if p.kind == "log_uniform"}
    write_atomically(sweep.plot, lambda tmp: plot_sweep(points, space.keys, space.metric, log_keys, tmp))


def best_trial(result: SweepResult) -> TrialRecord | None:
    """The completed trial with the best metric (ties: the earlier trial)."""
    done = [r for r in result.trials if r.state == "complete" and r.value is not None]
    sign = 1 if result.space.mode == "min" else -1
    return min(done, key=lambda r: (sign * r.value, r.number)) if done else None


def format_results(result: SweepResult) -> str:
    """The results table, the best trial and where the files are."""
    rows = _rows(result.space, {r.number: r for r in result.trials})
    if not any(row[-1] for row in rows[1:]):
        rows = [row[:-1] for row in rows]  # no failed trial: no error column
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    best = best_trial(result)
    if best is not None:
        lines.append(f"best: trial {best.number:03d}, {result.space.metric} {best.value:.6g} "
                     f"({', '.join(f'{k}={_show(v)}' for k, v in best.params.items())}): "
                     f"{SweepDir(result.path).trial_dir(best.number)}")
    if result.interrupted is not None:
        lines.append(f"stopped during trial {result.interrupted:03d} (signal); rerun the same command to continue it")
    sweep = SweepDir(result.path)
    lines.append(f"results: {sweep.results}  plot: {sweep.plot}")
    return "\n".join(lines)
