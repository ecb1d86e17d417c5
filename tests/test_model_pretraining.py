"""FlaxWav2Vec2ForPreTraining against transformers' PyTorch Wav2Vec2ForPreTraining, its samplers, its
training-mode quantizer, and its checkpoints both ways."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from _models import padded_batch, tiny_config, xlsr53_config
from xlsr_jax.model import (
    FlaxWav2Vec2ForPreTraining,
    feat_extract_output_lengths,
    flax_to_pytorch,
    gumbel_temperature,
    load_pretrained,
    pytorch_to_flax,
    sample_mask_time_indices,
    sample_negative_indices,
    save_pytorch_weights,
)
from xlsr_jax.model.pretraining import GumbelVectorQuantizer

QUANTITIES = ("loss", "contrastive_loss", "diversity_loss", "codevector_perplexity")
# Small heads: 2 groups of 8 codes make a negative with the positive's codes common (the -inf rule acts).
_HEADS = dict(codevector_dim=24, proj_codevector_dim=20, num_codevector_groups=2, num_codevectors_per_group=8,
              num_negatives=6, mask_time_prob=0.5, mask_time_length=3, mask_time_min_masks=2)
LENGTHS, TOTAL = [4000, 2500, 1234], 4000


def pretraining_config(kind: str = "stable", **overrides):
    return tiny_config(kind, **{**_HEADS, **overrides})


@dataclasses.dataclass
class Case:
    reference: Wav2Vec2ForPreTraining
    model: FlaxWav2Vec2ForPreTraining
    params: dict
    apply: object  # jitted model.apply, eval mode
    x: np.ndarray
    attention_mask: np.ndarray
    frame_mask: np.ndarray
    mask_time_indices: np.ndarray
    negatives: np.ndarray

    def torch_output(self, mask_time_indices=None, negatives=None, reference=None):
        mask = self.mask_time_indices if mask_time_indices is None else mask_time_indices
        negatives = self.negatives if negatives is None else negatives
        with torch.no_grad():
            return (reference or self.reference)(
                torch.from_numpy(self.x), attention_mask=torch.from_numpy(self.attention_mask),
                mask_time_indices=torch.from_numpy(np.array(mask)),
                sampled_negative_indices=torch.from_numpy(np.array(negatives)).long())

    def flax_output(self, mask_time_indices=None, negatives=None):
        mask = self.mask_time_indices if mask_time_indices is None else mask_time_indices
        negatives = self.negatives if negatives is None else negatives
        return self.apply({"params": self.params}, self.x, mask, negatives, attention_mask=self.attention_mask)


def _hf_inputs(reference, attention_mask, mask_prob, mask_length, seed=0):
    """Hugging Face's numpy masks and negatives (negatives from every real frame), as its example makes them."""
    frames = int(reference._get_feat_extract_output_lengths(attention_mask.shape[1]))
    frame_mask = reference._get_feature_vector_attention_mask(frames, torch.from_numpy(attention_mask)).numpy()
    np.random.seed(seed)
    mask = _compute_mask_indices((len(attention_mask), frames), mask_prob, mask_length,
                                 attention_mask=torch.from_numpy(frame_mask.astype(np.int64)), min_masks=2)
    negatives = _sample_negative_indices((len(attention_mask), frames), reference.config.num_negatives,
                                         mask_time_indices=frame_mask)
    return frame_mask, mask, negatives


def _case(config, lengths, total, mask_prob, perturb=0.3, **options) -> Case:
    torch.manual_seed(0)
    reference = Wav2Vec2ForPreTraining(config).eval()
    if perturb:  # far from the init: attention, the positional conv and each layer shape the loss
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(perturb * torch.randn_like(p))
    model = FlaxWav2Vec2ForPreTraining(config, **options)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    params, missing, unexpected = pytorch_to_flax(state, model.to_hf_layout(model.abstract_params()))
    assert missing == [] and unexpected == []
    x, attention_mask = padded_batch(lengths, total)
    frame_mask, mask, negatives = _hf_inputs(reference, attention_mask, mask_prob, config.mask_time_length)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    return Case(reference, model, model.from_hf_layout(params), apply, x, attention_mask, frame_mask, mask,
                negatives)


