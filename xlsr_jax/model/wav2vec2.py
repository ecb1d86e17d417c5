"""FlaxWav2Vec2ForCTC: Hugging Face's Wav2Vec2ForCTC forward pass in Flax linen.

Module and parameter names mirror the PyTorch model (`wav2vec2/encoder/layers/3/attention/q_proj`), with
Flax leaf names (`kernel`, `scale`), so `convert.py` maps a checkpoint 1:1. The positional convolution keeps
PyTorch's weight-norm parameters (`weight_g`, `weight_v`) in PyTorch layout.

Stochastic parts (dropout, layerdrop, SpecAugment masks) draw from the "dropout" RNG stream and run only
with `deterministic=False`; every shape is static so the whole model jits once per input shape.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import Wav2Vec2Config

from xlsr_jax.model.masking import compute_span_mask

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


def check_config(config: Wav2Vec2Config) -> None:
    """Reject configs this model does not implement, naming the key."""
    if config.feat_extract_norm not in ("layer", "group"):
        raise ValueError(f"config.feat_extract_norm={config.feat_extract_norm!r}: must be 'layer' or 'group'")
    if getattr(config, "add_adapter", False):
        raise ValueError("config.add_adapter=True (conv adapter after the encoder) is not supported")
    if getattr(config, "adapter_attn_dim", None) is not None:
        raise ValueError("config.adapter_attn_dim (MMS attention adapters) is not supported")
    if config.vocab_size is None:
        raise ValueError("config.vocab_size is None: the CTC head needs a vocabulary size")
    lengths = {len(config.conv_dim), len(config.conv_kernel), len(config.conv_stride)}
    if len(lengths) != 1:
        raise ValueError("config.conv_dim, conv_kernel and conv_stride must have the same length")


def feat_extract_output_lengths(config: Wav2Vec2Config, lengths):
    """Frames the conv feature encoder makes from `lengths` samples (numpy or jax ints, any shape)."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        lengths = (lengths - kernel) // stride + 1
    return lengths


def receptive_field(config: Wav2Vec2Config) -> int:
    """Fewest input samples that give one output frame."""
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need


def frame_mask_from_attention_mask(config: Wav2Vec2Config, attention_mask: jax.Array, num_frames: int) -> jax.Array:
    """bool [batch, frames]: True on frames computed from real samples.

    `attention_mask` is int/bool [batch, samples] with right padding, as Hugging Face's feature extractor
    makes it; the result equals Hugging Face's `_get_feature_vector_attention_mask`.
    """
    lengths = feat_extract_output_lengths(config, attention_mask.astype(jnp.int32).sum(-1))
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


# --- initialisers matching Hugging Face's `_init_weights` -------------------------------------------------


def _dense_init(config: Wav2Vec2Config):
    return nn.initializers.normal(stddev=config.initializer_range)


def _uniform(limit: float):
    def init(rng, shape, dtype=jnp.float32):
        return jax.random.uniform(rng, shape, dtype, -limit, limit)

    return init


# torch's kaiming_normal_ (fan_in, gain sqrt(2)), untruncated.
_kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


# --- feature encoder ----------------------------------------------------------------------------------


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
            kernel_init=_kaiming_normal,
            bias_init=_uniform(math.sqrt(1.0 / (in_dim * c.conv_kernel[i]))),
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
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_cls = nn.remat(ConvLayer) if self.gradient_checkpointing else ConvLayer
        for i in range(len(self.config.conv_dim)):
            x = layer_cls(self.config, i, self.dtype, name=str(i))(x)
        return x


