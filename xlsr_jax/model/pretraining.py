"""FlaxWav2Vec2ForPreTraining: Hugging Face's Wav2Vec2ForPreTraining (wav2vec 2.0's masked contrastive task).

Parameter names mirror the PyTorch model, so `convert.py` maps a checkpoint such as XLSR-53 1:1:
    wav2vec2/...                    the shared encoder (`Wav2Vec2Module`, with `masked_spec_embed`)
    quantizer/codevectors           [1, groups * vars, codevector_dim // groups]
    quantizer/weight_proj/{kernel, bias}   conv_dim[-1] -> groups * vars
    project_hid/{kernel, bias}      hidden_size -> proj_codevector_dim
    project_q/{kernel, bias}        codevector_dim -> proj_codevector_dim
(`dropout_features` has no parameters.)

Like Hugging Face's forward, the model takes the time mask and the negatives' indices as inputs, so a parity
test can pass the same arrays to both. `sample_mask_time_indices` and `sample_negative_indices` draw them with
jax.random on static shapes, inside a jitted training step.

Two deliberate differences from Hugging Face, both only where its own rule misbehaves:
- the loss and the perplexity count masked frames that are also real frames (`mask & frame_mask`);
  Hugging Face's numpy mask only reaches padding through its dummy index for a clip shorter than a span;
- "a negative equal to the positive" compares the quantizer's code indices, not the projected vectors: the
  same thing in eval mode, and in training it does not depend on how two matmul rows round.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from transformers import Wav2Vec2Config

from xlsr_jax.model.layers import Dropout, Dtype, uniform
from xlsr_jax.model.masking import compute_span_mask
from xlsr_jax.model.wav2vec2 import Wav2Vec2Model, Wav2Vec2Module, check_options, receptive_field


def gumbel_temperature(step, max_gumbel_temperature: float = 2.0, min_gumbel_temperature: float = 0.5,
                       gumbel_temperature_decay: float = 0.999995):
    """max(start * decay^step, min): the schedule of fairseq and Hugging Face's pretraining example (their
    defaults). `step` may be a traced int, the three constants are Python floats; a float32 scalar."""
    # decay^step as exp(step * log(decay)), log taken in float64: 0.999995 rounded to float32 and raised to
    # the 10_000th power is off by 7e-5 (1e-3 by step 100_000).
    step = jnp.asarray(step, jnp.float32)
    return jnp.maximum(max_gumbel_temperature * jnp.exp(step * math.log(gumbel_temperature_decay)),
                       min_gumbel_temperature)


# --- masks and negatives, sampled inside jit ------------------------------------------------------------


def sample_mask_time_indices(rng: jax.Array, frame_mask: jax.Array, config: Wav2Vec2Config,
                             mask_prob: float | None = None) -> jax.Array:
    """bool [batch, frames]: time spans to mask, only inside each row's real frames.

    `frame_mask` bool [batch, frames]. `config.mask_time_prob` (or `mask_prob`), `mask_time_length` and
    `mask_time_min_masks` follow Hugging Face's `_compute_mask_indices` (see masking.py).
    """
    prob = config.mask_time_prob if mask_prob is None else mask_prob
    return compute_span_mask(rng, frame_mask.sum(-1), frame_mask.shape[1], prob, config.mask_time_length,
                             config.mask_time_min_masks)


def sample_negative_indices(rng: jax.Array, candidates: jax.Array, num_negatives: int) -> jax.Array:
    """int32 [batch, frames, num_negatives]: for every frame, negatives drawn uniformly with replacement from
    its own row's `candidates` (bool [batch, frames]), never the frame itself; Hugging Face's
    `_sample_negative_indices(..., mask_time_indices=candidates)` rule.

    Indices point into the batch flattened to [batch * frames], as Hugging Face's do. Pass the frame mask as
    `candidates` to draw from every real frame, or the time mask to draw from masked frames only (fairseq).
    A frame whose row has no other candidate gets itself (the loss then gives that negative -inf).
    """
    batch, frames = candidates.shape
    count = candidates.sum(-1, keepdims=True)  # [batch, 1]
    rank = jnp.cumsum(candidates, -1) - 1  # a candidate's position among its row's candidates
    others = jnp.where(candidates, count - 1, count)  # how many choices exclude the frame itself
    u = jax.random.uniform(rng, (batch, frames, num_negatives))
    pick = jnp.minimum(jnp.floor(u * others[..., None]), jnp.maximum(others - 1, 0)[..., None]).astype(jnp.int32)
    # Skip over the frame's own rank: uniform over the other candidates, as Hugging Face's `+= 1`.
    pick = pick + (candidates[..., None] & (pick >= rank[..., None]) & (others[..., None] > 0))
    order = jnp.argsort(~candidates, axis=-1, stable=True)  # candidates' frame indices first, in order
    chosen = jnp.take_along_axis(order, pick.reshape(batch, -1), axis=-1).reshape(batch, frames, num_negatives)
    chosen = jnp.where(others[..., None] > 0, chosen, jnp.arange(frames)[None, :, None])
    return (chosen + frames * jnp.arange(batch)[:, None, None]).astype(jnp.int32)


# --- the quantizer and the losses -----------------------------------------------------------------------


def check_pretraining_config(config: Wav2Vec2Config) -> None:
    """Reject configs this model does not implement, naming the key."""
    if config.feat_extract_norm not in ("layer", "group"):
        raise ValueError(f"config.feat_extract_norm={config.feat_extract_norm!r}: must be 'layer' or 'group'")
    if getattr(config, "add_adapter", False) or getattr(config, "adapter_attn_dim", None) is not None:
        raise ValueError("config.add_adapter / adapter_attn_dim (adapters) are not supported")
    if config.codevector_dim % config.num_codevector_groups:
        raise ValueError(f"config.codevector_dim={config.codevector_dim} must be divisible by "
                         f"config.num_codevector_groups={config.num_codevector_groups}")


def _plogp(p: jax.Array) -> jax.Array:
    """p * log(p) with 0 at p = 0, value and gradient (the double `where` keeps log(0) out of the grad)."""
    positive = p > 0
    return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def codevector_perplexity(probs: jax.Array, weights: jax.Array) -> jax.Array:
    """sum over groups of exp(entropy of the mean code distribution over the counted frames), a scalar.

    probs float32 [batch, frames, groups, vars]; weights bool [batch, frames] (the frames that count).
    Hugging Face's `_compute_perplexity(probs, mask)`; with no counted frame the mean is taken as zeros.
    """
    counted = jnp.where(weights[..., None, None], probs, 0.0).sum((0, 1))  # [groups, vars]
    marginal = counted / jnp.maximum(weights.sum(), 1)
    return jnp.exp(-_plogp(marginal).sum(-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer with Gumbel-softmax choices: Hugging Face's `Wav2Vec2GumbelVectorQuantizer`."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, weights, deterministic: bool = True, temperature=2.0):
        """features [batch, frames, conv_dim[-1]], weights bool [batch, frames] (frames the perplexity counts)
        -> (codevectors [batch, frames, codevector_dim], codes int32 [batch, frames, groups], perplexity []).

        Training (`deterministic=False`, rng stream "gumbel"): hard straight-through Gumbel-softmax at
        `temperature`, perplexity of the plain softmax. Eval: argmax, perplexity of the one-hot choices.
        """
        c = self.config
        groups, num_vars = c.num_codevector_groups, c.num_codevectors_per_group
        codebook = self.param("codevectors", nn.initializers.uniform(1.0),
                              (1, groups * num_vars, c.codevector_dim // groups))
        logits = nn.Dense(groups * num_vars, dtype=self.dtype, kernel_init=nn.initializers.normal(1.0),
                          name="weight_proj")(features)
        logits = logits.astype(jnp.float32).reshape(*features.shape[:2], groups, num_vars)
        if deterministic:
            codes = jnp.argmax(logits, -1)
            probs = jax.nn.one_hot(codes, num_vars, dtype=jnp.float32)
            perplexity = codevector_perplexity(probs, weights)
        else:
            noisy = logits + jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
            codes = jnp.argmax(noisy, -1)
            soft = jax.nn.softmax(noisy / temperature, -1)
            # Forward value exactly one-hot (soft - soft == 0), gradient of the soft choice.
            probs = jax.nn.one_hot(codes, num_vars, dtype=jnp.float32) + (soft - jax.lax.stop_gradient(soft))
            perplexity = codevector_perplexity(jax.nn.softmax(logits, -1), weights)
        book = codebook.reshape(groups, num_vars, -1).astype(jnp.float32)
        vectors = jnp.einsum("btgv,gvd->btgd", probs, book, precision=jax.lax.Precision.HIGHEST)
        return vectors.reshape(*features.shape[:2], -1).astype(self.dtype), codes.astype(jnp.int32), perplexity


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """torch.cosine_similarity over the last axis (each norm clamped at eps)."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return (a * b).sum(-1)


