"""Metrics out: one JSON object per line in metrics.jsonl, and TensorBoard event files.

A resumed run continues the same files. It first cuts metrics.jsonl back to the step it resumes from
(`keep_metrics_through`): the lines a killed run logged after its last checkpoint are trained again, and
curves would otherwise hold each of those steps twice. TensorBoard gets the same cut as a purge step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from xlsr_jax.rundir import RunDir, as_path, read_metrics, write_atomically


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def keep_metrics_through(path: str | Path, step: int) -> int:
    """Rewrite metrics.jsonl (atomically) without the records after `step` and without unreadable lines
    (a process killed mid-write); returns how many records were dropped. No file: nothing to do."""
    path = as_path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= step]

    def save(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_line(r) for r in kept)

    write_atomically(path, save)
    return len(records) - len(kept)


class MetricsWriter:
    """Writes `{"step": N, "train/loss": ...}` lines and TensorBoard scalars; a no-op when disabled
    (processes other than 0 in a multi-host run).

    Lines are appended to a local file; on a URL (gs://...), where objects cannot be appended to, the
    whole file is rewritten at each write (a few hundred lines in a run). TensorBoard drops the events
    of earlier sessions at or after the step after metrics.jsonl's last record: what a resume cut away.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._file = self._lines = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            run = RunDir(output_dir)
            self._path = run.metrics
            earlier = read_metrics(self._path) if self._path.exists() else []
            if isinstance(self._path, Path):
                self._file = open(self._path, "a", encoding="utf-8")
            else:
                self._lines = [_line(r) for r in earlier]
            purge_step = max(r["step"] for r in earlier) + 1 if earlier else 0
            self._tb = SummaryWriter(str(run.tensorboard), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        line = _line({"step": int(step), **clean})
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._path.write_text("".join(self._lines), encoding="utf-8")
        for key, value in clean.items():
            if isinstance(value, float) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
            self._tb.close()


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
