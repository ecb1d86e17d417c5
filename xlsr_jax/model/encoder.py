"""The transformer encoder: positional convolution, attention layers, LayerDrop."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Wav2Vec2Config

from xlsr_jax.model.common import Dtype, activation, dense_init


class WeightNormConv(nn.Module):
    """Grouped conv with torch-style weight norm over dim 2; params in PyTorch layout.

    weight_v [out, in/groups, kernel], weight_g [1, 1, kernel]: kernel = g * v / ||v||, norm over (0, 1).
    """

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        width, groups, hidden = c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups, c.hidden_size
        std = 2 * math.sqrt(1.0 / (width * hidden))
        weight_v = self.param(
            "weight_v", nn.initializers.normal(stddev=std), (hidden, hidden // groups, width), jnp.float32
        )
        weight_g = self.param(
            "weight_g", lambda _: jnp.linalg.norm(weight_v, axis=(0, 1), keepdims=True)
        )
        bias = self.param("bias", nn.initializers.zeros, (hidden,), jnp.float32)
        kernel = weight_g * weight_v / jnp.linalg.norm(weight_v, axis=(0, 1), keepdims=True)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(1,),
            padding=[(width // 2, width // 2)],
            dimension_numbers=("NWC", "OIW", "NWC"),
            feature_group_count=groups,
        )
        return y + bias.astype(self.dtype)


class PositionalConvEmbedding(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, frames, hidden] -> relative positional embedding, same shape."""
        y = WeightNormConv(self.config, self.dtype, name="conv")(x)
        if self.config.num_conv_pos_embeddings % 2 == 0:  # torch's SamePad: drop the extra frame
            y = y[:, :-1]
        return activation(self.config.feat_extract_activation)(y)


class Attention(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        """x [batch, frames, hidden]; bias float32 [batch, 1, 1, frames] additive key mask."""
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        dense = functools.partial(nn.Dense, c.hidden_size, dtype=self.dtype, kernel_init=dense_init(c))
        split = lambda y: y.reshape(*y.shape[:2], heads, head_dim)  # noqa: E731
        q = split(dense(name="q_proj")(x))
        k = split(dense(name="k_proj")(x))
        v = split(dense(name="v_proj")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim**-0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        return dense(name="out_proj")(out)


class FeedForward(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        init = dense_init(c)
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, kernel_init=init, name="intermediate_dense")(x)
        x = activation(c.hidden_act)(x)
        x = nn.Dropout(c.activation_dropout)(x, deterministic=deterministic)
        x = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="output_dense")(x)
        return nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """Post-LN layer (base models) or pre-LN "stable" layer (large / XLSR), per `do_stable_layer_norm`."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
        attention = Attention(c, self.dtype, name="attention")
        dropout = nn.Dropout(c.hidden_dropout)
        feed_forward = FeedForward(c, self.dtype, name="feed_forward")
        layer_norm, final_layer_norm = norm(name="layer_norm"), norm(name="final_layer_norm")
        if c.do_stable_layer_norm:
            x = x + dropout(attention(layer_norm(x), bias, deterministic), deterministic=deterministic)
            return x + feed_forward(final_layer_norm(x), deterministic)
        x = layer_norm(x + dropout(attention(x, bias, deterministic), deterministic=deterministic))
        return final_layer_norm(x + feed_forward(x, deterministic))


def _skip_layer(layer: nn.Module, x, bias):
    return x


def _run_layer(layer: nn.Module, x, bias):
    return layer(x, bias, False)


class EncoderLayerCollection(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        # `deterministic` is argument 3 counting self; it must be static to pick dropout on or off.
        layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.gradient_checkpointing else EncoderLayer
        for i in range(c.num_hidden_layers):
            layer = layer_cls(c, self.dtype, name=str(i))
            if deterministic or c.layerdrop <= 0.0:
                x = layer(x, bias, deterministic)
            else:
                # LayerDrop: skip the whole layer with probability `layerdrop`, really skipping its compute.
                skip = jax.random.uniform(self.make_rng("dropout")) < c.layerdrop
                x = nn.cond(skip, _skip_layer, _run_layer, layer, x, bias)
        return x


class Encoder(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, frame_mask: jax.Array, deterministic: bool) -> jax.Array:
        """x [batch, frames, hidden], frame_mask bool [batch, frames] -> [batch, frames, hidden]."""
        c = self.config
        x = jnp.where(frame_mask[..., None], x, 0)  # padded frames must not leak into the positional conv
        bias = jnp.where(frame_mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        x = x + PositionalConvEmbedding(c, self.dtype, name="pos_conv_embed")(x)
        layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")
        if not c.do_stable_layer_norm:
            x = layer_norm(x)
        x = nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)
        x = EncoderLayerCollection(c, self.dtype, self.gradient_checkpointing, name="layers")(
            x, bias, deterministic
        )
        return layer_norm(x) if c.do_stable_layer_norm else x

