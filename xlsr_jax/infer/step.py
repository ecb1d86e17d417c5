"""The pure eval/predict step: CTC loss terms and greedy predictions of one batch, on device.

Jitted once per bucket shape by whoever evaluates (the trainer, `xlsr-jax evaluate`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from xlsr_jax import parallel

from xlsr_jax.model import FlaxWav2Vec2ForCTC, ctc_loss, frame_mask_from_attention_mask


def eval_step(params: Any, batch: dict, *, model: FlaxWav2Vec2ForCTC, blank_id: int, reduction: str,
              with_log_probs: bool = False) -> dict[str, jax.Array]:
    """Loss terms and greedy predictions of one batch (see data/loader.py for the batch arrays).

    Returns loss_sum float32 [] (sum over real examples of their loss, per-token for "mean"),
    examples float32 [], pred_ids int32 [B, frames] (argmax, on device), frames int32 [B] (valid
    frames per row), confidence float32 [B] (`utterance_confidence`) and, with `with_log_probs` (beam search
    with a language model), log_probs float32 [B, frames, vocab].
    """
    logits = model.apply({"params": params}, batch["input_values"], batch["attention_mask"], deterministic=True)
    frame_mask = frame_mask_from_attention_mask(model.config, batch["attention_mask"], logits.shape[1])
    loss, _ = ctc_loss(logits, frame_mask, batch["labels"], blank_id=blank_id, reduction=reduction,
                       example_mask=batch["example_mask"])
    examples = batch["example_mask"].sum()
    loss_sum = loss * jnp.maximum(examples, 1.0) if reduction == "mean" else loss
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out = {
        "loss_sum": loss_sum,
        "examples": examples,
        "pred_ids": jnp.argmax(logits, axis=-1).astype(jnp.int32),
        "frames": frame_mask.sum(-1).astype(jnp.int32),
        "confidence": utterance_confidence(log_probs, frame_mask),
    }
    if with_log_probs:
        out["log_probs"] = log_probs
    return out


def utterance_confidence(log_probs: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """Mean over an utterance's valid frames of the greedy path's log-probability (each frame's largest
    log-prob), float32 [B] from log_probs [B, frames, vocab] and frame_mask [B, frames]: 0 for a model sure
    of every frame, lower the more frames it hesitates on. Padding frames do not count; a row without
    frames gets 0."""
    best = jnp.where(frame_mask, log_probs.max(axis=-1), 0.0)
    return best.sum(-1) / jnp.maximum(frame_mask.sum(-1), 1).astype(jnp.float32)


def jit_eval_step(model, *, blank_id: int, reduction: str, params_shardings: Any, mesh: Mesh,
                  with_log_probs: bool = False) -> Any:
    """`infer.step.eval_step` jitted: parameters in `params_shardings`, batches split over the batch axes."""
    return jax.jit(functools.partial(eval_step, model=model, blank_id=blank_id, reduction=reduction,
                                     with_log_probs=with_log_probs),
                   in_shardings=(params_shardings, parallel.batch_sharding(mesh)))
