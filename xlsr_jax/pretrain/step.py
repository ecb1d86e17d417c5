"""The pure pretraining steps: masks, distractors and Gumbel temperature drawn inside jit.

A batch is the loader's (data/batch.py): input_values float32 [B, S], attention_mask int32 [B, S] (labels
and example_mask are not read). The time mask is drawn for the whole batch first, so that the step's
loss is Hugging Face's pretraining example's: the summed loss over the step's masked frames, divided by
their count (also with gradient accumulation, whose micro-batches then sum to it).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from xlsr_jax import parallel
from xlsr_jax.config import PretrainConfig
from xlsr_jax.model import (FlaxWav2Vec2ForPreTraining, feat_extract_output_lengths, gumbel_temperature,
                            sample_mask_time_indices, sample_negative_indices)
from xlsr_jax.train.state import TrainState
from xlsr_jax.train.step import accumulate_gradients, apply_gradients, jit_step, step_rng

_INPUTS = ("input_values", "attention_mask", "mask_time_indices")


def _masked(model: FlaxWav2Vec2ForPreTraining, rng: jax.Array, attention_mask: jax.Array):
    """(time mask bool [B, frames], real frames bool [B, frames]) of a batch."""
    frames = int(feat_extract_output_lengths(model.config, attention_mask.shape[1]))
    frame_mask = model.frame_mask(attention_mask, frames)
    return sample_mask_time_indices(rng, frame_mask, model.config) & frame_mask, frame_mask


def _forward(params, batch: dict, rng: jax.Array, *, model: FlaxWav2Vec2ForPreTraining, negatives_from: str,
             deterministic: bool, temperature=2.0):
    """`PreTrainingOutput` of one (micro-)batch holding `_INPUTS`, distractors drawn with `rng`."""
    negatives_rng, dropout_rng, gumbel_rng = jax.random.split(rng, 3)
    mask = batch["mask_time_indices"]
    frame_mask = model.frame_mask(batch["attention_mask"], mask.shape[1])
    candidates = mask if negatives_from == "masked" else frame_mask
    negatives = sample_negative_indices(negatives_rng, candidates, model.config.num_negatives)
    return model.apply({"params": params}, batch["input_values"], mask, negatives,
                       attention_mask=batch["attention_mask"], deterministic=deterministic,
                       gumbel_temperature=temperature, rngs={"dropout": dropout_rng, "gumbel": gumbel_rng})


def _loss(params, batch, rng, *, normalizer, **kwargs):
    """The micro-batch's loss over the step's masked frames, and its sums (for the step's metrics)."""
    out = _forward(params, batch, rng, deterministic=False, **kwargs)
    return out.loss / normalizer, {"contrastive_loss": out.contrastive_loss, "diversity_loss": out.diversity_loss,
                                   "codevector_perplexity": out.codevector_perplexity}


def pretrain_step(state: TrainState, batch: dict, *, model: FlaxWav2Vec2ForPreTraining,
                  tx: optax.GradientTransformation, schedule: optax.Schedule, pretrain: PretrainConfig,
                  accum: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update (train/step.py `apply_gradients`) of the contrastive + diversity loss per masked
    frame, at Gumbel temperature `gumbel_temperature(state.step)`.

    Metrics (float32 scalars): loss, contrastive_loss and diversity_loss per masked frame,
    codevector_perplexity (of the soft choices, averaged over micro-batches), gumbel_temperature,
    masked_share (masked frames / real frames), num_masked, and apply_gradients' grad_norm, learning_rate,
    skipped."""
    mask_rng, rng = jax.random.split(step_rng(state))
    mask, frame_mask = _masked(model, mask_rng, batch["attention_mask"])
    num_masked = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    temperature = gumbel_temperature(state.step, pretrain.max_gumbel_temperature, pretrain.min_gumbel_temperature,
                                     pretrain.gumbel_temperature_decay)
    inputs = {"input_values": batch["input_values"], "attention_mask": batch["attention_mask"],
              "mask_time_indices": mask}
    loss_fn = functools.partial(_loss, model=model, negatives_from=pretrain.negatives_from, temperature=temperature,
                                normalizer=num_masked)
    (loss, sums), grads = accumulate_gradients(loss_fn, state.params, inputs, rng, accum, keys=_INPUTS)
    new_state, update = apply_gradients(state, grads, loss, tx=tx, schedule=schedule)
    return new_state, {
        "loss": loss, "contrastive_loss": sums["contrastive_loss"] / num_masked,
        "diversity_loss": sums["diversity_loss"] / num_masked,
        "codevector_perplexity": sums["codevector_perplexity"] / accum, "gumbel_temperature": temperature,
        "masked_share": mask.sum() / jnp.maximum(frame_mask.sum(), 1), "num_masked": num_masked, **update,
    }


def pretrain_eval_step(params: Any, batch: dict, *, model: FlaxWav2Vec2ForPreTraining, negatives_from: str,
                       seed: int) -> dict[str, jax.Array]:
    """The losses of one batch in eval mode (no dropout, hard code choices), with masks and distractors
    drawn from a fixed key (`seed` folded with the batch's real samples): the same every evaluation.

    Returns sums over the batch's masked frames (loss, contrastive_loss, diversity_loss), num_masked,
    frames (real), and codevector_perplexity (of this batch)."""
    rng = jax.random.fold_in(jax.random.key(seed), batch["attention_mask"].sum())
    mask_rng, rng = jax.random.split(rng)
    mask, frame_mask = _masked(model, mask_rng, batch["attention_mask"])
    out = _forward(params, {**batch, "mask_time_indices": mask}, rng, model=model, negatives_from=negatives_from,
                   deterministic=True)
    return {"loss": out.loss, "contrastive_loss": out.contrastive_loss, "diversity_loss": out.diversity_loss,
            "codevector_perplexity": out.codevector_perplexity, "num_masked": out.num_masked,
            "frames": frame_mask.sum()}


def jit_pretrain_step(model, tx, schedule, *, pretrain: PretrainConfig, accum: int, state_shardings: Any,
                      mesh: Mesh) -> Any:
    """`pretrain_step` jitted by train/step.py's `jit_step`."""
    return jit_step(functools.partial(pretrain_step, model=model, tx=tx, schedule=schedule, pretrain=pretrain,
                                      accum=accum), state_shardings=state_shardings, mesh=mesh)


def jit_pretrain_eval_step(model, *, negatives_from: str, seed: int, params_shardings: Any, mesh: Mesh) -> Any:
    """`pretrain_eval_step` jitted: parameters in `params_shardings`, batches split over the batch axes."""
    return jax.jit(functools.partial(pretrain_eval_step, model=model, negatives_from=negatives_from, seed=seed),
                   in_shardings=(params_shardings, parallel.batch_sharding(mesh)))
