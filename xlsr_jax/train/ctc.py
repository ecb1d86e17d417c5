"""CTC fine-tuning as the trainer's `Objective` (train/objective.py): transcripts become labels through a
vocabulary, the CTC train step, evaluation and export passed in as `Tasks` (from infer/ and hub/, which
train/ never imports)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.config import Config
from xlsr_jax.plots import plot_training_curves
from xlsr_jax.rundir import RunDir
from xlsr_jax.train.objective import Evaluator, summarize_steps
from xlsr_jax.train.resume import init_model
from xlsr_jax.train.setup import Data, build_data, build_model
from xlsr_jax.train.step import jit_train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tasks:
    """What a run does besides training steps; `xlsr_jax.recipe.tasks()` gives xlsr-jax's own.

    eval_step(model, *, blank_id, reduction, params_shardings, mesh) -> a jitted step that `aot` compiles
        for every eval bucket: (params, batch) -> per-utterance loss and greedy ids (infer/step.py).
    predict(params, loader, eval_step, vocab, mesh) -> ({"loss", "wer", "cer", "examples", ...},
        predictions with .reference and .hypothesis): one pass over the eval loader (infer/predict.py).
    export(params, model_config, vocab, folder, *, normalization, run, run_config, step, clips, info)
        -> {"check": None or the PyTorch self-check's report}: the hf_model/ folder (hub/export.py).
    """

    eval_step: Callable[..., Any]
    predict: Callable[..., tuple[dict[str, float], list]]
    export: Callable[..., dict[str, Any]]


# (step metric, reduction over the steps of a log line, logged name under train/)
SUMMARY = (("loss", "mean", "loss"), ("grad_norm", "mean", "grad_norm"), ("learning_rate", "last", "learning_rate"),
           ("infeasible", "sum", "infeasible"), ("skipped", "sum", "skipped_steps"))


def ctc_summary(fetched: list[dict]) -> dict[str, float]:
    return summarize_steps(fetched, "train", SUMMARY)


@dataclasses.dataclass(frozen=True)
class CTC:
    """Fine-tuning with CTC: the objective `train.loop.train(config, tasks)` runs."""

    tasks: Tasks
    name = "ctc"
    namespace = "train"

    def check(self, config: Config) -> None:
        pass

    def build_data(self, config, output_dir, batch_size, eval_batch_size, *, data_parallel) -> Data:
        return build_data(config, output_dir, batch_size, eval_batch_size, data_parallel=data_parallel)

    def build_model(self, config: Config, data: Data, begin):
        if begin.kind == "init":
            return init_model(begin.source, config, data.vocab)
        return build_model(config, data.vocab)

    def run_files(self, run: RunDir, data: Data):
        return [(run.vocab, data.vocab.save), (run.normalization, data.normalization.save)]

    def shaped_model(self, config: Config, data: Data):
        return build_model(config, data.vocab, weights=False)[0]

    def jit_steps(self, config: Config, data: Data, model, tx, schedule, shardings, mesh: Mesh):
        blank, reduction = data.vocab.pad_id, config.model.ctc_loss_reduction
        train_jit = jit_train_step(model, tx, schedule, blank_id=blank, reduction=reduction,
                                   accum=config.optim.gradient_accumulation_steps, state_shardings=shardings,
                                   mesh=mesh)
        eval_jit = None if data.eval is None else self.tasks.eval_step(
            model, blank_id=blank, reduction=reduction, params_shardings=shardings.params, mesh=mesh)
        return train_jit, eval_jit

    def evaluator(self, config: Config, data: Data, eval_fn, mesh: Mesh) -> Evaluator:
        def evaluate(params):
            scores, predictions = self.tasks.predict(params, data.eval, eval_fn, data.vocab, mesh)
            scores = {f"eval/{k}": v for k, v in scores.items()}
            shown = "\n".join(f"  ref: {p.reference}\n  hyp: {p.hypothesis}"
                              for p in predictions[: config.eval.num_examples_to_print])
            summary = (f"loss {scores['eval/loss']:.3f}  WER {100 * scores['eval/wer']:.2f}%  CER "
                       f"{100 * scores['eval/cer']:.2f}% ({scores['eval/examples']:.0f} utterances; blank on "
                       f"{100 * scores['eval/blank_frames']:.0f} % of frames, {100 * scores['eval/empty']:.0f} % "
                       "empty)")
            return scores, summary, shown
        return evaluate

    summarize = staticmethod(ctc_summary)

    def guard(self, config: Config, model_config):
        return None

    @staticmethod
    def advise(config: Config, step: int, scores: dict[str, float]) -> str | None:
        return blank_collapse_advice(config, step, scores)

    def export(self, run: RunDir, config: Config, model, params, data: Data, step: int, *, is_main: bool,
               selected: str = "final") -> None:
        """hf_model/: the same converter, card and (with torch) check as `xlsr-jax export`."""
        params = parallel.host_params(params)  # a collective when parameters are sharded across processes
        if not is_main:
            return
        dataset = (data.eval or data.train).dataset
        held = (range(len(dataset)) if dataset.owners is None
                else np.flatnonzero(dataset.owners == jax.process_index()))
        clips = [np.asarray(dataset.audio[int(i)]) for i in held[:3]]  # clips whose audio this host decoded
        where = str(run.path if "://" in str(run.path) else run.path.absolute())
        out = self.tasks.export(params, model.config, data.vocab, run.hf_model, normalization=data.normalization,
                                run=run, run_config=config, step=step, clips=clips,
                                info={"run": where, "selected": selected})
        if out["check"] is None:
            logger.info("hf_model: torch is not installed, so the PyTorch self-check was skipped "
                        "(pip install 'xlsr-jax[torch]' to have it)")
        else:
            logger.info("hf_model: PyTorch self-check on %d clips: max |dlogits| %.2e, greedy transcripts identical: "
                        "%s", out["check"]["clips"], out["check"]["max_abs_diff"],
                        out["check"]["transcripts_identical"])

    def plot(self, metrics: Path, out_png: Path) -> None:
        plot_training_curves(metrics, out_png)


# A CTC model that emits only blanks: (nearly) every eval frame's most likely token, or (nearly) every
# transcript empty. A working model at 50 frames/s gives 20-40 % of frames to characters.
COLLAPSED_BLANK_FRAMES, COLLAPSED_EMPTY = 0.98, 0.9


def blank_collapse_advice(config: Config, step: int, scores: dict[str, float]) -> str | None:
    """What to check when the evaluation of `step`, past the warm-up (optim.warmup_steps, plus
    model.freeze_transformer_steps), shows a model that predicts only blanks; None otherwise."""
    blank, empty = scores.get("eval/blank_frames"), scores.get("eval/empty")
    settled = config.optim.warmup_steps + config.model.freeze_transformer_steps
    if blank is None or step <= settled or (blank < COLLAPSED_BLANK_FRAMES and empty < COLLAPSED_EMPTY):
        return None
    return (f"step {step}: the model predicts the blank on {100 * blank:.1f} % of eval frames and an empty transcript "
            f"for {100 * empty:.0f} % of utterances, {step - settled} steps past the warm-up. XLSR models often do "
            "for their first few hundred updates while eval/loss falls; if it still does later, check: "
            f"optim.learning_rate ({config.optim.learning_rate:g}: too high collapses to blanks, too low never leaves "
            "them), the vocabulary against the transcripts (xlsr-jax inventory; out_of_vocabulary rows in "
            "data_report.tsv), clips with few frames per character (infeasible rows), and a head-only phase "
            f"(model.freeze_transformer_steps={config.model.freeze_transformer_steps}) long enough for the new head")
