"""The grouped convolution of the positional embedding, with a weight gradient that is fast on CPU.

XLA:CPU computes the kernel gradient of a grouped convolution (`feature_group_count > 1`) through a
slow generic path: for XLSR-53's shape (1024 channels, 16 groups, kernel 128, 8 clips x 4 s) it takes
7.3 s against PyTorch's 0.9 s for the whole backward, 18x the forward. Written as one matmul per
kernel tap, the same gradient takes 1.0 s; the input gradient (a grouped conv again) is fast as it is.

On a GPU the trap is elsewhere: XLA:GPU folds the bias add after the conv (forward) and the residual add
after its input gradient (backward) into cuDNN "conv-bias-activation" calls, which cuDNN runs for a
grouped conv through its generic engine, one kernel per group: on an H200 at XLSR-53's shape (32 x 5 s,
bf16) each of the two took ~9-12 ms of wall time where the lone conv takes well under 1 ms, and the
step waited for them (~24 of its 95 ms). "isolated" keeps XLA's conv and gradients but fences each
result with an optimization barrier, so nothing is fused into them; "auto" picks it on a GPU.
TPUs run grouped convs natively on the MXU: "auto" keeps XLA's own there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

POS_CONV_IMPLS = ("auto", "xla", "tap_grad", "isolated")


def resolve_impl(impl: str) -> str:
    """"auto" -> "tap_grad" on CPU, "isolated" on a GPU, "xla" elsewhere."""
    if impl not in POS_CONV_IMPLS:
        raise ValueError(f"pos_conv={impl!r}: use one of {POS_CONV_IMPLS}")
    if impl == "auto":
        return {"cpu": "tap_grad", "gpu": "isolated"}.get(jax.default_backend(), "xla")
    return impl


def _conv(x: jax.Array, kernel: jax.Array, groups: int, pad: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1,), padding=[(pad, pad)],
                                        dimension_numbers=("NWC", "OIW", "NWC"), feature_group_count=groups)


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, pad: int, impl: str = "auto") -> jax.Array:
    """x [batch, frames, channels], kernel [channels, channels / groups, width] (PyTorch's OIW layout),
    zero padding `pad` on both sides -> [batch, frames + 2 * pad - width + 1, channels]."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return _conv(x, kernel, groups, pad)
    if impl == "isolated":
        return _isolated_conv(x, kernel, groups, pad)
    return _tap_grad_conv(x, kernel, groups, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _isolated_conv(x, kernel, groups, pad):
    return _isolated_fwd(x, kernel, groups, pad)[0]


def _isolated_fwd(x, kernel, groups, pad):
    return jax.lax.optimization_barrier(_conv(x, kernel, groups, pad)), (x, kernel)


def _isolated_bwd(groups, pad, residuals, dy):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda a, b: _conv(a, b, groups, pad), x, kernel)
    return jax.lax.optimization_barrier(vjp(dy))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_grad_conv(x, kernel, groups, pad):
    return _conv(x, kernel, groups, pad)


def _tap_grad_fwd(x, kernel, groups, pad):
    return _conv(x, kernel, groups, pad), (x, kernel)


def _tap_grad_bwd(groups, pad, residuals, dy):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda v: _conv(v, kernel, groups, pad), x)(dy)
    return dx, kernel_grad(x, dy, groups, pad, kernel.shape[-1]).astype(kernel.dtype)


_tap_grad_conv.defvjp(_tap_grad_fwd, _tap_grad_bwd)
_isolated_conv.defvjp(_isolated_fwd, _isolated_bwd)


def kernel_grad(x: jax.Array, dy: jax.Array, groups: int, pad: int, width: int) -> jax.Array:
    """d(loss)/d(kernel) [channels, channels / groups, width] of `_conv`, one matmul per tap:
    dk[g, o, i, k] = sum over batch and output frames t of dy[t, g, o] * x_padded[t + k, g, i]."""
    batch, frames_out, channels = dy.shape
    per_group = channels // groups
    padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0))).reshape(batch, -1, groups, x.shape[-1] // groups)
    dy = dy.reshape(batch, frames_out, groups, per_group)

    def tap(_, k):
        window = jax.lax.dynamic_slice_in_dim(padded, k, frames_out, axis=1)
        return None, jnp.einsum("btgo,btgi->goi", dy, window, preferred_element_type=jnp.float32)

    _, taps = jax.lax.scan(tap, None, jnp.arange(width))  # [width, groups, out, in]
    return taps.transpose(1, 2, 3, 0).reshape(channels, -1, width)
