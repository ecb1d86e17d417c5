"""The transformer encoder: positional convolution, attention layers, LayerDrop.

The layers run unrolled, with parameters per layer under Hugging Face's names (`layers/3/attention/...`),
or under `nn.scan` (one compiled layer body, so compile time does not grow with depth), with parameters
stacked (`layers/layer/attention/...` [layers, ...]); model/layout.py converts between the two.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import Wav2Vec2Config

from xlsr_jax.backend import target_backend
from xlsr_jax.config import REMAT_POLICIES
from xlsr_jax.model.kernels import dense_dot_general, keep_mask, scale_kept
from xlsr_jax.model.layers import Dropout, Dtype, LayerNorm, activation, dense_init
from xlsr_jax.model.layout import STACKED
from xlsr_jax.model.pos_conv import grouped_conv



def remat_policy_fn(name: str):
    """`model.remat_policy` -> the policy argument of `nn.remat` (None: recompute everything)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r}: use one of {REMAT_POLICIES}")
    return None if name in ("none", "full") else getattr(jax.checkpoint_policies, name)


class WeightNormConv(nn.Module):
    """Grouped conv with torch-style weight norm over dim 2; params in PyTorch layout.

    weight_v [out, in/groups, kernel], weight_g [1, 1, kernel]: kernel = g * v / ||v||, norm over (0, 1).
    """

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    impl: str = "auto"

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
        y = grouped_conv(x.astype(self.dtype), kernel.astype(self.dtype), groups, width // 2, self.impl)
        return y + bias.astype(self.dtype)


class PositionalConvEmbedding(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, frames, hidden] -> relative positional embedding, same shape."""
        y = WeightNormConv(self.config, self.dtype, self.impl, name="conv")(x)
        if self.config.num_conv_pos_embeddings % 2 == 0:  # torch's SamePad: drop the extra frame
            y = y[:, :-1]
        return activation(self.config.feat_extract_activation)(y)


def _resolve_attention(requested: str, dtype: Any, head_dim: int) -> str:
    """"auto" -> cuDNN's flash attention on a GPU with 16-bit compute and head sizes it takes, else the
    plain path (on CPU it measured faster than `jax.nn.dot_product_attention`'s XLA version: 1.59 vs
    1.80 s for fwd+bwd of 8 layers x 384, 8 x 199 frames)."""
    if requested != "auto":
        return requested
    fits_cudnn = jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if target_backend() == "gpu" and fits_cudnn else "plain"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, impl: str,
                    even_frames: bool) -> jax.Array:
    """`jax.nn.dot_product_attention` over right-padded frames: q, k, v [batch, frames, heads, head_dim],
    lengths int32 [batch] -> [batch, frames, heads, head_dim].

    `even_frames`: cuDNN's fused kernel has no backward pass for an odd frame count with a padding mask
    (jax raises "Unsupported sequence length Q 499, KV 499" at the first training step; 10 s of audio
    is 499 frames): one zero frame is appended to q, k and v, the key hidden by the kernel's own length
    mask, and the extra output row sliced off, so every real query sees exactly its own keys.
    """
    frames = q.shape[1]
    if even_frames and frames % 2:
        q, k, v = (jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))) for a in (q, k, v))
    # A filler row (no real frame) attends to its first frame instead of to nothing: a fully masked row
    # is a 0/0 in some kernels, and its outputs are never used.
    out = jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                       key_value_seq_lengths=jnp.maximum(lengths, 1).astype(jnp.int32),
                                       implementation=impl)
    return out[:, :frames]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_as(scores: jax.Array, dtype: Any) -> jax.Array:
    """Softmax over the last axis of float32 `scores`, computed in float32 and returned in `dtype`.

    Its backward pass keeps only that output. Autodiff of softmax-then-cast keeps float32 exponentials
    instead: [batch, heads, frames, frames] x 4 bytes in every layer (XLSR-53 at 32 x 5 s: 121 MiB a
    layer, 2.8 GiB over 24 layers). The gradient comes from the probabilities the forward pass used."""
    return _softmax_as_fwd(scores, dtype)[0]


def _softmax_as_fwd(scores, dtype):
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return probs, probs


def _softmax_as_bwd(dtype, probs, g):
    p = probs.astype(jnp.float32)
    g = g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_as.defvjp(_softmax_as_fwd, _softmax_as_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dropout_attend(scores: jax.Array, v: jax.Array, key: jax.Array, keep_prob: float, dtype: Any,
                   spec: str) -> jax.Array:
    """Attention's softmax, dropout and weighted sum in one: `jnp.einsum(spec, dropped, v)` with dropped =
    inverted dropout (mask from `keep_mask(key, keep_prob, ...)`) of `softmax_as(scores, dtype)`.

    scores float32 [batch, heads, frames, frames]; v [batch, heads, frames, head_dim] or [batch, frames,
    heads, head_dim], as `spec` ("bhqk,bhkd->bhqd" or "bhqk,bkhd->bqhd") reads it. The backward pass keeps
    the probabilities, the boolean mask and v, and drops the probabilities again: autodiff of the three
    steps also keeps the dropped probabilities, [batch, heads, frames, frames] in `dtype`, in every layer
    (XLSR-53 at 32 x 5 s in bf16: 61 MiB a layer, written out and stacked each step)."""
    return _dropout_attend_fwd(scores, v, key, keep_prob, dtype, spec)[0]


def _dropout_attend_fwd(scores, v, key, keep_prob, dtype, spec):
    probs = softmax_as(scores, dtype)
    keep = keep_mask(key, keep_prob, probs.shape)
    return jnp.einsum(spec, scale_kept(probs, keep, keep_prob), v), (probs, keep, v)


def _dropout_attend_bwd(keep_prob, dtype, spec, residuals, g):
    probs, keep, v = residuals
    d_dropped, dv = jax.vjp(lambda p, v: jnp.einsum(spec, p, v), scale_kept(probs, keep, keep_prob), v)[1](g)
    return _softmax_as_bwd(dtype, probs, scale_kept(d_dropped, keep, keep_prob))[0], dv, None


dropout_attend.defvjp(_dropout_attend_fwd, _dropout_attend_bwd)


class Attention(nn.Module):
    """Multi-head self-attention over right-padded frames.

    `impl`: "xla" | "cudnn" use `jax.nn.dot_product_attention` (the fused kernel); "plain" materialises
    the probabilities; "auto" is cuDNN where it applies, else plain. Attention dropout needs the
    probabilities, so a training step with `attention_dropout > 0` takes the plain path whatever `impl`
    says (through `dropout_attend`).
    """

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array, deterministic: bool) -> jax.Array:
        """x [batch, frames, hidden]; lengths int32 [batch]: real (unpadded) frames per row."""
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        dense = functools.partial(nn.Dense, c.hidden_size, dtype=self.dtype, kernel_init=dense_init(c),
                                  dot_general=dense_dot_general)
        split = lambda y: y.reshape(*y.shape[:2], heads, head_dim)  # noqa: E731
        q = split(dense(name="q_proj")(x))
        k = split(dense(name="k_proj")(x))
        v = split(dense(name="v_proj")(x))
        impl = _resolve_attention(self.impl, self.dtype, head_dim)
        if impl == "plain" or (not deterministic and c.attention_dropout > 0):
            out = self._plain(q, k, v, lengths, deterministic)
        else:
            out = fused_attention(q, k, v, lengths, impl, even_frames=impl == "cudnn")
        return dense(name="out_proj")(out.reshape(x.shape))

    def _plain(self, q, k, v, lengths, deterministic: bool) -> jax.Array:
        """q, k, v [batch, frames, heads, head_dim] -> [batch, frames, heads, head_dim].

        On the CPU backend q, k and v are first written out heads-first, [batch, heads, frames,
        head_dim]: XLA:CPU otherwise ran the score matmul (batch dims not leading) in Eigen at about a
        third of its YNNPACK matmul's speed. The attention core's fwd+bwd on one core at 8 x 199
        frames x 6 heads x 64: 35.0 -> 29.2 ms; at the demo's 8 x 99 x 4 x 64: 6.0 -> 4.4 ms."""
        frames = k.shape[1]
        bias = jnp.where(jnp.arange(frames)[None, :] < lengths[:, None], 0.0, jnp.finfo(jnp.float32).min)
        heads_first = target_backend() == "cpu"
        if heads_first:
            q, k, v = jax.lax.optimization_barrier(tuple(a.transpose(0, 2, 1, 3) for a in (q, k, v)))
        spec = "bhqd,bhkd->bhqk" if heads_first else "bqhd,bkhd->bhqk"
        scores = jnp.einsum(spec, q, k) * (q.shape[-1] ** -0.5)
        scores = scores.astype(jnp.float32) + bias[:, None, None, :]
        # heads-first: the output in [b, h, q, d], then transposed: 4 ms faster at 8 x 199 x 6 x 64 fwd+bwd
        # on one core than asking the einsum for [b, q, h, d] directly (84-86 vs 88-90 ms, with the projections)
        out_spec = "bhqk,bhkd->bhqd" if heads_first else "bhqk,bkhd->bqhd"
        rate = self.config.attention_dropout
        if deterministic or rate == 0.0:
            out = jnp.einsum(out_spec, softmax_as(scores, self.dtype), v)
        elif rate == 1.0:
            out = jnp.zeros_like(v)
        else:
            out = dropout_attend(scores, v, self.make_rng("dropout"), 1.0 - rate, self.dtype, out_spec)
        return out.transpose(0, 2, 1, 3) if heads_first else out


class FeedForward(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init(c), dot_general=dense_dot_general)
        x = dense(c.intermediate_size, name="intermediate_dense")(x)
        x = activation(c.hidden_act)(x)
        x = Dropout(c.activation_dropout)(x, deterministic=deterministic)
        x = dense(c.hidden_size, name="output_dense")(x)
        return Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """Post-LN layer (base models) or pre-LN "stable" layer (large / XLSR), per `do_stable_layer_norm`."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        norm = functools.partial(LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
        attention = Attention(c, self.dtype, self.attention, name="attention")
        dropout = Dropout(c.hidden_dropout)
        feed_forward = FeedForward(c, self.dtype, name="feed_forward")
        layer_norm, final_layer_norm = norm(name="layer_norm"), norm(name="final_layer_norm")
        if c.do_stable_layer_norm:
            x = x + dropout(attention(layer_norm(x), lengths, deterministic), deterministic=deterministic)
            return x + feed_forward(final_layer_norm(x), deterministic)
        x = layer_norm(x + dropout(attention(x, lengths, deterministic), deterministic=deterministic))
        return final_layer_norm(x + feed_forward(x, deterministic))


def _skip_layer(layer: nn.Module, x, lengths):
    return x


def _run_layer(layer: nn.Module, x, lengths):
    return layer(x, lengths, False)  # only training steps drop layers


def _layer_or_skip(module: nn.Module, layer: nn.Module, x, lengths, deterministic: bool):
    """LayerDrop: in training, skip the whole layer with probability `layerdrop`, really skipping its
    compute (`nn.cond`, not a multiply by zero)."""
    layerdrop = module.config.layerdrop
    if deterministic or layerdrop <= 0.0:
        return layer(x, lengths, deterministic)
    skip = jax.random.uniform(module.make_rng("dropout")) < layerdrop
    return nn.cond(skip, _skip_layer, _run_layer, layer, x, lengths)


def _layer_class(remat_policy: str, scanned: bool):
    if remat_policy == "none":
        return EncoderLayer
    # `deterministic` (argument 3 counting self) picks dropout on or off, so it must be static. Under
    # scan, the loop already keeps XLA from merging the recomputation away (prevent_cse is not needed).
    return nn.remat(EncoderLayer, static_argnums=(3,), policy=remat_policy_fn(remat_policy),
                    prevent_cse=not scanned)


class EncoderLayerCollection(nn.Module):
    """The layers one after another, unrolled (one XLA computation per layer)."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array, deterministic: bool) -> jax.Array:
        layer_cls = _layer_class(self.remat_policy, scanned=False)
        for i in range(self.config.num_hidden_layers):
            x = _layer_or_skip(self, layer_cls(self.config, self.dtype, self.attention, name=str(i)),
                               x, lengths, deterministic)
        return x


class _ScanBody(nn.Module):
    """One step of the scanned stack: (hidden, lengths) -> (hidden, None)."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention: str = "auto"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array):
        layer = _layer_class(self.remat_policy, scanned=True)(self.config, self.dtype, self.attention,
                                                              name=STACKED)
        return _layer_or_skip(self, layer, x, lengths, self.deterministic), None


def scanned_layers(config: Wav2Vec2Config, dtype: Dtype, remat_policy: str, attention: str,
                   deterministic: bool, name: str) -> nn.Module:
    """The layers under `nn.scan` (one compiled body). Call: (x [batch, frames, hidden], lengths [batch])
    -> (x, None). Parameters are stacked, `layers/layer/...` with a leading [layers] axis (model/layout.py
    converts to and from Hugging Face's per-layer names). Each layer draws its own dropout and LayerDrop
    randomness (split_rngs)."""
    scan = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=nn.broadcast, length=config.num_hidden_layers)
    return scan(config, dtype, remat_policy, attention, deterministic, name=name)


class Encoder(nn.Module):
    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    attention: str = "auto"
    pos_conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, frame_mask: jax.Array, deterministic: bool) -> jax.Array:
        """x [batch, frames, hidden], frame_mask bool [batch, frames] (right padding) -> same shape as x."""
        c = self.config
        x = jnp.where(frame_mask[..., None], x, 0)  # padded frames must not leak into the positional conv
        lengths = frame_mask.sum(-1).astype(jnp.int32)
        x = x + PositionalConvEmbedding(c, self.dtype, self.pos_conv, name="pos_conv_embed")(x)
        layer_norm = LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layer_norm")
        if not c.do_stable_layer_norm:
            x = layer_norm(x)
        x = Dropout(c.hidden_dropout)(x, deterministic=deterministic)
        if self.scan_layers and c.num_hidden_layers > 0:
            x, _ = scanned_layers(c, self.dtype, self.remat_policy, self.attention, deterministic,
                                  name="layers")(x, lengths)
        else:
            x = EncoderLayerCollection(c, self.dtype, self.remat_policy, self.attention, name="layers")(
                x, lengths, deterministic)
        return layer_norm(x) if c.do_stable_layer_norm else x
