"""What the trainer trains: an `Objective` gives the loop (train/loop.py `run_training`) its data, model, compiled
steps, evaluation, logged metrics and export. CTC fine-tuning (`train/ctc.py`) is one; pretraining
(`xlsr_jax/pretrain/`) another. Everything else of a run (mesh, resume, checkpoints, signals, metrics files)
is the loop's and the same for both."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.aot import ShapeDispatch, StepToCompile, compile_steps
from xlsr_jax.checkpoint import abstract_with_shardings
from xlsr_jax.config import Config
from xlsr_jax.rundir import RunDir

# params -> (eval/ metrics, a one-line summary, examples to show or "")
Evaluator = Callable[[Any], tuple[dict[str, float], str, str]]
# (step, the logged training metrics) -> a reason to stop the run now (checkpoint kept), or None
Guard = Callable[[int, dict[str, float]], "str | None"]


class Objective(Protocol):
    name: str  # "ctc" or "pretraining": in run_signature.json, so one cannot resume the other
    namespace: str  # of the logged training metrics: "train/loss", "pretrain/loss"

    def check(self, config: Config) -> None:
        """Refuse config keys this objective cannot honour (ConfigError), before any work."""

    def build_data(self, config: Config, output_dir: Path, batch_size: int, eval_batch_size: int, *,
                   data_parallel: int) -> Any:
        """train/setup.py's `Data`."""

    def build_model(self, config: Config, data: Any, begin: Any) -> tuple[Any, dict | None]:
        """(model, host params or None for a random init); `begin` is train/resume.py's `Start`."""

    def shaped_model(self, config: Config, data: Any) -> Any:
        """The model `build_model` gives a fresh run, without reading any weights (a pretrained folder's
        config.json only): what `plan` compiles."""

    def run_files(self, run: RunDir, data: Any) -> Sequence[tuple[Path, Callable[[str], Any]]]:
        """(path, save) of the files besides config, model config and signature a run writes at its start."""

    def jit_steps(self, config: Config, data: Any, model, tx, schedule, shardings, mesh: Mesh) -> tuple[Any, Any]:
        """(train step, eval step or None without eval data), jitted with the state's `shardings` over `mesh`,
        for `compile_run_steps`."""

    def evaluator(self, config: Config, data: Any, eval_fn: ShapeDispatch, mesh: Mesh) -> Evaluator: ...

    def summarize(self, fetched: list[dict]) -> dict[str, float]:
        """The steps' metrics since the last log line -> the logged ones (`summarize_steps`)."""

    def guard(self, config: Config, model_config) -> Guard | None: ...

    def advise(self, config: Config, step: int, scores: dict[str, float]) -> str | None:
        """A warning the evaluation of `step` (its `eval/` scores) calls for, logged by the loop; or None."""

    def export(self, run: RunDir, config: Config, model, params, data: Any, step: int, *, is_main: bool,
               selected: str) -> None:
        """hf_model/ at the end of the run."""

    def plot(self, metrics: Path, out_png: Path) -> None: ...


def compile_run_steps(train_jit, eval_jit, data, state, shardings, mesh: Mesh
                      ) -> tuple[ShapeDispatch, ShapeDispatch | None]:
    """(train step, eval step or None without eval data), each compiled for every batch shape its
    loader announces (`batch_shapes`), with the shardings they run with: the state and its
    parameters as `shardings` says, batches split over the batch axes. Lands in (or comes from) the
    persistent compilation cache when `train.compilation_cache` is set."""
    steps = [StepToCompile("train", train_jit, abstract_with_shardings(state, shardings),
                           data.train.batch_shapes.values())]
    if data.eval is not None:
        steps.append(StepToCompile("eval", eval_jit, abstract_with_shardings(state.params, shardings.params),
                                   data.eval.batch_shapes.values()))
    compiled = compile_steps(steps, parallel.batch_sharding(mesh))
    return compiled["train"], compiled.get("eval")


_REDUCE = {"mean": np.mean, "sum": np.sum, "last": lambda values: values[-1]}


def summarize_steps(fetched: list[dict], namespace: str, spec: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """{f"{namespace}/{name}": the `how` ("mean", "sum" or "last") of each step's `key`} for each
    (key, how, name) of `spec`, in its order."""
    return {f"{namespace}/{name}": float(_REDUCE[how]([m[key] for m in fetched])) for key, how, name in spec}
