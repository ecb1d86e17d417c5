"""The positional conv's grouped convolution: the per-tap kernel gradient and the FFT conv equal XLA's conv,
and avoid its slow path (a kernel-gradient convolution with batch_group_count > 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlsr_jax.model.pos_conv import fft_size, grouped_conv, kernel_grad, resolve_impl


def _inputs(width, groups, channels=24, frames=37, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, frames, channels)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((channels, channels // groups, width)), jnp.float32)
    return x, kernel


def _loss(impl, groups, pad, probe):
    return lambda x, k: jnp.sum(grouped_conv(x, k, groups, pad, impl) * probe)


@pytest.mark.parametrize("width, groups", [(16, 4), (7, 3), (8, 1)])
def test_tap_grad_equals_xla_values_and_gradients(width, groups):
    x, kernel = _inputs(width, groups)
    pad = width // 2
    frames_out = x.shape[1] + 2 * pad - width + 1
    probe = jnp.asarray(np.random.default_rng(1).standard_normal((x.shape[0], frames_out, x.shape[2])), jnp.float32)
    np.testing.assert_allclose(grouped_conv(x, kernel, groups, pad, "tap_grad"),
                               grouped_conv(x, kernel, groups, pad, "xla"), rtol=1e-6, atol=1e-5)
    fast = jax.grad(_loss("tap_grad", groups, pad, probe), argnums=(0, 1))(x, kernel)
    reference = jax.grad(_loss("xla", groups, pad, probe), argnums=(0, 1))(x, kernel)
    for got, want in zip(fast, reference):
        assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 1e-6


@pytest.mark.parametrize("width, groups, frames", [(16, 4, 37), (7, 3, 37), (8, 1, 37), (128, 16, 50)])
def test_fft_equals_xla_values_and_gradients(width, groups, frames):
    """Values and both gradients within float32 noise (relative to the largest), at even and odd widths,
    one group, and XLSR-53's 128 taps over fewer frames than taps; unit-scale inputs and weights."""
    channels = 32 if groups == 16 else 24
    x, kernel = _inputs(width, groups, channels=channels, frames=frames, seed=4)
    pad = width // 2
    frames_out = frames + 2 * pad - width + 1
    probe = jnp.asarray(np.random.default_rng(5).standard_normal((x.shape[0], frames_out, channels)), jnp.float32)
    got, want = grouped_conv(x, kernel, groups, pad, "fft"), grouped_conv(x, kernel, groups, pad, "xla")
    assert got.shape == want.shape == (x.shape[0], frames_out, channels)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 2e-6
    fast = jax.grad(_loss("fft", groups, pad, probe), argnums=(0, 1))(x, kernel)
    reference = jax.grad(_loss("xla", groups, pad, probe), argnums=(0, 1))(x, kernel)
    for g, w in zip(fast, reference):
        assert float(jnp.abs(g - w).max() / jnp.abs(w).max()) < 5e-6


def test_fft_keeps_the_input_dtype_and_runs_through_ffts():
    x, kernel = _inputs(16, 4)
    y = grouped_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 4, 8, "fft")
    assert y.dtype == jnp.bfloat16
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(grouped_conv(x, k, 4, 8, "fft") ** 2)))(kernel))
    assert "fft[" in jaxpr and "conv_general_dilated" not in jaxpr


@pytest.mark.parametrize("frames, size", [(1, 1), (7, 8), (263, 270), (328, 360), (625, 625), (1001, 1024)])
def test_fft_size_is_the_next_2_3_5_smooth_length(frames, size):
    assert fft_size(frames) == size


def test_kernel_grad_has_pytorch_layout():
    x, kernel = _inputs(16, 4)
    dy = jnp.ones((2, 37 + 1, 24), jnp.float32)
    assert kernel_grad(x, dy, 4, 8, 16).shape == kernel.shape


def _batch_grouped_convs(impl) -> int:
    x, kernel = _inputs(16, 4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(grouped_conv(x, k, 4, 8, impl) ** 2)))(kernel))
    return sum("batch_group_count=4" in line for line in jaxpr.splitlines())


def test_tap_grad_avoids_the_batch_grouped_kernel_gradient():
    assert _batch_grouped_convs("xla") >= 1  # XLA's own kernel gradient: the slow path on CPU
    assert _batch_grouped_convs("tap_grad") == 0


@pytest.mark.parametrize("backend, impl", [("cpu", "fft"), ("gpu", "isolated"), ("tpu", "xla")])
def test_auto_picks_per_backend(monkeypatch, backend, impl):
    monkeypatch.setattr("xlsr_jax.model.pos_conv.jax.default_backend", lambda: backend)
    assert resolve_impl("auto") == impl
    assert resolve_impl("xla") == "xla"
    # 16-bit compute: FFTs have no bfloat16, so the CPU keeps bfloat16 matmuls (per-tap)
    assert resolve_impl("auto", jnp.bfloat16) == {"cpu": "tap_grad"}.get(backend, impl)


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="pos_conv='winograd'"):
        resolve_impl("winograd")


@pytest.mark.parametrize("width, groups", [(16, 4), (7, 3)])
def test_isolated_equals_xla_values_and_gradients(width, groups):
    x, kernel = _inputs(width, groups, seed=2)
    pad = width // 2
    probe = jnp.asarray(np.random.default_rng(3).standard_normal(
        (x.shape[0], x.shape[1] + 2 * pad - width + 1, x.shape[2])), jnp.float32)
    np.testing.assert_array_equal(grouped_conv(x, kernel, groups, pad, "isolated"),
                                  grouped_conv(x, kernel, groups, pad, "xla"))
    got = jax.grad(_loss("isolated", groups, pad, probe), argnums=(0, 1))(x, kernel)
    want = jax.grad(_loss("xla", groups, pad, probe), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def _barriers(impl) -> list[str]:
    """The optimization barriers in a training step's program around the conv: what their operands are."""
    x, kernel = _inputs(16, 4)
    bias = jnp.ones((x.shape[-1],), jnp.float32)

    def loss(x, k):  # the model's pattern: conv + bias, then a residual add (whose gradient meets dx)
        return jnp.sum(jnp.tanh(x[:, :-1] + grouped_conv(x, k, 4, 8, impl)[:, :-2] + bias))

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "optimization_barrier":
                yield ",".join(str(v.aval.shape) for v in eqn.invars)
            for inner in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(inner)

    return list(walk(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel).jaxpr))


def test_isolated_fences_the_conv_and_both_gradients():
    # XLA:GPU fuses an add after a grouped conv into cuDNN's slow conv-bias-activation call: the forward
    # output and the backward's (dx, dkernel) must each reach their users through a barrier.
    x_shape, k_shape = "(2, 38, 24)", "(24, 6, 16)"
    found = _barriers("isolated")
    assert x_shape in found  # forward conv output
    assert f"(2, 37, 24),{k_shape}" in found  # dx and dkernel together
    assert _barriers("xla") == []
