"""The end of a run: `finished.json` (so a rerun says "already finished" instead of starting two
empty progress bars) and the one summary a finished run prints."""

from __future__ import annotations

import json
from typing import Any

from xlsr_jax.config import Config
from xlsr_jax.rundir import RunDir


def _budget(config: Config) -> dict[str, float]:
    return {"max_steps": config.train.max_steps, "num_train_epochs": config.train.num_train_epochs}


def write_finished(run: RunDir, config: Config, step: int, total: int, metrics: dict[str, Any],
                   best_step: int | None) -> None:
    plain = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    record = {"step": step, "total_steps": total, **_budget(config), "metrics": plain, "best_step": best_step,
              "best_metric": config.checkpoint.best_metric}
    run.finished.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_finished(run: RunDir, config: Config) -> dict[str, Any] | None:
    """The record of a finished run with the same step budget and its final checkpoint still there;
    None when there is training left to do (a new budget, a fresh run, a missing checkpoint)."""
    if not config.checkpoint.resume or not run.finished.exists():
        return None
    record = json.loads(run.finished.read_text(encoding="utf-8"))
    same_budget = all(record.get(k) == v for k, v in _budget(config).items())
    if not same_budget or not (run.checkpoints / str(record["step"])).is_dir():
        return None
    return record


def format_run_summary(run: RunDir) -> str:
    """Final eval metrics and where the checkpoints, hf_model/ and curves are."""
    record = json.loads(run.finished.read_text(encoding="utf-8")) if run.finished.exists() else {}
    lines = [f"run: {run.path} finished at step {record.get('step', '?')} of {record.get('total_steps', '?')}"]
    last = run.last_eval()
    if last:
        lines.append(f"last evaluation (step {last['step']}): loss {last.get('eval/loss', float('nan')):.3f}, "
                     f"WER {100 * last.get('eval/wer', float('nan')):.2f} %, "
                     f"CER {100 * last.get('eval/cer', float('nan')):.2f} % on {int(last.get('eval/examples', 0))} "
                     "utterances")
    steps = sorted(int(p.name) for p in run.checkpoints.iterdir() if p.name.isdigit()) \
        if run.checkpoints.is_dir() else []
    best = f"; best by {record['best_metric']}: step {record['best_step']}" \
        if record.get("best_step") is not None else ""
    lines.append(f"checkpoints: {run.checkpoints} (steps {', '.join(map(str, steps)) or 'none'}{best})")
    if run.hf_model.is_dir():
        lines.append(f"Hugging Face model: {run.hf_model}")
    if run.curves.exists():
        lines.append(f"training curves: {run.curves}")
    lines.append(f"next: xlsr-jax evaluate {run.path} --data SPEC  (e.g. a test split), then "
                 f"xlsr-jax export {run.path} OUT_DIR and xlsr-jax push OUT_DIR --repo-id USER/NAME")
    return "\n".join(lines)
