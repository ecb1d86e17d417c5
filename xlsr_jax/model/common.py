"""Activations and initialisers shared by the Flax modules, matching Hugging Face's `_init_weights`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Wav2Vec2Config

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def dense_init(config: Wav2Vec2Config):
    return nn.initializers.normal(stddev=config.initializer_range)


def uniform(limit: float):
    def init(rng, shape, dtype=jnp.float32):
        return jax.random.uniform(rng, shape, dtype, -limit, limit)

    return init


# torch's kaiming_normal_ (fan_in, gain sqrt(2)), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
