"""The pure train step. Jitted once (per bucket shape) with shardings by the loop; the eval step lives
in infer/step.py.

A batch is a dict of global arrays, batch dimension first:
  input_values float32 [B, S], attention_mask int32 [B, S], labels int32 [B, L] (-100 padded),
  example_mask float32 [B] (0 for filler rows), index int64 [B].
With gradient accumulation B = accum * micro; the step scans over the `accum` micro-batches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from xlsr_jax import parallel

from xlsr_jax.data.batch import MODEL_INPUTS
from xlsr_jax.model import FlaxWav2Vec2ForCTC, ctc_loss, frame_mask_from_attention_mask
from xlsr_jax.train import optim
from xlsr_jax.train.state import TrainState


def _loss(params, batch, rng, *, model: FlaxWav2Vec2ForCTC, blank_id: int, reduction: str, normalizer):
    """Objective of one micro-batch, scaled so the micro-batches of a step sum to the step's loss."""
    logits = model.apply({"params": params}, batch["input_values"], batch["attention_mask"],
                         deterministic=False, rngs={"dropout": rng})
    frame_mask = frame_mask_from_attention_mask(model.config, batch["attention_mask"], logits.shape[1])
    loss, aux = ctc_loss(logits, frame_mask, batch["labels"], blank_id=blank_id, reduction=reduction,
                         example_mask=batch["example_mask"])
    if reduction == "mean":  # ctc_loss averaged over this micro-batch's examples; re-weight to the step's
        loss = loss * jnp.maximum(batch["example_mask"].sum(), 1.0) / normalizer
    return loss, aux["num_infeasible"]


def _micro_batches(batch: dict, accum: int) -> dict:
    """[accum * micro, ...] -> [accum, micro, ...] keeping each device's rows on that device.

    Row r goes to micro-batch r % accum, so a device's contiguous block of rows spreads over all
    micro-batches and the sharded (micro) axis needs no communication.
    """
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return {k: split(batch[k]) for k in MODEL_INPUTS}


def train_step(state: TrainState, batch: dict, *, model: FlaxWav2Vec2ForCTC, tx: optax.GradientTransformation,
               schedule: optax.Schedule, blank_id: int, reduction: str, accum: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update at learning rate `schedule(state.step)`.

    A non-finite loss or gradient skips the update (optax.apply_if_finite): params and optimizer moments
    stay as they were, `state.skipped` counts it, and `state.step` still advances, so the next batch
    and the next learning rate are those of the next step, as without the skip."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    normalizer = jnp.maximum(batch["example_mask"].sum(), 1.0) if reduction == "mean" else 1.0
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    kwargs = dict(model=model, blank_id=blank_id, reduction=reduction, normalizer=normalizer)
    if accum == 1:
        (loss, infeasible), grads = grad_fn(state.params, batch, rng, **kwargs)
    else:
        def body(carry, xs):
            micro, index = xs
            (loss, infeasible), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index), **kwargs)
            acc_grads, acc_loss, acc_inf = carry
            return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss, acc_inf + infeasible), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, loss, infeasible), _ = jax.lax.scan(
            body, init, (_micro_batches(batch, accum), jnp.arange(accum)))
    grad_norm = optax.tree.norm(grads)
    # apply_if_finite judges the gradients only; a non-finite loss must skip the update too.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    learning_rate = schedule(state.step)
    opt_state = optim.set_learning_rate(state.opt_state, learning_rate)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    skipped = optim.skipped(opt_state)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),  # zero updates when skipped
        opt_state=opt_state,
        skipped=state.skipped + skipped,
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": optim.learning_rate(opt_state),
        "infeasible": infeasible,
        "skipped": skipped,
        "examples": batch["example_mask"].sum(),
    }
    return new_state, metrics


def jit_train_step(model, tx, schedule, *, blank_id: int, reduction: str, accum: int, state_shardings: Any,
                   mesh: Mesh) -> Any:
    """`train_step` jitted as a run steps it: the state in `state_shardings` and donated, batches
    split over the batch axes, metrics replicated."""
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, blank_id=blank_id,
                                     reduction=reduction, accum=accum),
                   in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)
