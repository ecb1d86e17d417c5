"""Ending a run before its last step on what evaluation says: early stopping with patience, and a
caller's own rule (the sweep prunes bad trials with it)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

from xlsr_jax.checkpoint import Checkpointer

# (step, eval metrics) -> True to end the run after this evaluation (its state is saved and exported).
EvalCallback = Callable[[int, Mapping[str, float]], bool]


@dataclasses.dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without a better `metric` (`mode` min or max)."""

    metric: str
    mode: str
    patience: int
    best: float = math.nan
    since_best: int = 0

    def update(self, scores: Mapping[str, float]) -> bool:
        """Record one evaluation; True when the run should end."""
        value = float(scores[self.metric])
        better = math.isnan(self.best) or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def state(self) -> dict[str, float]:
        """What a resume needs, saved with each evaluated checkpoint's metrics."""
        return {"early_stopping/best": self.best, "early_stopping/since_best": float(self.since_best)}

    @classmethod
    def resumed(cls, metric: str, mode: str, patience: int, checkpoints: Checkpointer,
                start: int) -> "EarlyStopping":
        """The state a run had at `start`: from the newest kept checkpoint at or before it that was saved
        after an evaluation (with keep-best, every evaluation saves one), which every host reads alike."""
        stopping = cls(metric, mode, patience)
        for step in reversed([s for s in checkpoints.all_steps() if s <= start]):
            saved = checkpoints.metrics(step) or {}
            if "early_stopping/since_best" in saved:
                stopping.best = float(saved["early_stopping/best"])
                stopping.since_best = int(saved["early_stopping/since_best"])
                break
        return stopping
