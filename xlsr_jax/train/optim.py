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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from xlsr_jax.config import OptimConfig
from xlsr_jax.errors import UserError

FROZEN, TRAINABLE, HEAD, ENCODER = "frozen", "trainable", "head", "encoder"

# `optax.apply_if_finite` applies a non-finite update after `max_consecutive_errors` skips in a row;
# NaN parameters would only ruin the run, so it never gives up here (its count saturates at the int32
# maximum) and the loop stops the run after `optim.max_consecutive_skips` instead.
_NEVER_GIVE_UP = int(jnp.iinfo(jnp.int32).max)


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `total_steps` (Hugging Face's
    "linear"), cosine decay, or constant; or fairseq's tri-stage (`tri_stage_schedule`). Step k (0-based)
    of a run uses `schedule(k)`."""
    if config.schedule == "tri_stage":
        return tri_stage_schedule(config, total_steps)
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


def tri_stage_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """fairseq's tri-stage schedule (wav2vec 2.0 fine-tuning): linear warmup from
    `init_lr_scale * learning_rate` to `learning_rate` over `warmup_steps`, hold for `hold_steps` (null:
    40 % of the run, fairseq's phase ratio), then exponential decay to `final_lr_scale * learning_rate`
    at the last step (and held there)."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    hold = round(0.4 * total_steps) if config.hold_steps is None else config.hold_steps
    hold = min(hold, total_steps - warmup)
    decay = max(total_steps - 1 - warmup - hold, 1)  # the last step (total_steps - 1) runs at the final rate
    final = config.final_lr_scale * peak
    stages, ends = [], []
    if warmup:
        stages.append(optax.linear_schedule(config.init_lr_scale * peak, peak, warmup))
        ends.append(warmup)
    if hold:
        stages.append(optax.constant_schedule(peak))
        ends.append(warmup + hold)
    # peak * final_lr_scale ** (k / decay) for k in [0, decay]: ends at the final rate, then stays there.
    stages.append(optax.exponential_decay(peak, decay, config.final_lr_scale, end_value=final))
    return optax.join_schedules(stages, ends) if ends else stages[0]


def trainable_labels(params: Any, freeze_feature_encoder: bool, head_first: bool = False) -> Any:
    """Optimizer group of each parameter: "frozen" for the conv feature encoder when it is frozen;
    with `head_first` (model.freeze_transformer_steps > 0), "head" for the CTC head and "encoder" for the
    rest; else "trainable"."""
    flat = traverse_util.flatten_dict(params)

    def label(path):
        if freeze_feature_encoder and path[:2] == ("wav2vec2", "feature_extractor"):
            return FROZEN
        if head_first:
            return HEAD if path[0] == "lm_head" else ENCODER
        return TRAINABLE

    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only, not on biases, norms or embeddings."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] in ("kernel", "weight_v") for path in flat})


def build_optimizer(config: OptimConfig, total_steps: int, params: Any, freeze_feature_encoder: bool,
                    freeze_transformer_steps: int = 0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). `params` may be abstract (ShapeDtypeStructs): only its structure is used.

    Before each update the caller sets the learning rate, `set_learning_rate(opt_state, schedule(step))`.
    An update whose gradients are not all finite changes nothing but apply_if_finite's counters.

    With `freeze_transformer_steps` = N > 0 (fairseq's freeze_finetune_updates), the first N applied
    updates train the CTC head only: the rest of the model gets no gradient (nor weight decay), so the
    global-norm clipping sees the head's alone, and its AdamW state starts at the first update after
    them (bias correction counts from there, as if the optimizer were created then).
    """
    def adamw():
        return optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
            weight_decay=config.weight_decay, mask=decay_mask(params))

    labels = trainable_labels(params, freeze_feature_encoder, head_first=freeze_transformer_steps > 0)
    clip = optax.clip_by_global_norm(config.max_grad_norm)
    if freeze_transformer_steps > 0:
        n = freeze_transformer_steps
        tx = optax.chain(
            optax.multi_transform({HEAD: optax.identity(), ENCODER: _zero_for(n), FROZEN: optax.set_to_zero()},
                                  labels),
            clip,
            optax.multi_transform({HEAD: adamw(), ENCODER: _start_after(adamw(), n), FROZEN: optax.set_to_zero()},
                                  labels))
    else:
        tx = optax.multi_transform({TRAINABLE: optax.chain(clip, adamw()), FROZEN: optax.set_to_zero()}, labels)
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP), learning_rate_schedule(config, total_steps)


class _CountState(NamedTuple):
    count: jax.Array  # int32 []: updates seen
    inner: Any = optax.EmptyState()


def _zero_for(steps: int) -> optax.GradientTransformation:
    """Zero updates for the first `steps` updates, then pass them through."""
    def init(_params):
        return _CountState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        live = state.count >= steps
        updates = jax.tree.map(lambda u: jnp.where(live, u, jnp.zeros_like(u)), updates)
        return updates, _CountState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def _start_after(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """`inner` from update `steps` + 1 on, its state untouched (as initialised) and zero updates before."""
    def init(params):
        return _CountState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        def run(_):
            return inner.update(updates, state.inner, params)

        def hold(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        new_updates, inner_state = jax.lax.cond(state.count >= steps, run, hold, None)
        return new_updates, _CountState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init, update)


def set_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
    """`opt_state` of `build_optimizer` with the rate its next update applies (float32 [])."""
    return optax.tree.set(opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32))


def learning_rate(opt_state: Any) -> jax.Array:
    """float32 []: the rate set for the last step (the rate applied, unless that step was skipped)."""
    # One per AdamW (two while model.freeze_transformer_steps keeps the encoder's apart); all equal.
    return optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")[0][1]


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
