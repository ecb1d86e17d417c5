"""The conv feature encoder: the fused bias + LayerNorm + GELU equals the three in a row (values and
gradients, float32 and bfloat16), under the parameter names of nn.Conv and nn.LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _models import tiny_config
from xlsr_jax.model.kernels import gelu
from xlsr_jax.model.feature_encoder import LAYER_NORM_EPS, FeatureEncoder, bias_layer_norm_gelu


def _inputs(shape=(2, 37, 24), seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    # Rows with a mean and spread far from 0 / 1, so the normalisation itself matters.
    x = jnp.asarray(3.0 * rng.standard_normal(shape) + 1.5, jnp.float32)
    bias, scale, shift = (jnp.asarray(v, jnp.float32) for v in (
        rng.standard_normal(channels), 1.0 + 0.3 * rng.standard_normal(channels), 0.5 * rng.standard_normal(channels)))
    probe = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, bias, scale, shift, probe


def _reference(x, bias, scale, shift):
    """What the layer computed before: a bias add, Flax's LayerNorm, GELU."""
    norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=x.dtype)
    return gelu(norm.apply({"params": {"scale": scale, "bias": shift}}, x + bias.astype(x.dtype)))


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_fused_equals_bias_layer_norm_gelu_and_its_gradients():
    x, bias, scale, shift, probe = _inputs()
    assert _relative(bias_layer_norm_gelu(x, bias, scale, shift), _reference(x, bias, scale, shift)) < 1e-6
    fused = jax.grad(lambda *a: jnp.sum(bias_layer_norm_gelu(*a) * probe), argnums=(0, 1, 2, 3))(x, bias, scale, shift)
    expected = jax.grad(lambda *a: jnp.sum(_reference(*a) * probe), argnums=(0, 1, 2, 3))(x, bias, scale, shift)
    for name, got, want in zip(("x", "bias", "scale", "shift"), fused, expected):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert _relative(got, want) < 1e-5, name


def test_bfloat16_activations_keep_their_dtype_and_track_float32():
    x, bias, scale, shift, probe = _inputs()
    low = x.astype(jnp.bfloat16)
    y = bias_layer_norm_gelu(low, bias, scale, shift)
    assert y.dtype == jnp.bfloat16
    assert _relative(y, _reference(x, bias, scale, shift)) < 2e-2
    grads = jax.grad(lambda *a: jnp.sum(bias_layer_norm_gelu(*a).astype(jnp.float32) * probe),
                     argnums=(0, 1, 2, 3))(low, bias, scale, shift)
    assert grads[0].dtype == jnp.bfloat16 and {g.dtype for g in grads[1:]} == {jnp.dtype("float32")}
    expected = jax.grad(lambda *a: jnp.sum(_reference(*a) * probe), argnums=(0, 1, 2, 3))(x, bias, scale, shift)
    for got, want in zip(grads, expected):
        assert _relative(got, want) < 3e-2


@pytest.mark.parametrize("activation", ["gelu", "relu"])  # gelu: fused; relu: the three separate modules
def test_conv_layers_keep_flax_names_and_compute_conv_norm_activation(activation):
    config = tiny_config(feat_extract_activation=activation)
    encoder = FeatureEncoder(config)
    audio = jnp.asarray(np.random.default_rng(3).standard_normal((2, 400)), jnp.float32)
    params = jax.jit(encoder.init)(jax.random.key(0), audio)["params"]["conv_layers"]
    params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    x = audio[..., None]
    for i, (width, stride) in enumerate(zip(config.conv_kernel, config.conv_stride)):
        layer = params[str(i)]
        channels_in = 1 if i == 0 else config.conv_dim[i - 1]
        assert layer["conv"]["kernel"].shape == (width, channels_in, config.conv_dim[i])
        assert set(layer["conv"]) == {"kernel", "bias"} and set(layer["layer_norm"]) == {"scale", "bias"}
        conv = nn.Conv(config.conv_dim[i], (width,), (stride,), padding="VALID")
        x = conv.apply({"params": layer["conv"]}, x)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS).apply({"params": layer["layer_norm"]}, x)
        x = gelu(x) if activation == "gelu" else jax.nn.relu(x)
    got = encoder.apply({"params": {"conv_layers": params}}, audio)
    assert _relative(got, x) < 1e-5
