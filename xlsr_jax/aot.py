"""Every step shape compiled before the first step, so that nothing compiles mid-run.

A step (`train.step.jit_train_step`, `infer.step.jit_eval_step`) is jitted once with its shardings and
then lowered with abstract inputs (`jax.ShapeDtypeStruct` carrying the run's shardings) for each
bucket's batch shape (B, S, L) and compiled. Tracing runs in the calling thread (it holds the GIL);
the XLA compilations run in threads (they release it) and go through the persistent compilation cache
when `train.compilation_cache` configured one. `ShapeDispatch` then sends each batch to the executable
of its shape, and refuses a shape it was not compiled for instead of compiling it in the middle of a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Sharding

logger = logging.getLogger(__name__)

BatchShape = tuple[int, int, int]  # (global batch B, padded samples S, padded label length L)


def abstract_batch(shape: BatchShape, sharding: Sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The model inputs of one global batch of `shape`, as `BatchLoader.load_batch` builds them:
    input_values float32 [B, S], attention_mask int32 [B, S], labels int32 [B, L], example_mask
    float32 [B], every one split over the batch axes by `sharding`."""
    b, s, length = shape
    spec = {"input_values": ((b, s), jnp.float32), "attention_mask": ((b, s), jnp.int32),
            "labels": ((b, length), jnp.int32), "example_mask": ((b,), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(dims, dtype, sharding=sharding) for k, (dims, dtype) in spec.items()}


def abstract_like(tree: Any) -> Any:
    """Arrays -> `jax.ShapeDtypeStruct`s with their shapes, dtypes, weak types and shardings: a
    compiled executable accepts exactly the arrays it was compiled for."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                                       weak_type=getattr(x, "weak_type", False)), tree)


def batch_shape(batch: Mapping[str, Any]) -> BatchShape:
    """(B, S, L) of a batch of model inputs (global arrays or abstract ones)."""
    b, s = batch["input_values"].shape
    return int(b), int(s), int(batch["labels"].shape[1])


@dataclasses.dataclass(frozen=True)
class ShapeDispatch:
    """`step(first, batch)` through the executable compiled for the batch's shape.

    `first` is the state (train) or the params (eval); `executables` maps (B, S, L) to
    `jax.stages.Compiled`. A shape that was not compiled ahead of time is an error: it means the
    loader yields a shape that `batch_shapes` did not announce.
    """

    name: str
    executables: Mapping[BatchShape, Any]

    def __call__(self, first: Any, batch: Mapping[str, jax.Array]) -> Any:
        shape = batch_shape(batch)
        executable = self.executables.get(shape)
        if executable is None:
            raise ValueError(f"{self.name}: no step compiled for batch shape (B, S, L) = {shape}; compiled "
                             f"ahead of time: {sorted(self.executables)} (the loader's batch_shapes must "
                             "list every shape it yields)")
        return executable(first, batch)

    def __len__(self) -> int:
        return len(self.executables)


@dataclasses.dataclass(frozen=True)
class StepToCompile:
    """One jitted step (`jax.jit` with in/out shardings), its abstract first argument (see
    `abstract_like`) and the batch shapes to compile it for."""

    name: str
    jitted: Any
    first: Any
    shapes: Iterable[BatchShape]


def _compile_timed(lowered) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def compile_steps(steps: Iterable[StepToCompile], batch_sharding: Sharding,
                  workers: int | None = None) -> dict[str, ShapeDispatch]:
    """Each step compiled for each of its shapes; returns {name: ShapeDispatch}.

    Shapes are traced one after another here while the compilations already submitted run in up to
    `workers` threads (default: one per CPU core), so tracing and compiling overlap. Logs the total
    time and each shape's compile time (a persistent-cache hit shows as a short one).
    """
    start = time.perf_counter()
    todo = [(step, shape) for step in steps for shape in sorted({tuple(map(int, s)) for s in step.shapes})]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    futures: dict[tuple[str, BatchShape], concurrent.futures.Future] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xlsr_jax-compile") as pool:
        for step, shape in todo:
            lowered = step.jitted.lower(step.first, abstract_batch(shape, batch_sharding))
            futures[step.name, shape] = pool.submit(_compile_timed, lowered)
        done = {key: future.result() for key, future in futures.items()}
    out: dict[str, dict[BatchShape, Any]] = {}
    for (name, shape), (compiled, _) in done.items():
        out.setdefault(name, {})[shape] = compiled
    logger.info("compiled %s ahead of time in %.1f s (%d threads): %s",
                ", ".join(f"{len(v)} {k} shapes" for k, v in out.items()), time.perf_counter() - start,
                workers, "; ".join(f"{name} (B, S, L)={shape} {seconds:.1f} s"
                                   for (name, shape), (_, seconds) in done.items()))
    return {name: ShapeDispatch(name, executables) for name, executables in out.items()}