def _relative_errors(case: Case) -> dict[str, float]:
    expected, got = case.torch_output(), case.flax_output()
    return {name: abs(float(getattr(got, name)) - float(getattr(expected, name))) / abs(float(getattr(expected, name)))
            for name in QUANTITIES}


@pytest.fixture(scope="module", params=["stable", "group"])
def case(request) -> Case:
    return _case(pretraining_config(request.param), LENGTHS, TOTAL, mask_prob=0.5)


# ---------------------------------------------------------------- parity with PyTorch, eval mode

def test_losses_equal_pytorch_tiny(case, report):
    errors = _relative_errors(case)
    kind = case.model.config.feat_extract_norm
    for name, error in errors.items():
        report(f"pretraining parity {kind}-norm tiny, |d{name}| / |{name}|", error)
    assert max(errors.values()) <= 1e-4, errors


def test_parity_inputs_exercise_every_rule(case):
    """The parity above means something: several codes per group, the -inf rule acts on masked frames, a
    padded batch, and a mask that leaves real frames unmasked."""
    out = case.torch_output()
    quantized = out.projected_quantized_states
    dim = quantized.shape[-1]
    negatives = quantized.reshape(-1, dim)[torch.from_numpy(case.negatives).long().reshape(-1)]
    neg_is_pos = (negatives.reshape(*case.negatives.shape, dim) == quantized[:, :, None]).all(-1).numpy()
    assert (neg_is_pos & case.mask_time_indices[..., None]).any()
    assert not neg_is_pos[case.mask_time_indices].all()
    with torch.no_grad():
        features = case.reference.wav2vec2(torch.from_numpy(case.x)).extract_features
        logits = case.reference.quantizer.weight_proj(features)
    groups, num_vars = case.model.config.num_codevector_groups, case.model.config.num_codevectors_per_group
    codes = logits.reshape(*logits.shape[:2], groups, num_vars).argmax(-1).numpy()[case.mask_time_indices]
    assert all(len(np.unique(codes[:, g])) > 1 for g in range(groups))
    assert 1.0 < float(out.codevector_perplexity) < groups * num_vars
    assert (~case.frame_mask).any() and (case.frame_mask & ~case.mask_time_indices).any()


def test_jax_samplers_feed_pytorch_the_same_way(case):
    """Masks and negatives drawn by the JAX samplers index the batch as Hugging Face's do: both models
    agree on them."""
    config = case.model.config
    mask_key, negatives_key = jax.random.split(jax.random.key(3))
    mask = np.asarray(sample_mask_time_indices(mask_key, jnp.asarray(case.frame_mask), config))
    negatives = np.asarray(sample_negative_indices(negatives_key, jnp.asarray(case.frame_mask), config.num_negatives))
    expected = case.torch_output(mask, negatives)
    got = case.flax_output(mask, negatives)
    for name in QUANTITIES:
        np.testing.assert_allclose(float(getattr(got, name)), float(getattr(expected, name)), rtol=1e-4, err_msg=name)


def test_masked_padding_frames_do_not_count(case):
    """Frames past a clip's end count neither in the contrastive loss nor in the perplexity, even when the
    mask covers them (Hugging Face's dummy span index for a clip shorter than a span does)."""
    into_padding = case.mask_time_indices | ~case.frame_mask
    inside, covering = case.flax_output(), case.flax_output(mask_time_indices=into_padding)
    assert int(covering.num_masked) == int(case.mask_time_indices.sum())
    for name in QUANTITIES:
        np.testing.assert_allclose(float(getattr(covering, name)), float(getattr(inside, name)), rtol=1e-6,
                                   err_msg=name)


@pytest.mark.slow
def test_losses_equal_pytorch_xlsr53_shape(report):
    config = xlsr53_config(codevector_dim=768, proj_codevector_dim=768, num_codevector_groups=2,
                           num_codevectors_per_group=320)
    case = _case(config, [16000, 9600], 16000, mask_prob=0.65, perturb=0.0, scan_layers=True)
    errors = _relative_errors(case)
    for name, error in errors.items():
        report(f"pretraining parity XLSR-53 shape (1 s, scanned), |d{name}| / |{name}|", error)
    assert max(errors.values()) <= 1e-4, errors


