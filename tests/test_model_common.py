"""Activations shared by the Flax modules (xlsr_jax/model/common.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlsr_jax.model.common import activation


def _reference_gelu(x):
    return jax.nn.gelu(x, approximate=False)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_and_its_own_derivative_match_autodiff_of_jax_gelu(dtype, rtol):
    """"gelu" carries a hand-written backward (faster fused on XLA:CPU); its values must be `jax.nn.gelu`'s
    and its gradients those of float32 autodiff of `jax.nn.gelu` at the same inputs, to within the
    input dtype's rounding (bfloat16 keeps 8 bits)."""
    gelu = activation("gelu")
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32).astype(dtype)
    np.testing.assert_array_equal(np.asarray(gelu(x), np.float32), np.asarray(_reference_gelu(x), np.float32))
    cotangent = jnp.cos(x.astype(jnp.float32) * 3.0).astype(dtype)  # not all ones: checks the chain rule
    got = jax.vjp(gelu, x)[1](cotangent)[0]
    as_f32 = (x.astype(jnp.float32), cotangent.astype(jnp.float32))
    expected = jax.vjp(_reference_gelu, as_f32[0])[1](as_f32[1])[0]
    assert got.dtype == dtype
    scale = float(jnp.abs(expected.astype(jnp.float32)).max())
    error = float(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32)).max())
    assert error <= rtol * scale, error
