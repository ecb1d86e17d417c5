"""FlaxWav2Vec2ForCTC: Hugging Face's Wav2Vec2ForCTC forward pass in Flax linen.

Module and parameter names mirror the PyTorch model (`wav2vec2/encoder/layers/3/attention/q_proj`), with
Flax leaf names (`kernel`, `scale`), so `convert.py` maps a checkpoint 1:1. The positional convolution keeps
PyTorch's weight-norm parameters (`weight_g`, `weight_v`) in PyTorch layout.

Stochastic parts (dropout, layerdrop, SpecAugment masks) draw from the "dropout" RNG stream and run only
with `deterministic=False`; every shape is static so the whole model jits once per input shape.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import Wav2Vec2Config

from xlsr_jax.config import EXECUTION_OPTIONS
from xlsr_jax.model.layers import Dropout, Dtype, dense_init
from xlsr_jax.model.encoder import Encoder
from xlsr_jax.model.feature_encoder import FeatureEncoder, FeatureProjection
from xlsr_jax.model.layout import to_layout, unstack_layers
from xlsr_jax.model.masking import compute_span_mask


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




def check_options(**options: str) -> None:
    """Reject unknown execution option values, naming the option."""
    for name, value in options.items():
        if value not in EXECUTION_OPTIONS[name]:
            raise ValueError(f"{name}={value!r}: use one of {', '.join(EXECUTION_OPTIONS[name])}")


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


# --- whole model --------------------------------------------------------------------------------------


def has_masked_spec_embed(config: Wav2Vec2Config) -> bool:
    """Hugging Face creates `masked_spec_embed` only when some SpecAugment mask is on."""
    return config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0


class Wav2Vec2Options(nn.Module):
    """A config and the execution options (how the model runs, never what it computes; see
    `FlaxWav2Vec2ForCTC`): the fields of the encoder and of the models around it."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    freeze_feature_encoder: bool = False
    scan_layers: bool = False
    attention: str = "auto"
    pos_conv: str = "auto"


class Wav2Vec2Module(Wav2Vec2Options):
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
        """input_values [batch, samples] -> (hidden [batch, frames, hidden], features [batch, frames,
        conv_dim[-1]], frame_mask bool [batch, frames]). `features` are the layer-normed conv features
        (Hugging Face's `extract_features`), what the pretraining quantizer reads."""
        c = self.config
        remat_convs = self.remat_policy != "none" and not self.freeze_feature_encoder
        features = FeatureEncoder(c, self.dtype, remat_convs, name="feature_extractor")(input_values)
        if self.freeze_feature_encoder:
            # No gradient flows into the conv stack: the same as torch's requires_grad=False, and it saves
            # the backward pass through the most activation-heavy part of the model.
            features = jax.lax.stop_gradient(features)
        frames = features.shape[1]
        if attention_mask is None:
            frame_mask = jnp.ones(features.shape[:2], dtype=bool)
        else:
            frame_mask = frame_mask_from_attention_mask(c, attention_mask, frames)
        hidden, normed = FeatureProjection(c, self.dtype, name="feature_projection")(features, deterministic)
        hidden = self._mask_hidden_states(hidden, frame_mask, deterministic, mask_time_indices)
        hidden = Encoder(c, self.dtype, self.remat_policy, self.scan_layers, self.attention, self.pos_conv,
                         name="encoder")(hidden, frame_mask, deterministic)
        return hidden, normed, frame_mask


class Wav2Vec2Model(Wav2Vec2Options):
    """What the CTC and the pretraining model share around their heads: frame counts and masks, and
    conversion to and from Hugging Face's per-layer parameter layout."""

    def output_lengths(self, sample_lengths):
        """Frames of logits for `sample_lengths` samples (numpy or jax ints)."""
        return feat_extract_output_lengths(self.config, sample_lengths)

    def frame_mask(self, attention_mask, num_frames: int):
        """bool [batch, frames] of real (non-padding) logit frames for an [batch, samples] attention mask."""
        return frame_mask_from_attention_mask(self.config, attention_mask, num_frames)

    def to_hf_layout(self, params):
        """This model's parameters with Hugging Face's per-layer names (what convert.py maps)."""
        return unstack_layers(params)

    def from_hf_layout(self, params):
        """Per-layer parameters (e.g. from `pytorch_to_flax`) in this model's own layout."""
        return to_layout(params, stacked=self.scan_layers)


class FlaxWav2Vec2ForCTC(Wav2Vec2Model):
    """Wav2Vec2 with a CTC head, equal to transformers' `Wav2Vec2ForCTC`.

    Call: `model.apply({"params": params}, input_values [batch, samples], attention_mask=[batch, samples],
    deterministic=True)` -> logits float32 [batch, frames, vocab]. Training passes `deterministic=False`
    and `rngs={"dropout": key}`. Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16).

    How it runs, never what it computes (results are the same either way):
      remat_policy: "none" | "full" | "dots_saveable" | "dots_with_no_batch_dims_saveable": what each
        encoder layer keeps for the backward pass (jax.checkpoint_policies); the conv feature encoder is
        recomputed too unless frozen.
      scan_layers: run the encoder layers under `nn.scan` (compile one layer, not all of them), with
        the layers' parameters stacked; `to_hf_layout` / `from_hf_layout` convert (model/layout.py).
      attention: "xla" | "cudnn" (`jax.nn.dot_product_attention`) | "plain" | "auto" (cuDNN flash
        attention on a GPU in 16-bit compute, else plain). Training with attention dropout runs "plain".
      pos_conv: "auto" | "xla" | "tap_grad" | "isolated" | "fft": the positional conv's implementation (see pos_conv.py).
    """

    def setup(self):
        check_config(self.config)
        check_options(remat_policy=self.remat_policy, attention=self.attention, pos_conv=self.pos_conv)
        self.wav2vec2 = Wav2Vec2Module(
            self.config, self.dtype, self.remat_policy, self.freeze_feature_encoder, self.scan_layers,
            self.attention, self.pos_conv,
        )
        self.final_dropout = Dropout(self.config.final_dropout)
        self.lm_head = nn.Dense(
            self.config.vocab_size, dtype=self.dtype, kernel_init=dense_init(self.config), name="lm_head"
        )

    def __call__(self, input_values, attention_mask=None, deterministic: bool = True, mask_time_indices=None):
        hidden, *_ = self.wav2vec2(input_values, attention_mask, deterministic, mask_time_indices)
        hidden = self.final_dropout(hidden, deterministic=deterministic)
        return self.lm_head(hidden).astype(jnp.float32)

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
