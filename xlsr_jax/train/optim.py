"""AdamW with warmup and decay, gradient clipping, and freezing as an optimizer mask."""

from __future__ import annotations

from typing import Any

import optax
from flax import traverse_util

from xlsr_jax.config import OptimConfig

FROZEN, TRAINABLE = "frozen", "trainable"


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `total_steps` (Hugging Face's
    "linear"), cosine decay, or constant."""
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
    """(optimizer, schedule). `params` may be abstract (ShapeDtypeStructs): only its structure is used."""
    schedule = learning_rate_schedule(config, total_steps)
    adamw = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay, mask=decay_mask(params)),
    )
    tx = optax.multi_transform({TRAINABLE: adamw, FROZEN: optax.set_to_zero()},
                               trainable_labels(params, freeze_feature_encoder))
    return tx, schedule
