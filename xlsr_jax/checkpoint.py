"""Orbax checkpoints of any pytree: the newest K, plus the best by an eval metric, restored already
sharded.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run that dies
mid-save leaves the previous checkpoint intact and never restores a partial one. Keeping the best
checkpoint is orbax's own preservation policy (`BestN` beside `LatestN`); the metrics it ranks by are
stored inside each checkpoint, so `best_step()` works on a finished run's folder as well.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from xlsr_jax.errors import UserError

logger = logging.getLogger(__name__)


class _ReadOnlyNotice(logging.Filter):
    """Drops orbax's warnings that a read-only manager is read-only: reading a run is what was asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or "directory is read only" in message)


logging.getLogger("absl").addFilter(_ReadOnlyNotice())


def _directory(directory: str | Path) -> str | Path:
    # gs://bucket/... must stay a URL; a local path is made absolute (orbax requires it).
    return directory if "://" in str(directory) else Path(directory).absolute()


class Checkpointer:
    """Save every N steps; keep the newest `max_to_keep` and, with `best_metric`, the best one.

    `best_metric` names a key of the metrics dict passed to `save` (e.g. "eval/wer"); checkpoints
    saved without metrics are kept only while they are among the newest.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 1, best_metric: str | None = None,
                 best_mode: str = "min", read_only: bool = False):
        self.directory = _directory(directory)
        self.best_metric = best_metric
        best_fn = None
        keep: list = [policies.LatestN(n=max_to_keep)]
        if best_metric:
            worst = math.inf if best_mode == "min" else -math.inf
            best_fn = lambda metrics: float(metrics.get(best_metric, worst))  # noqa: E731
            keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                       keep_checkpoints_without_metrics=False))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=not read_only, read_only=read_only, best_fn=best_fn, best_mode=best_mode,
                preservation_policy=None if read_only else policies.AnyPreservationPolicy(keep)),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None without a metric or evaluated checkpoint)."""
        if not self.best_metric:
            return None
        scored = [s for s in self.all_steps() if self.best_metric in (self.metrics(s) or {})]
        return self.manager.best_step() if scored else None

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with `step`'s checkpoint, if any."""
        return self.manager.metrics(step)

    def save(self, step: int, tree: Any, metrics: dict[str, float] | None = None) -> None:
        """Start saving `tree` at `step` (asynchronously: training continues while it is written)."""
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        self.manager.save(step, args=ocp.args.StandardSave(tree), metrics=metrics, force=True)

    def restore(self, abstract_tree: Any, step: int | None = None) -> Any:
        """Restore into the structure, dtypes and shardings of `abstract_tree` (ShapeDtypeStructs with
        `.sharding`); without it optax states would come back as plain lists."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        logger.info("restoring checkpoint %s/%d", self.directory, step)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_tree))

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Only the `params` of a saved train state, onto the shardings in `abstract_params` (any
        mesh: a checkpoint written FSDP-sharded over many devices restores onto one)."""
        if step not in self.all_steps():
            raise UserError(f"{self.directory}: no checkpoint for step {step}; steps kept: {self.all_steps()}")
        item = {"params": abstract_params}
        logger.info("restoring the parameters of checkpoint %s/%d", self.directory, step)
        restored = self.manager.restore(step, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        # A partial restore hands back the abstract leaf of anything the checkpoint lacks.
        missing = [jax.tree_util.keystr(path) for path, leaf in
                   jax.tree_util.tree_leaves_with_path(restored["params"]) if isinstance(leaf, jax.ShapeDtypeStruct)]
        if missing:
            raise UserError(f"{self.directory}/{step}: the checkpoint has no {', '.join(missing[:3])}"
                            f"{' …' if len(missing) > 3 else ''}; was it saved with another parameter layout "
                            "(model.scan_layers) or model?")
        return restored["params"]

    def select_step(self, step: int | None = None, best: bool = False) -> int:
        """`step` if given, the best checkpoint's step with `best`, else the newest; errors name the folder."""
        steps = self.all_steps()
        if not steps:
            raise UserError(f"{self.directory}: no checkpoints in it")
        if step is not None:
            if step not in steps:
                raise UserError(f"{self.directory}: no checkpoint for step {step}; steps kept: {steps}")
            return step
        if best:
            chosen = self.best_step()
            if chosen is None:
                raise UserError(f"{self.directory}: no checkpoint was saved with an evaluation "
                                f"({self.best_metric or 'checkpoint.best_metric is null'}); steps kept: {steps}")
            return chosen
        return steps[-1]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)
