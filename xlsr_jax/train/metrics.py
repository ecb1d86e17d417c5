"""Metrics out: one JSON object per line in metrics.jsonl, and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class MetricsWriter:
    """Writes `{"step": N, "train/loss": ...}` lines and TensorBoard scalars; a no-op when disabled
    (processes other than 0 in a multi-host run)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            output_dir = Path(output_dir)
            self._file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
            self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}, ensure_ascii=False) + "\n")
        self._file.flush()
        for key, value in clean.items():
            if isinstance(value, float) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
