"""The kernels under the Flax modules (xlsr_jax/model/kernels.py) and the layers that use them (model/layers.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from xlsr_jax.model.kernels import dense_dot_general, keep_mask, row_means
from xlsr_jax.model.layers import Dropout, LayerNorm, activation


def _reference_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _torch_gelu(x: jax.Array) -> np.ndarray:
    """PyTorch's exact GELU (what Hugging Face's model runs) at x, in x's dtype, as float32."""
    t = torch.from_numpy(np.array(x.astype(jnp.float32)))  # a writable copy: torch warns on a read-only one
    if x.dtype == jnp.bfloat16:
        t = t.to(torch.bfloat16)
    return torch.nn.functional.gelu(t).float().numpy()


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_matches_pytorch_and_its_own_derivative_matches_autodiff(dtype, rtol):
    """"gelu" carries a hand-written backward (faster fused on XLA:CPU); its values must be PyTorch's
    exact GELU's (in bfloat16 within one unit in the last place, as PyTorch also computes in float32
    and rounds once; 1e-6 absolute where float32's 1 + erf cancels) and its gradients those of float32
    autodiff of `jax.nn.gelu` at the same inputs, to within the input dtype's rounding."""
    gelu = activation("gelu")
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32).astype(dtype)
    got, expected = np.asarray(gelu(x), np.float32), _torch_gelu(x)
    mantissa_bits = 23 if dtype == jnp.float32 else 7
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(expected), 1e-30))) - mantissa_bits)
    assert np.all(np.abs(got - expected) <= ulp + 1e-6), np.max(np.abs(got - expected) - ulp)
    # Through erf, not erfc (jax.nn.gelu's): XLA:CPU runs erfc at a third of erf's speed.
    assert "erfc" not in str(jax.make_jaxpr(gelu)(x)) and " erf " in str(jax.make_jaxpr(gelu)(x))
    cotangent = jnp.cos(x.astype(jnp.float32) * 3.0).astype(dtype)  # not all ones: checks the chain rule
    got = jax.vjp(gelu, x)[1](cotangent)[0]
    as_f32 = (x.astype(jnp.float32), cotangent.astype(jnp.float32))
    expected = jax.vjp(_reference_gelu, as_f32[0])[1](as_f32[1])[0]
    assert got.dtype == dtype
    scale = float(jnp.abs(expected.astype(jnp.float32)).max())
    error = float(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32)).max())
    assert error <= rtol * scale, error


def _kept_for_backward(fn, *args):
    """(dtype, shape) of each array `jax.vjp` keeps for the backward pass of fn at args."""
    return sorted((str(a.dtype), a.shape) for a in jax.tree.leaves(jax.vjp(fn, *args)[1]))


@pytest.mark.parametrize("features", [32, 128])  # 128: row sums in two stages on the CPU (row_means)
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_layer_norm_equals_flax_and_keeps_only_its_input_and_row_statistics(dtype, rtol, features):
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 * rng.standard_normal((4, 9, features)) + 1.0, jnp.float32).astype(dtype)
    params = {"scale": jnp.asarray(1 + 0.3 * rng.standard_normal(features), jnp.float32),
              "bias": jnp.asarray(0.5 * rng.standard_normal(features), jnp.float32)}
    ours, flax_ln = LayerNorm(epsilon=1e-5, dtype=dtype), nn.LayerNorm(epsilon=1e-5, dtype=dtype)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(flax_ln.init(jax.random.key(0), x))
    probe = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(module):
        return lambda p, x: jnp.sum(module.apply({"params": p}, x).astype(jnp.float32) * probe)

    got, want = ours.apply({"params": params}, x), flax_ln.apply({"params": params}, x)
    assert got.dtype == want.dtype == dtype
    assert float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max()) <= rtol * 4
    for g, w in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                    jax.tree.leaves(jax.grad(loss(flax_ln), (0, 1))(params, x))):
        assert g.dtype == w.dtype
        assert float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max()) <= rtol * float(jnp.abs(w.astype(jnp.float32)).max())
    kept = _kept_for_backward(lambda x: ours.apply({"params": params}, x), x)
    assert kept == sorted([(str(jnp.dtype(dtype)), x.shape), ("float32", (4, 9, 1)), ("float32", (4, 9, 1)),
                           ("float32", (features,))])
    # Flax's own keeps float32 copies of the whole input: what this module exists to avoid.
    assert sum(s == x.shape for _, s in _kept_for_backward(lambda x: flax_ln.apply({"params": params}, x), x)) >= 3


