"""FlaxWav2Vec2ForCTC against transformers' PyTorch Wav2Vec2ForCTC, and its training-mode behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForCTC

from _models import FAMILIES, family_config, forward, padded_batch, quiet_config, tiny_config, xlsr53_config
from xlsr_jax.model import FlaxWav2Vec2ForCTC, pytorch_to_flax
from xlsr_jax.model.wav2vec2 import frame_mask_from_attention_mask


def _torch_and_flax(config, seed=0, perturb=False, **options):
    torch.manual_seed(seed)
    reference = Wav2Vec2ForCTC(config).eval()
    if perturb:  # far from the near-zero init, where attention and the positional conv shape the logits
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.3 * torch.randn_like(p))
    model = FlaxWav2Vec2ForCTC(config, **options)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    params, missing, unexpected = pytorch_to_flax(state, model.to_hf_layout(model.abstract_params()))
    assert missing == [] and unexpected == []
    return reference, model, model.from_hf_layout(params)


def _max_logit_error(config, lengths, total, perturb=False, **options):
    """max |flax - torch| over real frames, relative to the largest torch logit when `perturb`."""
    reference, model, params = _torch_and_flax(config, perturb=perturb, **options)
    x, mask = padded_batch(lengths, total)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits.numpy()
    logits = np.asarray(jax.jit(model.apply, static_argnames="deterministic")(
        {"params": params}, x, attention_mask=mask, deterministic=True))
    assert logits.shape == expected.shape
    frames = np.asarray(frame_mask_from_attention_mask(config, mask, logits.shape[1]))
    with torch.no_grad():
        torch_frames = reference._get_feature_vector_attention_mask(logits.shape[1], torch.from_numpy(mask))
    np.testing.assert_array_equal(frames, torch_frames.numpy())
    error = float(np.abs(logits - expected)[frames].max())
    return error / float(np.abs(expected[frames]).max()) if perturb else error


@pytest.mark.parametrize("kind", ["stable", "group"])
def test_logits_equal_pytorch_tiny(kind, report):
    error = _max_logit_error(tiny_config(kind), lengths=[4000, 2500, 1234], total=4000)
    report(f"parity max|dlogits| tiny {kind}", error)
    assert error <= 1e-4


@pytest.mark.slow
def test_logits_equal_pytorch_xlsr53_shape(report):
    config = xlsr53_config()
    error = _max_logit_error(config, lengths=[16000, 9600], total=16000, scan_layers=True)
    report("parity max|dlogits| XLSR-53 shape (24x1024, 1 s, scanned)", error)
    assert error <= 1e-4


@pytest.mark.slow  # builds each family's width in torch and in Flax
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_loads_from_its_folder_and_equals_pytorch(family, tmp_path, report):
    """A Hugging Face folder of each family's architecture (perturbed random weights, 2 of its encoder layers:
    the per-layer arithmetic is the same at any depth, and 48 layers of 1920 do not fit this CPU's tests),
    loaded by `load_pretrained`, gives transformers' logits."""
    from xlsr_jax.model import load_pretrained

    config = family_config(family, layers=2)
    torch.manual_seed(0)
    reference = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    model, params = load_pretrained(tmp_path, options={"scan_layers": True})
    x, mask = padded_batch([16000, 9600], 16000)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits.numpy()
    logits = np.asarray(jax.jit(model.apply, static_argnames="deterministic")(
        {"params": params}, x, attention_mask=mask, deterministic=True))
    frames = np.asarray(frame_mask_from_attention_mask(config, mask, logits.shape[1]))
    error = float(np.abs(logits - expected)[frames].max()) / float(np.abs(expected[frames]).max())
    report(f"parity {family} (2 layers of {config.hidden_size}, 1 s), max|dlogits| / max|logit|", error)
    assert model.config.hidden_size == FAMILIES[family][0] and error <= 1e-4


@pytest.mark.parametrize("kind", ["stable", "group"])
@pytest.mark.parametrize("options", [{}, {"scan_layers": True, "attention": "xla"},
                                     {"scan_layers": True, "attention": "plain"}], ids=["unrolled", "scan", "plain"])
