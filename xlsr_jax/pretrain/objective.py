"""wav2vec 2.0 pretraining as the trainer's `Objective` (train/objective.py): audio without transcripts, the
`FlaxWav2Vec2ForPreTraining` model (from a Hugging Face pretraining folder or from scratch), the jitted
steps of pretrain/step.py, an evaluation of the same losses, a collapse guard, and hf_model/ as a Hugging
Face `Wav2Vec2ForPreTraining` folder (which `xlsr-jax train` fine-tunes with model.pretrained=that folder)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.config import PRETRAIN_EVAL_METRICS, Config, ConfigError
from xlsr_jax.data.audio import SAMPLING_RATE
from xlsr_jax.data.batch import MODEL_INPUTS
from xlsr_jax.errors import UserError
from xlsr_jax.model import FlaxWav2Vec2ForPreTraining, load_pretrained, save_pytorch_weights
from xlsr_jax.model.hf_config import feature_extractor, pretraining_model_config, pretraining_overrides
from xlsr_jax.plots import plot_pretraining_curves
from xlsr_jax.rundir import RunDir
from xlsr_jax.train.loop import run_training
from xlsr_jax.train.objective import Evaluator, summarize_steps
from xlsr_jax.train.setup import Data, build_data
from xlsr_jax.pretrain.step import jit_pretrain_eval_step, jit_pretrain_step

logger = logging.getLogger(__name__)

# (step metric, reduction over the steps of a log line, logged name under pretrain/)
SUMMARY = (("loss", "mean", "loss"), ("contrastive_loss", "mean", "contrastive_loss"),
           ("diversity_loss", "mean", "diversity_loss"), ("codevector_perplexity", "mean", "codevector_perplexity"),
           ("gumbel_temperature", "last", "gumbel_temperature"), ("masked_share", "mean", "masked_share"),
           ("learning_rate", "last", "learning_rate"), ("grad_norm", "mean", "grad_norm"),
           ("skipped", "sum", "skipped_steps"))


def pretrain(config: Config) -> dict[str, float]:
    """`xlsr-jax pretrain`: train the masked contrastive task as configured (resuming a stopped run);
    returns the last eval metrics (or the last training metrics)."""
    return run_training(config, Pretraining())


class CollapseGuard:
    """Stops a run whose quantizer collapsed: the logged codevector perplexity below `threshold` (codes in
    use, over all groups) at `patience` logged steps in a row."""

    def __init__(self, threshold: float, patience: int, describe: str):
        self.threshold, self.patience, self.describe, self.count = threshold, patience, describe, 0

    def __call__(self, step: int, logged: dict[str, float]) -> str | None:
        perplexity = logged["pretrain/codevector_perplexity"]
        self.count = self.count + 1 if perplexity < self.threshold else 0
        if not self.count:
            return None
        logger.warning("step %d: codevector perplexity %.3f < %g (%s): collapsed at %d of %d logged steps in a row",
                       step, perplexity, self.threshold, self.describe, self.count, self.patience)
        if self.count < self.patience:
            return None
        return (f"the quantizer collapsed: codevector perplexity {perplexity:.3f} < {self.threshold:g} "
                f"({self.describe}) at {self.count} logged steps in a row, up to step {step}. The run stopped; its checkpoint of step "
                f"{step} is kept. Raise pretrain.diversity_loss_weight, lower optim.learning_rate or raise "
                "optim.warmup_steps, then resume (or set train.overwrite_output_dir=true to start over); "
                "pretrain.collapse_perplexity=0 turns the guard off")


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """wav2vec 2.0's masked contrastive task."""

    name = "pretraining"
    namespace = "pretrain"

    def check(self, config: Config) -> None:
        best = config.checkpoint.best_metric
        if best is not None and best not in PRETRAIN_EVAL_METRICS:
            raise ConfigError(f"checkpoint.best_metric={best}: xlsr-jax pretrain evaluates "
                              f"{', '.join(PRETRAIN_EVAL_METRICS)}; choose one of them or null",
                              ("checkpoint.best_metric",))
        if config.train.init_from:
            raise ConfigError("train.init_from is not supported by xlsr-jax pretrain: continue from a Hugging Face "
                              "pretraining folder with model.pretrained (a pretrain run's hf_model/)",
                              ("train.init_from",))
        if config.model.freeze_transformer_steps:
            raise ConfigError("model.freeze_transformer_steps must be 0 for xlsr-jax pretrain (there is no CTC head "
                              "to train first)", ("model.freeze_transformer_steps",))

    def build_data(self, config, output_dir, batch_size, eval_batch_size, *, data_parallel) -> Data:
        return build_data(config, output_dir, batch_size, eval_batch_size, data_parallel=data_parallel,
                          audio_only=pretraining_model_config(config.model, config.pretrain))

    def shaped_model(self, config: Config, data: Data):
        dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
        return FlaxWav2Vec2ForPreTraining(pretraining_model_config(config.model, config.pretrain), dtype=dtype,
                                          **config.model.execution_options())

    def build_model(self, config: Config, data: Data, begin):
        m = config.model
        dtype = jnp.bfloat16 if config.train.precision == "bfloat16" else jnp.float32
        if not m.pretrained:
            return self.shaped_model(config, data), None
        try:
            return load_pretrained(m.pretrained, head="pretraining", seed=config.train.seed, dtype=dtype,
                                   options=m.execution_options(), **pretraining_overrides(m, config.pretrain))
        except ValueError as err:
            raise UserError(f"model.pretrained={m.pretrained}: {err}") from None

    def run_files(self, run: RunDir, data: Data):
        return []  # no vocabulary, no text normalisation

    def jit_steps(self, config: Config, data: Data, model, tx, schedule, shardings, mesh: Mesh):
        p = config.pretrain
        train_jit = jit_pretrain_step(model, tx, schedule, pretrain=p, accum=config.optim.gradient_accumulation_steps,
                                      state_shardings=shardings, mesh=mesh)
        eval_jit = None if data.eval is None else jit_pretrain_eval_step(
            model, negatives_from=p.negatives_from, seed=config.train.seed, params_shardings=shardings.params,
            mesh=mesh)
        return train_jit, eval_jit

    def evaluator(self, config: Config, data: Data, eval_fn, mesh: Mesh) -> Evaluator:
        def evaluate(params):
            outputs = [eval_fn(params, arrays)
                       for _, arrays in parallel.device_batches(data.eval.iter_epoch(), mesh, MODEL_INPUTS)]
            scores = pretraining_scores(jax.device_get(outputs))
            summary = (f"loss {scores['eval/loss']:.3f} (contrastive {scores['eval/contrastive_loss']:.3f}, diversity "
                       f"{scores['eval/diversity_loss']:.3f}) per masked frame, codevector perplexity "
                       f"{scores['eval/codevector_perplexity']:.1f}, {scores['eval/masked_frames']:.0f} masked frames")
            return scores, summary, ""
        return evaluate

    @staticmethod
    def summarize(fetched: list[dict]) -> dict[str, float]:
        return summarize_steps(fetched, "pretrain", SUMMARY)

    def advise(self, config: Config, step: int, scores: dict[str, float]) -> str | None:
        return None  # a collapsed quantizer stops the run (`guard`)

    def guard(self, config: Config, model_config) -> CollapseGuard | None:
        p = config.pretrain
        if not p.collapse_perplexity:
            return None
        groups, per_group = model_config.num_codevector_groups, model_config.num_codevectors_per_group
        return CollapseGuard(p.collapse_perplexity * groups, p.collapse_patience,
                             f"pretrain.collapse_perplexity={p.collapse_perplexity:g} per group x {groups} groups of "
                             f"{per_group} codes")

    def export(self, run: RunDir, config: Config, model, params, data: Data, step: int, *, is_main: bool,
               selected: str = "final") -> None:
        """hf_model/: config.json (Wav2Vec2ForPreTraining), model.safetensors, preprocessor_config.json."""
        params = parallel.host_params(params)  # a collective when parameters are sharded across processes
        if not is_main:
            return
        save_pytorch_weights(params, model.config, run.hf_model)
        feature_extractor(model.config, SAMPLING_RATE).save_pretrained(run.hf_model)
        logger.info("hf_model: step %d (%s) as a Hugging Face Wav2Vec2ForPreTraining folder in %s; fine-tune it with "
                    "xlsr-jax train --set model.pretrained=%s", step, selected, run.hf_model, run.hf_model)

    def plot(self, metrics: Path, out_png: Path) -> None:
        plot_pretraining_curves(metrics, out_png)


