"""The backend a program is traced for: the default one, or the one compiling_for names (TPU plans on a CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from xlsr_jax.backend import compiling_for, target_backend
from xlsr_jax.model.encoder import _resolve_attention
from xlsr_jax.model.kernels import dense_dot_general
from xlsr_jax.model.pos_conv import resolve_impl


def test_compiling_for_names_the_target_inside_the_block_only():
    assert target_backend() == jax.default_backend() == "cpu"
    with compiling_for("tpu"):
        assert target_backend() == "tpu"
        with pytest.raises(RuntimeError, match="already compiling for tpu"):
            with compiling_for("gpu"):
                pass
    assert target_backend() == "cpu"
    with pytest.raises(ValueError, match="use cpu, gpu or tpu"):
        with compiling_for("metal"):
            pass


def test_the_models_auto_choices_follow_the_target():
    assert resolve_impl("auto") == "fft" and resolve_impl("auto", jnp.bfloat16) == "tap_grad"
    with compiling_for("tpu"):
        assert resolve_impl("auto") == resolve_impl("auto", jnp.bfloat16) == "xla"
        assert _resolve_attention("auto", jnp.bfloat16, 64) == "plain"
    with compiling_for("gpu"):
        assert resolve_impl("auto") == "isolated"
        assert _resolve_attention("auto", jnp.bfloat16, 64) == "cudnn"
    assert _resolve_attention("auto", jnp.bfloat16, 64) == "plain"


def test_dense_layers_trace_the_cpu_kernel_only_for_a_cpu():
    """The CPU matmul's custom derivative is in the traced program on a CPU, and not when tracing for a TPU."""
    x, kernel = jnp.ones((4, 8)), jnp.ones((8, 3))

    def program():
        return str(jax.make_jaxpr(lambda a, b: dense_dot_general(a, b, (((1,), (0,)), ((), ()))))(x, kernel))

    assert "custom_vjp_call" in program()
    with compiling_for("tpu"):
        assert "custom_vjp_call" not in program() and "dot_general" in program()
