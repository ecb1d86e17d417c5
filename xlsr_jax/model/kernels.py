"""Backend-specific kernels under the Flax modules: custom VJPs that keep less for the backward pass
(LayerNorm, dropout), exact GELU through erf, lane-wise row sums and a Dense whose weight gradient runs
on XLA:CPU's fast matmul. Each equals its plain JAX counterpart (tests/test_model_kernels.py); the
numbers that justify each are in its docstring. model/layers.py wraps them as Flax modules; the
positional convolution's kernels are in model/pos_conv.py."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from xlsr_jax.backend import target_backend


def gelu_value(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt 2)), elementwise in float32, returned in x's
    dtype (PyTorch's formula and precision, also under bf16 autocast).

    Not `jax.nn.gelu(approximate=False)`: it writes Phi through erfc, which XLA:CPU computes at a third
    of erf's speed (8 x 12799 x 256 on one core: 29-31 ms against 10). In float32 the two formulas
    differ by under 1e-7 (the 1 + erf cancellation only matters where GELU is within 1e-7 of 0)."""
    x32 = x.astype(jnp.float32)
    return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * math.sqrt(0.5)))).astype(x.dtype)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU (`gelu_value`), any shape, in x's dtype.

    It carries its own derivative, Phi(x) + x * phi(x): XLA:CPU fuses the autodiff derivative of
    `jax.nn.gelu` into the LayerNorm backward before it badly (feature encoder LayerNorm + GELU over
    8 x 12799 x 256, fwd+bwd on 2 cores: 350 ms autodiff, 150 ms with this rule, PyTorch 204 ms)."""
    return gelu_value(x)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return gelu(x), x


def gelu_derivative(x: jax.Array) -> jax.Array:
    """d gelu(x) / dx = Phi(x) + x * phi(x), elementwise."""
    cdf = 0.5 * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (g * gelu_derivative(x),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

# --- LayerNorm and dropout that keep less for the backward pass -------------------------------------------
# Autodiff of Flax's LayerNorm keeps three float32 copies of its input ([batch, frames, hidden] x 4 bytes
# each) and of Flax's Dropout a broadcast array of zeros as large as its input, in every layer: in an
# XLSR-53 layer at 32 x 5 s (bf16), 187 and 92 of the 749 MiB jax kept for the backward pass. These keep
# the input (LayerNorm: plus a mean and a 1/std per row) and the boolean mask; with the attention's
# `softmax_as`, a layer keeps 440 MiB.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any) -> jax.Array:
    """LayerNorm over the last axis, as Flax's `nn.LayerNorm` (statistics in float32, E[x^2] - E[x]^2
    clipped at 0): x [..., features], scale and bias [features] -> x's shape in `dtype`."""
    return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def row_means(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean of a, mean of b) over the last axis, a and b [..., features] -> [..., 1] each, as one
    two-operand reduce.

    Why not `a.mean(-1)` twice: XLA:CPU hands a plain sum to its YNNPACK reduce fusion, which needs its
    operands as arrays, so the broadcasts around it (1 / std, the LayerNorm scale) were written out at
    full size, [batch, frames, channels] each, in the forward and backward passes; a two-operand reduce
    stays in XLA's own fusions and reads its inputs once. The feature encoder's first LayerNorm + GELU
    (8 x 12799 x 256, fwd+bwd, 2 cores): 94 -> 69 ms; at the demo's 8 x 6399 x 32: 8.2 -> 3.6 ms.

    On the CPU backend, rows of a multiple of 16 features (at least 64) are summed in two stages, first
    over [..., features / 16, 16] across its middle axis (16 running sums a row: one SIMD vector), then
    over the 16: XLA:CPU sums along the minor axis one element at a time. One core: both row sums over
    102392 x 256, 26.7 -> 6.7 ms; LayerNorm fwd+bwd at 8 x 199 x 384, 2.2 -> 0.6 ms; the feature
    encoder's first bias + LayerNorm + GELU (8 x 12799 x 256) fwd+bwd, 192-202 -> 167-170 ms. At 32
    features (the demo's feature encoder) two stages measured slower."""
    n = a.shape[-1]
    if target_backend() == "cpu" and n % _LANES == 0 and n >= 4 * _LANES:
        split = lambda v: v.reshape(*v.shape[:-1], n // _LANES, _LANES)  # noqa: E731
        a, b = _sums(split(a), split(b), a.ndim - 1)
    sum_a, sum_b = _sums(a, b, a.ndim - 1)
    return sum_a[..., None] / n, sum_b[..., None] / n


_LANES = 16  # float32 lanes of an AVX-512 vector (two AVX2 vectors)


def _sums(a: jax.Array, b: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(sum of a, sum of b) over `axis`, one reduce with two operands."""
    return jax.lax.reduce((a, b), (jnp.zeros((), a.dtype), jnp.zeros((), b.dtype)),
                          lambda x, y: (x[0] + y[0], x[1] + y[1]), (axis,))


def row_statistics(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """float32 x [..., features] -> (mean, 1 / std) [..., 1], Flax's fast variance E[x^2] - E[x]^2 (one
    pass) clipped at zero against round-off."""
    mean, mean_square = row_means(x, x * x)
    var = jnp.maximum(mean_square - mean * mean, 0.0)
    return mean, jax.lax.rsqrt(var + epsilon)


def layer_norm_input_grad(g: jax.Array, xhat: jax.Array, rstd: jax.Array) -> jax.Array:
    """d(loss)/dx of xhat = (x - mean) * rstd over the last axis, from g = d(loss)/d(xhat) (float32)."""
    mean_g, mean_gx = row_means(g, g * xhat)
    return rstd * (g - mean_g - xhat * mean_gx)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
    x32 = x.astype(jnp.float32)
    mean, rstd = row_statistics(x32, epsilon)
    y = (x32 - mean) * (rstd * scale) + bias
    return y.astype(dtype), (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, dtype, residuals, dy):
    x, scale, mean, rstd = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    dx = layer_norm_input_grad(dy * scale, xhat, rstd)
    return dx.astype(x.dtype), (dy * xhat).sum(rows), dy.sum(rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def scale_kept(x: jax.Array, keep: jax.Array, keep_prob: float) -> jax.Array:
    """Inverted dropout with a given boolean mask: x / keep_prob where `keep`, else 0 (x's dtype). Also
    its own derivative (the same map of the cotangent)."""
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def keep_scaled(x: jax.Array, keep: jax.Array, keep_prob: float) -> jax.Array:
    return scale_kept(x, keep, keep_prob)


def keep_scaled_fwd(x, keep, keep_prob):
    return keep_scaled(x, keep, keep_prob), keep


def keep_scaled_bwd(keep_prob, keep, g):
    return scale_kept(g, keep, keep_prob), None


keep_scaled.defvjp(keep_scaled_fwd, keep_scaled_bwd)


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """A boolean Bernoulli(keep_prob) mask of `shape`: two 16-bit draws from each 32-bit word of
    `jax.random.bits` (keep_prob is rounded to a multiple of 2^-16, off by at most 7.6e-6).

    Why not `jax.random.bernoulli`: it spends a 32-bit word and a float conversion on each element. On
    one CPU core, 8 x 199 x 1536 (the 16 M benchmark model's feed-forward) took 19.2 ms with it and 7.0 ms
    here. The words come from jax's own generator, so any key implementation works and the draws stay
    partitionable (each element's bits depend on its index, not on how the array is sharded)."""
    columns = shape[-1] if shape else 1
    rows = tuple(shape[:-1])
    with jax.named_scope("keep_mask"):  # profiles (scripts/bench_train.py) count the masks' time by it
        words = jax.random.bits(key, rows + ((columns + 1) // 2,), jnp.uint32)
        draws = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :columns]
        return (draws < jnp.uint32(round(keep_prob * 65536))).reshape(shape)


# --- Dense with a weight gradient XLA:CPU runs on its fast matmul ----------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_dot(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _dense_dot_fwd(x, kernel, precision):
    return _dense_dot(x, kernel, precision), (x, kernel)


def _dense_dot_bwd(precision, residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    rows_x = x.reshape(-1, x.shape[-1])
    rows_g = g.reshape(-1, g.shape[-1])
    # The transpose written out: left to XLA:CPU, it contracts x over its leading axis in Eigen's
    # matmul, ~60 % of the speed of the YNNPACK one it uses for a plain [in, rows] @ [rows, out].
    x_t = jax.lax.optimization_barrier(rows_x.T)
    dkernel = jax.lax.dot_general(x_t, rows_g, (((1,), (0,)), ((), ())), precision=precision)
    return dx, dkernel.astype(kernel.dtype)


_dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s `dot_general` (x [..., in] . kernel [in, out]): on the CPU backend with `_dense_dot`'s
    derivative (the demo model's step on one core: 407 -> 378 ms), elsewhere, and for any other
    contraction, `jax.lax.dot_general` (GPU and TPU matmuls read transposed operands as they are)."""
    dense = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and preferred_element_type is None
    if dense and target_backend() == "cpu":
        return _dense_dot(lhs, rhs, precision)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