class FeatureEncoder(nn.Module):
    """input_values [batch, samples] -> features [batch, frames, conv_dim[-1]]."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_values: jax.Array) -> jax.Array:
        x = input_values.astype(self.dtype)[..., None]
        return ConvLayerCollection(self.config, self.dtype, self.gradient_checkpointing, name="conv_layers")(x)


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
            kernel_init=_uniform(limit),
            bias_init=_uniform(limit),
            name="projection",
        )(normed)
        hidden = nn.Dropout(c.feat_proj_dropout)(hidden, deterministic=deterministic)
        return hidden, normed


# --- transformer encoder ------------------------------------------------------------------------------


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
        dense = functools.partial(nn.Dense, c.hidden_size, dtype=self.dtype, kernel_init=_dense_init(c))
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
        init = _dense_init(c)
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


# --- whole model --------------------------------------------------------------------------------------


def has_masked_spec_embed(config: Wav2Vec2Config) -> bool:
    """Hugging Face creates `masked_spec_embed` only when some SpecAugment mask is on."""
    return config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0


class Wav2Vec2Module(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False
    freeze_feature_encoder: bool = False

    def _mask_hidden_states(self, x, frame_mask, deterministic: bool, mask_time_indices):
        """SpecAugment: time spans -> `masked_spec_embed`, feature spans -> 0. x [batch, frames, hidden]."""
        c = self.config
        if not getattr(c, "apply_spec_augment", True):
            return x
        batch, frames, hidden = x.shape
        if has_masked_spec_embed(c) or mask_time_indices is not None:
            embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0), (hidden,))
        if mask_time_indices is None and c.mask_time_prob > 0 and not deterministic:
            lengths = frame_mask.sum(-1)
            mask_time_indices = compute_span_mask(
                self.make_rng("dropout"), lengths, frames, c.mask_time_prob, c.mask_time_length,
                c.mask_time_min_masks,
            )
        if mask_time_indices is not None:
            self.sow("intermediates", "mask_time_indices", mask_time_indices)
            x = jnp.where(mask_time_indices[..., None], embed.astype(x.dtype), x)
        if c.mask_feature_prob > 0 and not deterministic:
            feature_mask = compute_span_mask(
                self.make_rng("dropout"), jnp.full((batch,), hidden), hidden, c.mask_feature_prob,
                c.mask_feature_length, c.mask_feature_min_masks,
            )
            self.sow("intermediates", "mask_feature_indices", feature_mask)
            x = jnp.where(feature_mask[:, None, :], 0, x)
        self.sow("intermediates", "masked_hidden_states", x)  # free unless "intermediates" is mutable
        return x

    @nn.compact
    def __call__(self, input_values, attention_mask=None, deterministic: bool = True, mask_time_indices=None):
        """input_values [batch, samples] -> (hidden [batch, frames, hidden], frame_mask bool [batch, frames])."""
        c = self.config
        features = FeatureEncoder(c, self.dtype, self.gradient_checkpointing, name="feature_extractor")(
            input_values
        )
        if self.freeze_feature_encoder:
            # No gradient flows into the conv stack: the same as torch's requires_grad=False, and it saves
            # the backward pass through the most activation-heavy part of the model.
            features = jax.lax.stop_gradient(features)
        frames = features.shape[1]
        if attention_mask is None:
            frame_mask = jnp.ones(features.shape[:2], dtype=bool)
        else:
            frame_mask = frame_mask_from_attention_mask(c, attention_mask, frames)
        hidden, _ = FeatureProjection(c, self.dtype, name="feature_projection")(features, deterministic)
        hidden = self._mask_hidden_states(hidden, frame_mask, deterministic, mask_time_indices)
        hidden = Encoder(c, self.dtype, self.gradient_checkpointing, name="encoder")(
            hidden, frame_mask, deterministic
        )
        return hidden, frame_mask


class FlaxWav2Vec2ForCTC(nn.Module):
    """Wav2Vec2 with a CTC head, equal to transformers' `Wav2Vec2ForCTC`.

    Call: `model.apply({"params": params}, input_values [batch, samples], attention_mask=[batch, samples],
    deterministic=True)` -> logits float32 [batch, frames, vocab]. Training passes `deterministic=False`
    and `rngs={"dropout": key}`. Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16).
    """

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False
    freeze_feature_encoder: bool = False

    def setup(self):
        check_config(self.config)
        self.wav2vec2 = Wav2Vec2Module(
            self.config, self.dtype, self.gradient_checkpointing, self.freeze_feature_encoder
        )
        self.final_dropout = nn.Dropout(self.config.final_dropout)
        self.lm_head = nn.Dense(
            self.config.vocab_size, dtype=self.dtype, kernel_init=_dense_init(self.config), name="lm_head"
        )

    def __call__(self, input_values, attention_mask=None, deterministic: bool = True, mask_time_indices=None):
        hidden, _ = self.wav2vec2(input_values, attention_mask, deterministic, mask_time_indices)
        hidden = self.final_dropout(hidden, deterministic=deterministic)
        return self.lm_head(hidden).astype(jnp.float32)

    def output_lengths(self, sample_lengths):
        """Frames of logits for `sample_lengths` samples (numpy or jax ints)."""
        return feat_extract_output_lengths(self.config, sample_lengths)

    def frame_mask(self, attention_mask, num_frames: int):
        """bool [batch, frames] of real (non-padding) logit frames for an [batch, samples] attention mask."""
        return frame_mask_from_attention_mask(self.config, attention_mask, num_frames)

    def init_params(self, rng: jax.Array, num_samples: int | None = None) -> dict:
        """Random float32 parameters (Hugging Face's initialisation), as a nested dict of arrays."""
        num_samples = num_samples or receptive_field(self.config)
        dummy = jnp.zeros((1, num_samples), jnp.float32)
        return jax.jit(lambda r: self.init(r, dummy, deterministic=True)["params"])(rng)

    def abstract_params(self) -> dict:
        """Parameter shapes/dtypes (jax.ShapeDtypeStruct pytree) without computing anything."""
        dummy = jax.ShapeDtypeStruct((1, receptive_field(self.config)), jnp.float32)
        return jax.eval_shape(lambda r, x: self.init(r, x, deterministic=True)["params"],
                              jax.random.key(0), dummy)


def num_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