def test_logits_equal_pytorch_with_perturbed_weights(kind, options, report):
    error = _max_logit_error(tiny_config(kind), lengths=[4000, 2500, 1234], total=4000, perturb=True, **options)
    report(f"parity perturbed {kind} {options}, max|dlogits| / max|logit|", error)
    assert error <= 1e-5


@pytest.mark.slow  # compiles the whole model in training mode
def test_train_mode_without_noise_equals_eval():
    model = FlaxWav2Vec2ForCTC(quiet_config())
    params = model.init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 3000], 4000)
    np.testing.assert_array_equal(forward(model, params, x, mask, False), forward(model, params, x, mask, True))


@pytest.mark.slow  # compiles the whole model in training mode
@pytest.mark.parametrize("knob", [
    "hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout",
    "layerdrop", "mask_time_prob", "mask_feature_prob",
])
@pytest.mark.parametrize("scan", [False, True])
def test_each_noise_source_applies_in_train_mode(knob, scan):
    extra = {"mask_time_length": 2, "mask_feature_length": 4} if knob.startswith("mask") else {}
    model = FlaxWav2Vec2ForCTC(quiet_config(**{knob: 0.5}, **extra), scan_layers=scan)
    params = model.init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 3000], 4000)
    evaluated = forward(model, params, x, mask, True)
    trained = [forward(model, params, x, mask, False, seed=s) for s in range(4)]
    differs = [not np.allclose(t, evaluated, atol=1e-5) for t in trained]
    # layerdrop 0.5 over two layers keeps both a quarter of the time; every other knob always acts.
    assert sum(differs) >= (2 if knob == "layerdrop" else 4)
    assert len({np.asarray(t).tobytes() for t in trained}) >= 2, "the noise does not depend on the rng"
    np.testing.assert_array_equal(forward(model, params, x, mask, True, seed=7), evaluated)


@pytest.mark.slow  # compiles the whole model in training mode
def test_layerdrop_one_skips_every_layer():
    config = quiet_config(layerdrop=1.0)
    model = FlaxWav2Vec2ForCTC(config)
    params = model.init_params(jax.random.key(0))
    no_layers = FlaxWav2Vec2ForCTC(quiet_config(num_hidden_layers=0))
    params_no_layers = jax.tree.map(lambda a: a, params)
    del params_no_layers["wav2vec2"]["encoder"]["layers"]
    x, mask = padded_batch([4000, 3000], 4000)
    np.testing.assert_allclose(forward(model, params, x, mask, False),
                               forward(no_layers, params_no_layers, x, mask, True), atol=1e-6)


@pytest.mark.slow  # compiles the whole model in training mode
def test_time_mask_frames_equal_masked_spec_embed_and_stay_in_valid_frames():
    config = quiet_config(mask_time_prob=0.5, mask_time_length=3, mask_time_min_masks=2)
    model = FlaxWav2Vec2ForCTC(config)
    params = model.init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 1500], 4000)
    _, state = forward(model, params, x, mask, False, mutable=True)
    inter = state["intermediates"]["wav2vec2"]
    time_mask = np.asarray(inter["mask_time_indices"][0])
    hidden = np.asarray(inter["masked_hidden_states"][0])
    frames = np.asarray(frame_mask_from_attention_mask(config, mask, time_mask.shape[1]))
    embed = np.asarray(params["wav2vec2"]["masked_spec_embed"])
    assert time_mask.any(axis=1).all()
    assert not (time_mask & ~frames).any(), "a mask reached into padding"
    np.testing.assert_array_equal(hidden[time_mask], np.broadcast_to(embed, hidden[time_mask].shape))
    assert not np.isclose(hidden[~time_mask], embed).all(axis=-1).any()


@pytest.mark.slow  # compiles the whole model in training mode
def test_feature_mask_zeroes_whole_channels():
    model = FlaxWav2Vec2ForCTC(quiet_config(mask_feature_prob=0.5, mask_feature_length=4))
    params = model.init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 3000], 4000)
    _, state = forward(model, params, x, mask, False, mutable=True)
    inter = state["intermediates"]["wav2vec2"]
    feature_mask = np.asarray(inter["mask_feature_indices"][0])  # [batch, hidden]
    hidden = np.asarray(inter["masked_hidden_states"][0])
    assert feature_mask.any()
    assert (hidden.transpose(0, 2, 1)[feature_mask] == 0).all()
    assert (hidden.transpose(0, 2, 1)[~feature_mask] != 0).any(axis=-1).all()