@pytest.mark.parametrize("features, staged", [(256, True), (64, True), (48, False), (100, False)])
def test_row_means_sum_in_two_stages_on_cpu(features, staged):
    """Rows of a multiple of 16 (and at least 64) are summed as [..., features / 16, 16] first on the
    CPU backend; the means agree with float64 sums to float32 rounding either way."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 5, features)) + 2.0
    b = a * a
    got = row_means(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    for g, want in zip(got, (a.mean(-1, keepdims=True), b.mean(-1, keepdims=True))):
        assert g.shape == (3, 5, 1)
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-6)
    jaxpr = str(jax.make_jaxpr(row_means)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert (f"f32[3,5,{features // 16},16]" in jaxpr) == (staged and jax.default_backend() == "cpu")


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_keep_mask_is_bernoulli_with_independent_draws(keep_prob):
    shape = (64, 33, 301)  # odd last axis: the second half-word of the last word is cut off
    mask = np.asarray(keep_mask(jax.random.key(3), keep_prob, shape))
    assert mask.shape == shape and mask.dtype == bool
    n = mask.size
    assert abs(mask.mean() - keep_prob) < 4 * np.sqrt(keep_prob * (1 - keep_prob) / n)
    # Each word gives columns j (low 16 bits) and j + 151 (high 16 bits): neither those pairs nor
    # neighbours nor rows may be correlated. |r| of independent draws over ~2e5 pairs stays under 0.01.
    m = mask.reshape(-1, shape[-1]).astype(np.float64)
    m -= m.mean()
    half = (shape[-1] + 1) // 2
    for a, b in [(m[:, :150], m[:, half:half + 150]), (m[:, :-1], m[:, 1:]), (m[:-1], m[1:])]:
        r = (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())
        assert abs(r) < 0.01, r
    # The spectrum along the row is flat: no period in how the draws were laid out.
    power = np.abs(np.fft.rfft(m, axis=-1)) ** 2
    spectrum = power.mean(0)[1:]
    assert spectrum.max() / spectrum.mean() < 1.5
    np.testing.assert_array_equal(mask, np.asarray(keep_mask(jax.random.key(3), keep_prob, shape)))
    assert (mask != np.asarray(keep_mask(jax.random.key(4), keep_prob, shape))).mean() > 0.05


class _DropoutKey(nn.Module):
    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


def test_dropout_scales_kept_values_and_keeps_only_the_mask():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 50, 16)), jnp.bfloat16)
    rngs = {"dropout": jax.random.key(7)}
    ours = Dropout(0.3)
    got = ours.apply({}, x, deterministic=False, rngs=rngs)
    key = _DropoutKey().apply({}, rngs=rngs)  # the key Dropout draws: same scope, same first call
    keep = np.asarray(keep_mask(key, 0.7, x.shape))
    dropped = np.asarray(got, np.float32) == 0
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.where(keep, np.asarray(x / 0.7, np.float32), 0.0))
    assert 0.2 < dropped.mean() < 0.4
    assert ours.apply({}, x, deterministic=True) is x
    grad = jax.grad(lambda x: jnp.sum(ours.apply({}, x, deterministic=False, rngs=rngs).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.where(dropped, 0.0, np.float32(jnp.bfloat16(1 / 0.7))))
    assert _kept_for_backward(lambda x: ours.apply({}, x, deterministic=False, rngs=rngs), x) == [("bool", x.shape)]


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_dense_dot_general_equals_flax_dense_with_its_cpu_weight_gradient(dtype, rtol):
    """`nn.Dense(dot_general=dense_dot_general)`: the same parameters, outputs and gradients as plain
    `nn.Dense`; on the CPU its backward pass writes out the input's transpose for the weight gradient
    (an optimization barrier in the jaxpr), which a plain Dense does not."""
    x = jax.random.normal(jax.random.key(0), (3, 7, 16), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(1), (3, 7, 24), jnp.float32).astype(dtype)
    plain = nn.Dense(24, dtype=dtype)
    ours = nn.Dense(24, dtype=dtype, dot_general=dense_dot_general)
    params = plain.init(jax.random.key(2), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, params)

    def grads(module):
        y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        return y, vjp(cotangent)

    (y_ours, g_ours), (y_plain, g_plain) = grads(ours), grads(plain)
    np.testing.assert_array_equal(np.asarray(y_ours, np.float32), np.asarray(y_plain, np.float32))
    for got, expected in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
        assert got.dtype == expected.dtype
        got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * np.abs(expected).max())
    backward = str(jax.make_jaxpr(lambda p: jax.grad(lambda p: ours.apply(p, x).astype(jnp.float32).sum())(p))(params))
    assert ("optimization_barrier" in backward) == (jax.default_backend() == "cpu")
    assert "optimization_barrier" not in str(jax.make_jaxpr(
        lambda p: jax.grad(lambda p: plain.apply(p, x).astype(jnp.float32).sum())(p))(params))


def test_dense_dot_general_leaves_other_contractions_to_lax():
    a, b = jnp.ones((4, 5)), jnp.ones((4, 6))
    transposed = dense_dot_general(a, b, (((0,), (0,)), ((), ())))
    np.testing.assert_array_equal(transposed, jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))))
