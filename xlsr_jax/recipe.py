"""The whole road wired together: the trainer (train/) with xlsr-jax's evaluation (infer/) and Hugging Face
export (hub/). train/ takes these as `Tasks` and never imports infer/ or hub/; the CLI, the sweep and the
tests train through here."""

from __future__ import annotations

from xlsr_jax.config import Config
from xlsr_jax.hub.export import export_params
from xlsr_jax.infer.predict import predict
from xlsr_jax.infer.step import jit_eval_step
from xlsr_jax.train import loop
from xlsr_jax.train.stopping import EvalCallback


def tasks() -> loop.Tasks:
    """Periodic evaluation as `xlsr-jax evaluate` scores (greedy WER/CER), hf_model/ as `xlsr-jax export`
    writes it."""
    return loop.Tasks(eval_step=jit_eval_step, predict=predict, export=export_params)


def train(config: Config, *, on_eval: EvalCallback | None = None) -> dict[str, float]:
    """`train.loop.train` with `tasks()`: returns the last eval metrics (or the last train metrics)."""
    return loop.train(config, tasks(), on_eval=on_eval)
