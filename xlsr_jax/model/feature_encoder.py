"""The convolutional feature encoder and feature projection: raw audio -> frame features."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Wav2Vec2Config

from xlsr_jax.model.common import Dtype, activation, kaiming_normal, uniform


class ConvLayer(nn.Module):
    """One strided conv of the feature encoder, with its norm and activation. x: [batch, time, channels]."""

    config: Wav2Vec2Config
    layer_id: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, i = self.config, self.layer_id
        in_dim = c.conv_dim[i - 1] if i > 0 else 1
        x = nn.Conv(
            c.conv_dim[i],
            kernel_size=(c.conv_kernel[i],),
            strides=(c.conv_stride[i],),
            padding="VALID",
            use_bias=c.conv_bias,
            dtype=self.dtype,
            kernel_init=kaiming_normal,
            bias_init=uniform(math.sqrt(1.0 / (in_dim * c.conv_kernel[i]))),
            name="conv",
        )(x)
        if c.feat_extract_norm == "layer":
            x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="layer_norm")(x)
        elif i == 0:  # "group": torch GroupNorm(num_groups=channels) normalises each channel over time
            x = nn.GroupNorm(num_groups=c.conv_dim[0], epsilon=1e-5, dtype=self.dtype, name="layer_norm")(x)
        return activation(c.feat_extract_activation)(x)


class ConvLayerCollection(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_cls = nn.remat(ConvLayer) if self.remat else ConvLayer
        for i in range(len(self.config.conv_dim)):
            x = layer_cls(self.config, i, self.dtype, name=str(i))(x)
        return x


class FeatureEncoder(nn.Module):
    """input_values [batch, samples] -> features [batch, frames, conv_dim[-1]].

    `remat`: recompute the conv activations in the backward pass (pointless when the encoder is frozen:
    no backward pass runs through it)."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_values: jax.Array) -> jax.Array:
        x = input_values.astype(self.dtype)[..., None]
        return ConvLayerCollection(self.config, self.dtype, self.remat, name="conv_layers")(x)


class FeatureProjection(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool) -> tuple[jax.Array, jax.Array]:
        """features [batch, frames, conv_dim[-1]] -> (hidden [batch, frames, hidden], normed features)."""
        c = self.config
        normed = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(features)
        limit = math.sqrt(1.0 / c.conv_dim[-1])
        hidden = nn.Dense(
            c.hidden_size,
            dtype=self.dtype,
            kernel_init=uniform(limit),
            bias_init=uniform(limit),
            name="projection",
        )(normed)
        hidden = nn.Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)
        return hidden, normed