@pytest.mark.slow  # compiles the whole model in training mode
def test_clip_shorter_than_a_mask_span_trains_without_mask():
    config = quiet_config(mask_time_prob=0.9, mask_time_length=10, mask_time_min_masks=2)
    model = FlaxWav2Vec2ForCTC(config)
    params = model.init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 200], 4000)  # row 1: 9 frames < mask_time_length
    logits, state = forward(model, params, x, mask, False, mutable=True)
    time_mask = np.asarray(state["intermediates"]["wav2vec2"]["mask_time_indices"][0])
    assert np.isfinite(np.asarray(logits)).all()
    assert time_mask[0].any() and not time_mask[1].any()
    short_x, short_mask = padded_batch([200], 200)  # 9 frames in all: the static axis is shorter than a span
    assert np.isfinite(np.asarray(forward(model, params, short_x, short_mask, False))).all()


def _grads(model, params, x, mask):
    def loss(p):
        return jnp.sum(forward(model, p, x, mask, False, seed=3) ** 2)
    return jax.jit(jax.grad(loss))(params)


@pytest.mark.slow  # compiles the whole model's gradients
@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_same_logits_and_grads(scan):
    config = tiny_config(layerdrop=0.3, mask_time_prob=0.3, mask_time_length=2)
    # The positional conv (not rematerialised) through per-tap matmuls, not the CPU's default FFT: an FFT's
    # rounding is relative to an array's largest element (~2e-6 here), and two differently compiled
    # programs round it differently, which an element-wise rtol reads as a difference on the smallest
    # gradients. The FFT's own accuracy: tests/test_model_pos_conv.py.
    plain = FlaxWav2Vec2ForCTC(config, scan_layers=scan, pos_conv="tap_grad")
    remat = FlaxWav2Vec2ForCTC(config, remat_policy="full", scan_layers=scan, pos_conv="tap_grad")
    params = plain.init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 3000], 4000)
    np.testing.assert_allclose(forward(remat, params, x, mask, False), forward(plain, params, x, mask, False),
                               atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 _grads(remat, params, x, mask), _grads(plain, params, x, mask))


@pytest.mark.slow  # compiles the whole model's gradients
def test_frozen_feature_encoder_gets_no_gradient():
    config = quiet_config()
    params = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 3000], 4000)
    frozen = _grads(FlaxWav2Vec2ForCTC(config, freeze_feature_encoder=True), params, x, mask)
    free = _grads(FlaxWav2Vec2ForCTC(config), params, x, mask)
    assert all((np.asarray(g) == 0).all() for g in jax.tree.leaves(frozen["wav2vec2"]["feature_extractor"]))
    assert all((np.asarray(g) != 0).any() for g in jax.tree.leaves(free["wav2vec2"]["feature_extractor"]))
    jax.tree.map(np.testing.assert_array_equal, frozen["lm_head"], free["lm_head"])


@pytest.mark.slow  # compiles the whole model in two precisions
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(report):
    config = quiet_config()
    params = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    x, mask = padded_batch([4000, 3000], 4000)
    bf16 = FlaxWav2Vec2ForCTC(config, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(bf16.init_params(jax.random.key(0)))} == {jnp.dtype("float32")}
    # The program really computes in bfloat16 (closeness to float32 alone would pass if dtype were ignored).
    program = jax.jit(lambda p: forward(bf16, p, x, mask, True)).lower(params).as_text()
    dots = [line for line in program.splitlines() if "dot_general" in line or "convolution" in line]
    assert dots and all("bf16" in line for line in dots)
    fp32 = FlaxWav2Vec2ForCTC(config)
    assert "bf16" not in jax.jit(lambda p: forward(fp32, p, x, mask, True)).lower(params).as_text()
    low = np.asarray(forward(bf16, params, x, mask, True))
    high = np.asarray(forward(fp32, params, x, mask, True))
    assert low.dtype == np.float32
    error = float(np.abs(low - high).max() / np.abs(high).max())
    report("bf16 vs fp32 logits, max error / max |logit|", error)
    assert error < 0.05
