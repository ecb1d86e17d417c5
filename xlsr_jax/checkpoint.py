"""Orbax checkpoints of any pytree: the newest K, plus the best by an eval metric, restored already
sharded.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run that dies
mid-save leaves the previous checkpoint intact and never restores a partial one; the writer deletes such
leftover folders when it opens. A complete checkpoint damaged later (a truncated file: orbax keeps no
checksums) shows when it fails to restore: `restore` then falls back to the previous one and moves the
damaged folder aside (`<step>.damaged`) with a warning, so that nothing is lost and the step can be
saved again. Keeping the best checkpoint is orbax's own preservation policy (`BestN` beside
`LatestN`); the metrics it ranks by are stored inside each checkpoint, so `best_step()` works on a
finished run's folder as well.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from xlsr_jax.errors import UserError
from xlsr_jax.rundir import DAMAGED

logger = logging.getLogger(__name__)


class _ReadOnlyNotice(logging.Filter):
    """Drops orbax's warnings that a read-only manager is read-only: reading a run is what was asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or "directory is read only" in message)


logging.getLogger("absl").addFilter(_ReadOnlyNotice())




def _directory(directory: str | os.PathLike) -> str | Path:
    # gs://bucket/... must stay the URL string (str() of an etils path gives it back); a local path is
    # made absolute (orbax requires it).
    return str(directory) if "://" in str(directory) else Path(directory).absolute()


def kept_steps(directory: str | os.PathLike) -> list[int]:
    """The complete checkpoints' steps in `directory`, sorted; [] when it does not exist. Opens no
    manager (which would create the folder), and ignores orbax's temporary and `.damaged` folders."""
    directory = _directory(directory)
    if not epath.Path(directory).is_dir():
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


class Checkpointer:
    """Save every N steps; keep the newest `max_to_keep` and, with `best_metric`, the best one.

    `best_metric` names a key of the metrics dict passed to `save` (e.g. "eval/wer"); checkpoints
    saved without metrics are kept only while they are among the newest.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 1, best_metric: str | None = None,
                 best_mode: str = "min", read_only: bool = False):
        self.directory = _directory(directory)
        self.best_metric, self.best_mode = best_metric, best_mode
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
                cleanup_tmp_directories=not read_only,  # what a run killed mid-save left
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
        `.sharding`); without it optax states would come back as plain lists.

        `step`: that checkpoint, or an error. None: the newest that restores. A newer one that fails while
        an older one restores into the same tree is damaged (not a tree that does not fit, which fails
        for all): it is named in a warning and moved aside. If none restores, nothing is moved.
        """
        if step is not None:
            if step not in self.all_steps():
                raise UserError(f"{self.directory}: no checkpoint for step {step}; steps kept: {self.all_steps()}")
            return self._restore(abstract_tree, step)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        failed: dict[int, Exception] = {}
        for candidate in reversed(steps):
            try:
                restored = self._restore(abstract_tree, candidate)
            except Exception as err:  # tensorstore reports a bad file as a bare Exception
                logger.warning("%s/%d: cannot be restored (%s); trying the checkpoint before it",
                               self.directory, candidate, _first_line(err))
                failed[candidate] = err
                continue
            for bad in failed:
                self._set_aside(bad)
            return restored
        newest = steps[-1]
        raise UserError(f"{self.directory}: no checkpoint restores (steps {steps}); the newest, {newest}, fails "
                        f"with: {_first_line(failed[newest])}") from failed[newest]

    def _restore(self, abstract_tree: Any, step: int) -> Any:
        logger.info("restoring checkpoint %s/%d", self.directory, step)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_tree))

    def _set_aside(self, step: int) -> None:
        """Move a damaged checkpoint to `<step>.damaged` (kept for inspection; orbax no longer lists it,
        so the step can be saved again). Process 0 moves it; every process forgets it."""
        folder = epath.Path(self.directory) / str(step)
        aside = folder.with_name(folder.name + DAMAGED)
        k = 1
        while aside.exists():
            k += 1
            aside = folder.with_name(f"{folder.name}{DAMAGED}-{k}")
        if jax.process_index() == 0:
            folder.rename(aside)
        if jax.process_count() > 1:  # every host reads the same files, so every host got here
            multihost_utils.sync_global_devices(f"xlsr_jax: checkpoint {step} set aside")
        logger.warning("%s: damaged, moved aside to %s; training goes on from an earlier checkpoint", folder, aside)
        self.manager.reload()

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Only the `params` of a saved train state, onto the shardings in `abstract_params` (any
        mesh: a checkpoint written FSDP-sharded over many devices restores onto one)."""
        if step not in self.all_steps():
            raise UserError(f"{self.directory}: no checkpoint for step {step}; steps kept: {self.all_steps()}")
        item = {"params": abstract_params}
        logger.info("restoring the parameters of checkpoint %s/%d", self.directory, step)
        try:
            restored = self.manager.restore(step, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        except Exception as err:  # orbax and tensorstore report a damaged folder in many types
            raise UserError(f"{self.directory}/{step}: cannot read this checkpoint, damaged or incomplete "
                            f"({_first_line(err)}); steps kept: {self.all_steps()}, choose another with --step"
                            ) from err
        if not isinstance(restored, dict) or "params" not in restored:
            raise UserError(f"{self.directory}/{step}: not a training state (no params); steps kept: "
                            f"{self.all_steps()}")
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

    def select_steps(self, count: int, best: bool = False) -> list[int]:
        """The `count` newest kept steps, or with `best` the `count` best by `best_metric` (ascending by step),
        for averaging; errors name the folder and what it keeps."""
        steps = self.all_steps()
        if best:
            scored = [s for s in steps if self.best_metric and self.best_metric in (self.metrics(s) or {})]
            sign = 1 if self.best_mode == "min" else -1
            steps = sorted(scored, key=lambda s: (sign * self.metrics(s)[self.best_metric], -s))
            steps = sorted(steps[:count])
        else:
            steps = steps[-count:]
        if len(steps) < count:
            kind = f"evaluated by {self.best_metric}" if best else "kept"
            raise UserError(f"{self.directory}: averaging {count} checkpoints needs {count} {kind}, it has "
                            f"{len(steps)} ({steps}); keep more with checkpoint.save_total_limit")
        return steps

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)
