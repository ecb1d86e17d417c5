"""The grouped convolution of the positional embedding, with gradients that are fast on each backend.

XLA:CPU computes the kernel gradient of a grouped convolution (`feature_group_count > 1`) through a
slow generic path: for XLSR-53's shape (1024 channels, 16 groups, kernel 128, 8 clips x 4 s) it takes
7.3 s against PyTorch's 0.9 s for the whole backward, 18x the forward. Written as one matmul per
kernel tap ("tap_grad"), the same gradient takes 1.0 s; the input gradient (a grouped conv again) is
fast as it is. Through the FFT ("fft", the CPU's choice since 2026-11-28) the whole conv is a product of
spectra: forward and backward at the 16 M benchmark model's shape (8 x 199 frames, 384 channels, 16
groups, 64 taps) 58-66 -> 22-37 ms on 2 cores, at XLSR-53's 761 -> 286 ms; in the 16 M model's train
step on one core the positional conv's ops went from 198 to 62 ms.

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
from typing import Any

import jax
import jax.numpy as jnp

from xlsr_jax.backend import target_backend
from xlsr_jax.config import POS_CONV_IMPLS


def resolve_impl(impl: str, dtype: Any = jnp.float32) -> str:
    """"auto" -> on CPU "fft" for float32 compute and "tap_grad" for 16-bit compute (FFTs run in float32
    only, and bfloat16 asks for 16-bit matmuls); "isolated" on a GPU; "xla" elsewhere."""
    if impl not in POS_CONV_IMPLS:
        raise ValueError(f"pos_conv={impl!r}: use one of {POS_CONV_IMPLS}")
    if impl == "auto":
        cpu = "fft" if jnp.dtype(dtype) == jnp.float32 else "tap_grad"
        return {"cpu": cpu, "gpu": "isolated"}.get(target_backend(), "xla")
    return impl


def _conv(x: jax.Array, kernel: jax.Array, groups: int, pad: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1,), padding=[(pad, pad)],
                                        dimension_numbers=("NWC", "OIW", "NWC"), feature_group_count=groups)


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, pad: int, impl: str = "auto") -> jax.Array:
    """x [batch, frames, channels], kernel [channels, channels / groups, width] (PyTorch's OIW layout),
    zero padding `pad` on both sides -> [batch, frames + 2 * pad - width + 1, channels]."""
    impl = resolve_impl(impl, x.dtype)
    if impl == "xla":
        return _conv(x, kernel, groups, pad)
    if impl == "isolated":
        return _isolated_conv(x, kernel, groups, pad)
    if impl == "fft":
        return fft_conv(x, kernel, groups, pad)
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


def fft_size(frames: int) -> int:
    """The smallest n >= frames whose only prime factors are 2, 3 and 5 (the sizes FFTs are fastest at)."""
    n = frames
    while True:
        rest = n
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return n
        n += 1


def fft_conv(x: jax.Array, kernel: jax.Array, groups: int, pad: int) -> jax.Array:
    """`_conv` through the FFT, in float32: the same x, kernel and result as `grouped_conv`.

    Each output frame is a correlation of the padded input with the kernel, y[t] = sum_k xp[t + k] . w[k];
    as a product of spectra over n >= frames + 2 pad points no wrap-around reaches a kept frame. Per group
    the taps collapse into one [in, out] complex matrix per frequency: batch x (n / 2 + 1) x groups
    matmuls of per_group x per_group, ~10x fewer multiplies than the direct conv at the 16 M benchmark
    model's shape (384 channels, 16 groups, 64 taps, 200 frames) and ~50x at XLSR-53's (1024, 16, 128);
    its gradients are FFTs and the same matmuls again (autodiff)."""
    batch, frames, channels = x.shape
    per_group, width = kernel.shape[1], kernel.shape[2]
    padded = frames + 2 * pad
    n = fft_size(padded)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (pad, n - frames - pad), (0, 0)))
    spectrum = jnp.fft.rfft(xp, axis=1).reshape(batch, -1, groups, per_group)  # [batch, freq, groups, in]
    taps = kernel.astype(jnp.float32).reshape(groups, per_group, per_group, width)  # [groups, out, in, width]
    filters = jnp.conj(jnp.fft.rfft(taps, n=n, axis=-1))  # correlation, not convolution: conjugated
    product = jnp.einsum("bfgi,goif->bfgo", spectrum, filters).reshape(batch, -1, channels)
    y = jnp.fft.irfft(product, n=n, axis=1)
    return y[:, :padded - width + 1].astype(x.dtype)