def pretraining_scores(outputs: list[dict]) -> dict[str, float]:
    """eval/ metrics from `pretrain_eval_step`'s outputs of every batch: losses per masked frame, the
    perplexity averaged over batches, masked frames and their share of the real frames."""
    total = {k: float(np.sum([o[k] for o in outputs])) for k in ("loss", "contrastive_loss", "diversity_loss",
                                                                 "num_masked", "frames")}
    masked = max(total["num_masked"], 1.0)
    return {"eval/loss": total["loss"] / masked, "eval/contrastive_loss": total["contrastive_loss"] / masked,
            "eval/diversity_loss": total["diversity_loss"] / masked,
            "eval/codevector_perplexity": float(np.mean([o["codevector_perplexity"] for o in outputs])),
            "eval/masked_frames": total["num_masked"],
            "eval/masked_share": total["num_masked"] / max(total["frames"], 1.0)}


def format_pretrain_summary(run: RunDir, result: dict[str, float]) -> str:
    """Where a pretraining run's checkpoints, hf_model/ and curves are, and its last metrics."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k.split("/")[-1] in (
        "loss", "contrastive_loss", "codevector_perplexity"))
    lines = [f"run: {run.path}" + (f": {shown}" if shown else "")]
    if run.hf_model.is_dir():
        lines.append(f"Hugging Face Wav2Vec2ForPreTraining folder: {run.hf_model}")
        lines.append(f"next: xlsr-jax train --config CONFIG --set model.pretrained={run.hf_model}")
    if run.curves.exists():
        lines.append(f"training curves: {run.curves}")
    return "\n".join(lines)