# ---------------------------------------------------------------- samplers and schedule

def test_negatives_are_other_candidates_of_the_same_row():
    frames, num_negatives = 12, 4000
    candidates = np.zeros((4, frames), bool)
    candidates[0, :9] = True  # a padded row
    candidates[1, [1, 4, 5, 10]] = True  # a time mask, not a prefix
    candidates[2, 7] = True  # one candidate: nothing else to draw
    sample = jax.jit(sample_negative_indices, static_argnums=2)
    negatives = np.asarray(sample(jax.random.key(0), jnp.asarray(candidates), num_negatives))
    assert negatives.shape == (4, frames, num_negatives) and negatives.dtype == np.int32
    row, local = np.divmod(negatives, frames)
    assert (row == np.arange(4)[:, None, None]).all(), "a negative from another utterance"
    for b in (0, 1):
        allowed = np.flatnonzero(candidates[b])
        assert np.isin(local[b], allowed).all(), "a negative outside the candidates (padding)"
        for t in range(frames):
            others = allowed[allowed != t]
            assert not (candidates[b, t] and t in local[b, t]), "a candidate drew itself"
            # Uniform over the other candidates: each count binomial(num_negatives, p), within 5 sigma.
            counts = np.bincount(local[b, t], minlength=frames)[others]
            p = 1 / len(others)
            sigma = np.sqrt(num_negatives * p * (1 - p))
            assert np.abs(counts - num_negatives * p).max() < 5 * sigma, (b, t, counts)
    assert (local[2] == 7).all()  # the lone candidate, itself included: the loss gives it -inf
    assert (local[3] == np.arange(frames)[:, None]).all()  # no candidate: each frame itself


def test_time_mask_sampler_stays_in_real_frames_with_counts_from_config():
    config = pretraining_config(mask_time_prob=0.3, mask_time_length=3, mask_time_min_masks=2)
    lengths = np.array([40, 25, 7, 3])
    frame_mask = np.arange(40)[None, :] < lengths[:, None]
    masks = np.stack([np.asarray(sample_mask_time_indices(jax.random.key(s), jnp.asarray(frame_mask), config))
                      for s in range(20)])  # [draws, batch, frames]
    assert not (masks & ~frame_mask).any(), "a mask reached into padding"
    counts = masks.sum(-1)
    spans_at_most = np.maximum(np.floor(0.3 * lengths / 3 + 1), 2)
    assert (counts <= spans_at_most * 3).all()
    assert (counts[:, :3] >= 3).all() and (counts[:, 3] == 3).all()  # min_masks: at least one span
    assert (masks.sum(0) > 0)[frame_mask].mean() > 0.8  # every real frame gets masked at some draw
    heavier = np.asarray(sample_mask_time_indices(jax.random.key(0), jnp.asarray(frame_mask), config, mask_prob=0.9))
    assert heavier[0].sum() > 15  # 0.3 allows at most 5 spans of 3 in 40 frames


def test_gumbel_temperature_schedule():
    assert float(gumbel_temperature(0)) == pytest.approx(2.0)
    for step in (10_000, 150_000):  # float32 all the way would be off by 7e-5 and 1e-3
        assert float(gumbel_temperature(step)) == pytest.approx(2.0 * 0.999995 ** step, rel=1e-6)
    assert float(gumbel_temperature(10**7)) == pytest.approx(0.5)
    assert float(jax.jit(lambda step: gumbel_temperature(step, 4.0, 0.1, 0.5))(jnp.int32(100))) == pytest.approx(0.1)
    assert float(gumbel_temperature(1, max_gumbel_temperature=4.0, gumbel_temperature_decay=0.5)) == pytest.approx(2.0)


# ---------------------------------------------------------------- the quantizer in training mode

