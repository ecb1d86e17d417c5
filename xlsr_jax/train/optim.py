"""AdamW with warmup and decay, gradient clipping, freezing as an optimizer mask, and skipping of
non-finite updates.

The learning rate is not a schedule inside the optimizer: the train step evaluates the schedule at
`state.step` and writes it into the optimizer state (`set_learning_rate`). `state.step` counts every
step, skipped ones included, and is also the loader's position, so a skipped step uses up its
learning-rate slot as it uses up its batch, the decay still ends at the last step, and the rate that
is logged is the rate that was applied. (A schedule inside `apply_if_finite` would count applied
updates only and fall behind by one for every skipped step.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from xlsr_jax.config import OptimConfig
from xlsr_jax.errors import UserError

FROZEN, TRAINABLE = "frozen", "trainable"

# `optax.apply_if_finite` applies a non-finite update after `max_consecutive_errors` skips in a row;
# NaN parameters would only ruin the run, so it never gives up here (its count saturates at the int32
# maximum) and the loop stops the run after `optim.max_consecutive_skips` instead.
_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `total_steps` (Hugging Face's
    "linear"), cosine decay, or constant. Step k (0-based) of a run uses `schedule(k)`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    peak = config.learning_rate
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def trainable_labels(params: Any, freeze_feature_encoder: bool) -> Any:
    """"frozen" for the conv feature encoder when it is frozen, "trainable" elsewhere."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        path: FROZEN if freeze_feature_encoder and path[:2] == ("wav2vec2", "feature_extractor") else TRAINABLE
        for path in flat
    })


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only, not on biases, norms or embeddings."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] in ("kernel", "weight_v") for path in flat})


def build_optimizer(config: OptimConfig, total_steps: int, params: Any,
                    freeze_feature_encoder: bool) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). `params` may be abstract (ShapeDtypeStructs): only its structure is used.

    Before each update the caller sets the learning rate, `set_learning_rate(opt_state, schedule(step))`.
    An update whose gradients are not all finite changes nothing but apply_if_finite's counters.
    """
    adamw = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
            weight_decay=config.weight_decay, mask=decay_mask(params)),
    )
    tx = optax.multi_transform({TRAINABLE: adamw, FROZEN: optax.set_to_zero()},
                               trainable_labels(params, freeze_feature_encoder))
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP), learning_rate_schedule(config, total_steps)


def set_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
    """`opt_state` of `build_optimizer` with the rate its next update applies (float32 [])."""
    return optax.tree.set(opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32))


def learning_rate(opt_state: Any) -> jax.Array:
    """float32 []: the rate set for the last step (the rate applied, unless that step was skipped)."""
    return optax.tree.get(opt_state, "learning_rate")


def skipped(opt_state: Any) -> jax.Array:
    """int32 []: 1 if the last update was skipped for non-finite values, else 0."""
    return (~opt_state.last_finite).astype(jnp.int32)


def consecutive_skips(opt_state: Any) -> jax.Array:
    """int32 []: updates skipped in a row for non-finite values, up to and including the last one."""
    return opt_state.notfinite_count


def check_consecutive_skips(opt_state: Any, limit: int, step: int) -> None:
    """Stop a run whose last `limit` updates were all skipped (call where metrics are read anyway: it
    waits for the state). Every process holds the same count, so all of them stop together."""
    skips = int(jax.device_get(consecutive_skips(opt_state)))
    if skips >= limit:
        raise UserError(f"step {step}: the last {skips} updates were all skipped for a non-finite loss or "
                        f"gradient (optim.max_consecutive_skips={limit}); training has diverged. The parameters "
                        "are those of the last finite update; lower optim.learning_rate, raise "
                        "optim.warmup_steps or look for broken clips")