def contrastive_loss(predicted, quantized, codes, negative_indices, weights, temperature: float):
    """Sum over counted frames of -log softmax(cos(c_t, [q_t, negatives]) / temperature)[positive].

    predicted, quantized float32 [batch, frames, proj_dim]; codes int [batch, frames, groups];
    negative_indices int [batch, frames, K] into the flattened [batch * frames]; weights bool [batch, frames].
    A negative with the positive's codes gets logit -inf (Hugging Face's rule). Returns a float32 scalar.
    """
    batch, frames, dim = quantized.shape
    flat_index = negative_indices.reshape(-1)
    negatives = quantized.reshape(-1, dim)[flat_index].reshape(batch, frames, -1, dim)
    negative_codes = codes.reshape(batch * frames, -1)[flat_index].reshape(batch, frames, -1, codes.shape[-1])
    targets = jnp.concatenate([quantized[:, :, None], negatives], axis=2)  # [batch, frames, 1 + K, dim]
    logits = _cosine(predicted[:, :, None], targets) / temperature
    neg_is_pos = (negative_codes == codes[:, :, None]).all(-1)  # [batch, frames, K]
    logits = logits.at[..., 1:].set(jnp.where(neg_is_pos, -jnp.inf, logits[..., 1:]))
    nll = -jax.nn.log_softmax(logits, -1)[..., 0]
    return jnp.where(weights, nll, 0.0).sum()


