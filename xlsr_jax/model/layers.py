"""Flax layers and initialisers shared by the modules, matching Hugging Face's `_init_weights`: LayerNorm
and Dropout (through model/kernels.py), activations by name, weight initialisers."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Wav2Vec2Config

from xlsr_jax.model.kernels import gelu, keep_mask, keep_scaled, layer_norm

Dtype = Any


class LayerNorm(nn.Module):
    """`nn.LayerNorm` (same parameters, `scale` and `bias`, and results) through `layer_norm`."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon, self.dtype)


class Dropout(nn.Module):
    """`nn.Dropout` (a key from the "dropout" stream, inverted scaling, nothing in deterministic mode) with
    its mask from `keep_mask`; its backward pass keeps only the boolean mask."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = keep_mask(self.make_rng("dropout"), keep_prob, x.shape)
        return keep_scaled(x, keep, keep_prob)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
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
