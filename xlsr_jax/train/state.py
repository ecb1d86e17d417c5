"""The training state: one pytree that is checkpointed and donated to the step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], steps done, skipped ones included: the loader's and the lr schedule's position
    params: Any
    opt_state: Any  # optim.build_optimizer's: apply_if_finite around the AdamW moments
    rng: jax.Array  # uint32 [2], raw key data so orbax stores it like any array
    skipped: jax.Array  # int32 [], updates skipped for a non-finite loss or gradient


def create_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state around `params` (call under jit with out_shardings to build it already sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
        skipped=jnp.zeros((), jnp.int32),
    )