@struct.dataclass
class PreTrainingOutput:
    """What `FlaxWav2Vec2ForPreTraining` returns; every loss is a float32 scalar summed over masked frames.

    loss: contrastive_loss + config.diversity_loss_weight * diversity_loss.
    diversity_loss: (num_codevectors - codevector_perplexity) / num_codevectors * num_masked.
    codevector_perplexity: over the masked real frames (soft choices in training, hard in eval).
    num_masked: int32 scalar, the masked real frames the losses sum over.
    projected_states, projected_quantized_states: float32 [batch, frames, proj_codevector_dim].
    """

    loss: jax.Array
    contrastive_loss: jax.Array
    diversity_loss: jax.Array
    codevector_perplexity: jax.Array
    num_masked: jax.Array
    projected_states: jax.Array
    projected_quantized_states: jax.Array


# --- whole model ----------------------------------------------------------------------------------------


def _linear_init(fan_in: int) -> dict[str, Any]:
    """torch.nn.Linear's default initialisation (U(±1/sqrt(fan_in)) for weight and bias)."""
    limit = fan_in ** -0.5
    return dict(kernel_init=uniform(limit), bias_init=uniform(limit))


class FlaxWav2Vec2ForPreTraining(Wav2Vec2Model):
    """Wav2Vec2 with the quantizer and contrastive heads, equal to transformers' `Wav2Vec2ForPreTraining`.

    Call: `model.apply({"params": params}, input_values [batch, samples], mask_time_indices bool
    [batch, frames], sampled_negative_indices int [batch, frames, num_negatives] (into [batch * frames]),
    attention_mask=[batch, samples], deterministic=True)` -> `PreTrainingOutput`. Training passes
    `deterministic=False`, `gumbel_temperature=gumbel_temperature(step)` and
    `rngs={"dropout": key, "gumbel": key}`. The execution options are `FlaxWav2Vec2ForCTC`'s.
    """

    def setup(self):
        c = self.config
        check_pretraining_config(c)
        check_options(remat_policy=self.remat_policy, attention=self.attention, pos_conv=self.pos_conv)
        self.wav2vec2 = Wav2Vec2Module(c, self.dtype, self.remat_policy, self.freeze_feature_encoder,
                                       self.scan_layers, self.attention, self.pos_conv)
        self.dropout_features = Dropout(c.feat_quantizer_dropout)
        self.quantizer = GumbelVectorQuantizer(c, self.dtype)
        self.project_hid = nn.Dense(c.proj_codevector_dim, dtype=self.dtype, **_linear_init(c.hidden_size))
        self.project_q = nn.Dense(c.proj_codevector_dim, dtype=self.dtype, **_linear_init(c.codevector_dim))

    def __call__(self, input_values, mask_time_indices, sampled_negative_indices, attention_mask=None,
                 deterministic: bool = True, gumbel_temperature=2.0) -> PreTrainingOutput:
        c = self.config
        mask_time_indices = mask_time_indices.astype(bool)
        hidden, features, frame_mask = self.wav2vec2(input_values, attention_mask, deterministic, mask_time_indices)
        predicted = self.project_hid(hidden).astype(jnp.float32)
        features = self.dropout_features(features, deterministic=deterministic)
        counted = mask_time_indices & frame_mask
        codevectors, codes, perplexity = self.quantizer(features, counted, deterministic, gumbel_temperature)
        quantized = self.project_q(codevectors).astype(jnp.float32)
        contrastive = contrastive_loss(predicted, quantized, codes, sampled_negative_indices, counted,
                                       c.contrastive_logits_temperature)
        num_codevectors = c.num_codevectors_per_group * c.num_codevector_groups
        num_masked = counted.sum().astype(jnp.int32)
        diversity = (num_codevectors - perplexity) / num_codevectors * num_masked
        return PreTrainingOutput(
            loss=contrastive + c.diversity_loss_weight * diversity, contrastive_loss=contrastive,
            diversity_loss=diversity, codevector_perplexity=perplexity, num_masked=num_masked,
            projected_states=predicted, projected_quantized_states=quantized,
        )

    def _init(self, rng, num_samples: int):
        dummy = jnp.zeros((1, num_samples), jnp.float32)
        # One masked frame: `masked_spec_embed` is created whatever the config's mask_time_prob.
        mask = jnp.ones((1, 1), bool)
        negatives = jnp.zeros((1, 1, self.config.num_negatives), jnp.int32)
        return self.init(rng, dummy, mask, negatives, deterministic=True)["params"]

    def init_params(self, rng: jax.Array) -> dict:
        """Random float32 parameters (Hugging Face's initialisation), as a nested dict of arrays."""
        return jax.jit(lambda r: self._init(r, receptive_field(self.config)))(rng)

    def abstract_params(self) -> dict:
        """Parameter shapes/dtypes (jax.ShapeDtypeStruct pytree) without computing anything."""
        return jax.eval_shape(lambda r: self._init(r, receptive_field(self.config)), jax.random.key(0))
