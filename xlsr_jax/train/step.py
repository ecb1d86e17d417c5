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


def _micro_batches(batch: dict, accum: int, keys=MODEL_INPUTS) -> dict:
    """[accum * micro, ...] -> [accum, micro, ...] keeping each device's rows on that device.

    Row r goes to micro-batch r % accum, so a device's contiguous block of rows spreads over all
    micro-batches and the sharded (micro) axis needs no communication.
    """
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return {k: split(batch[k]) for k in keys}


def step_rng(state: TrainState) -> jax.Array:
    """The step's key: the run's key folded with the step number (a resumed step draws the same)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def accumulate_gradients(loss_fn, params, batch: dict, rng: jax.Array, accum: int, keys=MODEL_INPUTS):
    """((loss, aux), grads) of `loss_fn(params, micro_batch, rng) -> (loss, aux)`, summed over `accum`
    micro-batches of `batch` (its `keys`, split by `_micro_batches`; micro-batch i draws with
    fold_in(rng, i)); with accum=1 the whole batch with `rng`. Scale each micro-batch's loss so the sum is
    the step's."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        return grad_fn(params, batch, rng)

    def body(carry, xs):
        micro, index = xs
        return jax.tree.map(jnp.add, carry, grad_fn(params, micro, jax.random.fold_in(rng, index))), None

    micro = _micro_batches(batch, accum, keys)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    return total


def apply_gradients(state: TrainState, grads, loss: jax.Array, *, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update at learning rate `schedule(state.step)`: (new state, {grad_norm,
    learning_rate, skipped}).

    A non-finite loss or gradient skips the update (optax.apply_if_finite): params and optimizer moments
    stay as they were, `state.skipped` counts it, and `state.step` still advances, so the next batch
    and the next learning rate are those of the next step, as without the skip."""
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
    return new_state, {"grad_norm": grad_norm, "learning_rate": optim.learning_rate(opt_state), "skipped": skipped}


def train_step(state: TrainState, batch: dict, *, model: FlaxWav2Vec2ForCTC, tx: optax.GradientTransformation,
               schedule: optax.Schedule, blank_id: int, reduction: str, accum: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of the CTC objective (`apply_gradients`: at learning rate
    `schedule(state.step)`, skipped when not finite)."""
    normalizer = jnp.maximum(batch["example_mask"].sum(), 1.0) if reduction == "mean" else 1.0
    loss_fn = functools.partial(_loss, model=model, blank_id=blank_id, reduction=reduction, normalizer=normalizer)
    (loss, infeasible), grads = accumulate_gradients(loss_fn, state.params, batch, step_rng(state), accum)
    new_state, update = apply_gradients(state, grads, loss, tx=tx, schedule=schedule)
    return new_state, {"loss": loss, **update, "infeasible": infeasible, "examples": batch["example_mask"].sum()}


def jit_step(step, *, state_shardings: Any, mesh: Mesh) -> Any:
    """A step `(state, batch) -> (state, metrics)` jitted as a run steps it: the state in `state_shardings`
    and donated, batches split over the batch axes, metrics replicated."""
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)


def jit_train_step(model, tx, schedule, *, blank_id: int, reduction: str, accum: int, state_shardings: Any,
                   mesh: Mesh) -> Any:
    """`train_step` jitted by `jit_step`."""
    return jit_step(functools.partial(train_step, model=model, tx=tx, schedule=schedule, blank_id=blank_id,
                                      reduction=reduction, accum=accum), state_shardings=state_shardings, mesh=mesh)