@pytest.fixture(scope="module")
def quantizer():
    config = pretraining_config()
    module = GumbelVectorQuantizer(config)
    features = jax.random.normal(jax.random.key(0), (1, 1, config.conv_dim[-1]))
    params = module.init(jax.random.key(1), features, jnp.ones((1, 1), bool))["params"]

    @jax.jit
    def run(params, features, weights, key, temperature):
        return module.apply({"params": params}, features, weights, False, temperature, rngs={"gumbel": key})
    return config, params, run


def test_gumbel_choices_are_hard_and_follow_the_softmax(quantizer):
    """Gumbel-max: over many frames of one feature vector, each code is drawn with its softmax
    probability; the forward value is exactly the chosen codevector; the perplexity is the softmax's."""
    config, params, run = quantizer
    groups, num_vars = config.num_codevector_groups, config.num_codevectors_per_group
    frames = 20_000
    feature = 0.25 * jax.random.normal(jax.random.key(2), (config.conv_dim[-1],))  # a spread softmax
    features = jnp.broadcast_to(feature, (1, frames, feature.shape[0]))
    vectors, codes, perplexity = run(params, features, jnp.ones((1, frames), bool), jax.random.key(3), 2.0)
    kernel, bias = params["weight_proj"]["kernel"], params["weight_proj"]["bias"]
    probs = np.asarray(jax.nn.softmax((feature @ kernel + bias).reshape(groups, num_vars), -1))
    frequencies = np.stack([np.bincount(np.asarray(codes)[0, :, g], minlength=num_vars) / frames
                            for g in range(groups)])
    np.testing.assert_allclose(frequencies, probs, atol=0.015)
    assert (probs.max(-1) < 0.9).all(), "a near one-hot softmax would not test the sampling"
    book = np.asarray(params["codevectors"]).reshape(groups, num_vars, -1)
    chosen = np.concatenate([book[g][np.asarray(codes)[0, :, g]] for g in range(groups)], -1)
    np.testing.assert_array_equal(np.asarray(vectors)[0], chosen)
    entropy = -(probs * np.log(probs)).sum(-1)
    assert float(perplexity) == pytest.approx(float(np.exp(entropy).sum()), rel=1e-5)


def test_straight_through_gradient_uses_the_temperature(quantizer):
    config, params, run = quantizer
    features = jax.random.normal(jax.random.key(4), (2, 30, config.conv_dim[-1]))
    weights = jnp.ones((2, 30), bool)
    target = jax.random.normal(jax.random.key(5), (2, 30, config.codevector_dim))

    def grads(temperature, key=6):
        def loss(p):
            vectors, _, _ = run(p, features, weights, jax.random.key(key), temperature)
            return jnp.sum(vectors * target)
        return jax.grad(loss)(params)

    cold, warm = grads(0.5), grads(2.0)
    assert np.abs(np.asarray(warm["weight_proj"]["kernel"])).max() > 0, "no gradient through the choice"
    assert not np.allclose(cold["weight_proj"]["kernel"], warm["weight_proj"]["kernel"])
    # The codebook gets gradient only on the rows chosen (the forward value is exactly one-hot).
    _, codes, _ = run(params, features, weights, jax.random.key(6), 2.0)
    groups, num_vars = config.num_codevector_groups, config.num_codevectors_per_group
    used = np.zeros(groups * num_vars, bool)
    for g in range(groups):
        used[g * num_vars + np.unique(np.asarray(codes)[..., g])] = True
    book_grad = np.abs(np.asarray(warm["codevectors"])[0]).sum(-1)
    assert (book_grad[used] > 0).all() and (book_grad[~used] == 0).all()
    other_codes = run(params, features, weights, jax.random.key(7), 2.0)[1]
    assert (np.asarray(other_codes) != np.asarray(codes)).any(), "the choice does not depend on the rng"


