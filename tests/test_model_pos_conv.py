"""The positional conv's grouped convolution: the per-tap kernel gradient equals XLA's, and avoids its
slow path (a kernel-gradient convolution with batch_group_count > 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlsr_jax.model.pos_conv import grouped_conv, kernel_grad, resolve_impl


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


def test_auto_picks_tap_grad_on_cpu_only():
    assert resolve_impl("auto") == ("tap_grad" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="pos_conv='fft'"):
        resolve_impl("fft")
