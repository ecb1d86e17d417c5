"""The convolutional feature encoder and feature projection: raw audio -> frame features."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Wav2Vec2Config

from xlsr_jax.model.kernels import gelu_derivative, gelu_value, layer_norm_input_grad, row_statistics
from xlsr_jax.model.layers import Dropout, Dtype, LayerNorm, activation, kaiming_normal, uniform


LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which Hugging Face's conv layers use


@jax.custom_vjp
def bias_layer_norm_gelu(x: jax.Array, bias: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """gelu(LayerNorm(x + bias)) over the last axis: x [..., channels] (any float dtype), bias, scale,
    shift [channels] -> x's shape and dtype. Statistics in float32, like Flax's LayerNorm.

    The same function as a bias add, `nn.LayerNorm` and `gelu` in a row, with a derivative written out:
    autodiff of the three keeps the normalised activations and a broadcast scale as full-size arrays and
    passes over them separately. On 2 CPU cores (8 x 12799 x 256, the 20m model's first conv) fwd+bwd took
    ~216 ms instead of ~260 (PyTorch ~218); at the demo's 8 x 6399 x 32, 7 ms instead of 17 (2026-11-28)."""
    return _bias_ln_gelu_fwd(x, bias, scale, shift)[0]


def _bias_ln_gelu_fwd(x, bias, scale, shift):
    h = x.astype(jnp.float32) + bias
    mean, rstd = row_statistics(h, LAYER_NORM_EPS)
    y = gelu_value((h - mean) * rstd * scale + shift)
    return y.astype(x.dtype), (x, bias, scale, shift, mean, rstd)


def _bias_ln_gelu_bwd(residuals, dy):
    x, bias, scale, shift, mean, rstd = residuals
    # Recomputed from x rather than kept: one array per layer saved for the backward pass, not three.
    xhat = (x.astype(jnp.float32) + bias - mean) * rstd
    dz = dy.astype(jnp.float32) * gelu_derivative(xhat * scale + shift)
    rows = tuple(range(x.ndim - 1))
    dh = layer_norm_input_grad(dz * scale, xhat, rstd)
    return dh.astype(x.dtype), dh.sum(rows), (dz * xhat).sum(rows), dz.sum(rows)


bias_layer_norm_gelu.defvjp(_bias_ln_gelu_fwd, _bias_ln_gelu_bwd)


class ConvParams(nn.Module):
    """`nn.Conv`'s parameters (kernel [width, in, out], bias [out] when `use_bias`) and its convolution
    without the bias: (x [batch, time, in] -> [batch, frames, out], bias or None)."""

    features: int
    width: int
    stride: int
    use_bias: bool
    bias_init: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", kaiming_normal, (self.width, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y, bias


class LayerNormParams(nn.Module):
    """`nn.LayerNorm`'s parameters, scale (ones) and bias (zeros) [features], for a fused caller."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return (self.param("scale", nn.initializers.ones, (self.features,), jnp.float32),
                self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


class ConvLayer(nn.Module):
    """One strided conv of the feature encoder, with its norm and activation. x: [batch, time, channels].

    Parameters as `nn.Conv` ("conv") and `nn.LayerNorm` / `nn.GroupNorm` ("layer_norm") name them. The
    layer-norm flavour (XLSR's) with GELU runs as one `bias_layer_norm_gelu`."""

    config: Wav2Vec2Config
    layer_id: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, i = self.config, self.layer_id
        in_dim = c.conv_dim[i - 1] if i > 0 else 1
        x, bias = ConvParams(c.conv_dim[i], c.conv_kernel[i], c.conv_stride[i], c.conv_bias,
                             uniform(math.sqrt(1.0 / (in_dim * c.conv_kernel[i]))), self.dtype, name="conv")(x)
        if c.feat_extract_norm == "layer" and c.feat_extract_activation == "gelu":
            scale, shift = LayerNormParams(c.conv_dim[i], name="layer_norm")()
            zero = jnp.zeros((c.conv_dim[i],), jnp.float32)
            return bias_layer_norm_gelu(x, zero if bias is None else bias, scale, shift)
        if bias is not None:
            x = x + bias.astype(self.dtype)
        if c.feat_extract_norm == "layer":
            x = LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="layer_norm")(x)
        elif i == 0:  # "group": torch GroupNorm(num_groups=channels) normalises each channel over time
            x = nn.GroupNorm(num_groups=c.conv_dim[0], epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                             name="layer_norm")(x)
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
        normed = LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(features)
        limit = math.sqrt(1.0 / c.conv_dim[-1])
        hidden = nn.Dense(
            c.hidden_size,
            dtype=self.dtype,
            kernel_init=uniform(limit),
            bias_init=uniform(limit),
            name="projection",
        )(normed)
        hidden = Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)
        return hidden, normed