@pytest.mark.slow  # compiles the whole model's gradients
def test_training_step_gives_finite_loss_and_gradients_everywhere():
    config = pretraining_config(hidden_dropout=0.1, feat_quantizer_dropout=0.1)
    model = FlaxWav2Vec2ForPreTraining(config)
    params = model.init_params(jax.random.key(0))
    x, attention_mask = padded_batch([4000, 2500], 4000)
    frames = int(feat_extract_output_lengths(config, 4000))
    frame_mask = model.frame_mask(attention_mask, frames)
    keys = jax.random.split(jax.random.key(1), 4)
    mask = sample_mask_time_indices(keys[0], frame_mask, config)
    negatives = sample_negative_indices(keys[1], frame_mask, config.num_negatives)

    def loss(p):
        out = model.apply({"params": p}, x, mask, negatives, attention_mask=attention_mask, deterministic=False,
                          gumbel_temperature=gumbel_temperature(0), rngs={"dropout": keys[2], "gumbel": keys[3]})
        return out.loss, out
    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value)) and int(out.num_masked) == int(np.asarray(mask).sum())
    assert 1.0 < float(out.codevector_perplexity) < 16.0
    flat = traverse_util.flatten_dict(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
    for path in [("quantizer", "weight_proj", "kernel"), ("quantizer", "codevectors"), ("project_q", "kernel"),
                 ("project_hid", "kernel"), ("wav2vec2", "masked_spec_embed")]:
        assert np.abs(np.asarray(flat[path])).max() > 0, "/".join(path)


# ---------------------------------------------------------------- checkpoints both ways

@pytest.fixture(scope="module")
def stable_case() -> Case:
    return _case(pretraining_config("stable"), LENGTHS, TOTAL, mask_prob=0.5)


def test_torch_flax_torch_round_trip_is_bit_exact(stable_case):
    state = {k: v.detach().numpy() for k, v in stable_case.reference.state_dict().items()}
    back = flax_to_pytorch(stable_case.params)
    assert sorted(back) == sorted(state)
    assert back["quantizer.codevectors"].shape == (1, 16, 12)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_our_folder_loads_in_pytorch_with_equal_loss(stable_case, tmp_path):
    save_pytorch_weights(stable_case.params, stable_case.model.config, tmp_path)
    reference = Wav2Vec2ForPreTraining.from_pretrained(tmp_path).eval()
    assert reference.config.architectures == ["Wav2Vec2ForPreTraining"]
    expected, got = stable_case.torch_output(reference=reference), stable_case.flax_output()
    for name in QUANTITIES:
        np.testing.assert_allclose(float(getattr(got, name)), float(getattr(expected, name)), rtol=1e-4, err_msg=name)


def test_hf_pretraining_folder_loads_whole_with_equal_loss(stable_case, tmp_path):
    stable_case.reference.save_pretrained(tmp_path)
    model, params = load_pretrained(tmp_path, head="pretraining")
    assert isinstance(model, FlaxWav2Vec2ForPreTraining)
    flat, ours = traverse_util.flatten_dict(params), traverse_util.flatten_dict(stable_case.params)
    assert sorted(flat) == sorted(ours)
    for path in ours:
        np.testing.assert_array_equal(flat[path], ours[path], err_msg="/".join(path))
    got = jax.jit(model.apply)({"params": params}, stable_case.x, stable_case.mask_time_indices,
                               stable_case.negatives, attention_mask=stable_case.attention_mask)
    expected = stable_case.torch_output()
    for name in QUANTITIES:
        np.testing.assert_allclose(float(getattr(got, name)), float(getattr(expected, name)), rtol=1e-4, err_msg=name)


def test_ctc_loading_still_drops_the_pretraining_heads(stable_case, tmp_path):
    stable_case.reference.save_pretrained(tmp_path)
    model, params = load_pretrained(tmp_path, vocab_size=12)
    assert set(params) == {"wav2vec2", "lm_head"}
    encoder = traverse_util.flatten_dict(params["wav2vec2"])
    for path, value in traverse_util.flatten_dict(stable_case.params["wav2vec2"]).items():
        np.testing.assert_array_equal(encoder[path], value, err_msg="/".join(path))


def test_pretraining_head_refuses_a_ctc_checkpoint(tmp_path):
    Wav2Vec2ForCTC(pretraining_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks \d+ parameters.*quantizer.*Wav2Vec2ForPreTraining checkpoint"):
        load_pretrained(tmp_path, head="pretraining")
    with pytest.raises(ValueError, match="head='mlm'"):
        load_pretrained(tmp_path, head="mlm")
