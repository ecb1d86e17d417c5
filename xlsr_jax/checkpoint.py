"""Orbax checkpoints of any pytree: save every N steps, keep the newest K, restore already sharded.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run that dies
mid-save leaves the previous checkpoint intact and never restores a partial one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree: Any) -> None:
        """Start saving `tree` at `step` (asynchronously: training continues while it is written)."""
        self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)

    def restore(self, abstract_tree: Any, step: int | None = None) -> Any:
        """Restore into the structure, dtypes and shardings of `abstract_tree` (ShapeDtypeStructs with
        `.sharding`); without it optax states would come back as plain lists."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        logger.info("restoring checkpoint %s/%d", self.directory, step)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_tree))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)
