"""SpecAugment span masks computed with jax.random on static shapes.

Hugging Face computes the masks in numpy on the host (`_compute_mask_indices`), which cannot run inside a
jitted step. This is the same sampling rule expressed with fixed-size arrays so it runs inside `jax.jit`:

- per row, ``num_spans = int(mask_prob * length / mask_length + eps)`` with one ``eps ~ U[0, 1)`` for
  the whole batch (probabilistic rounding), at least ``min_masks``, at most ``size // mask_length`` and
  at most ``length - mask_length + 1`` (so a clip shorter than one span gets no mask instead of a crash);
- span starts are drawn without replacement from ``[0, length - mask_length]``, so spans never reach
  into padding; spans may overlap, as in Hugging Face.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_num_spans(size: int, mask_prob: float, mask_length: int, min_masks: int) -> int:
    """Static upper bound on the number of spans for an axis of `size` (Hugging Face's rule with eps=1)."""
    if mask_prob <= 0 or mask_length < 1 or mask_length > size:
        return 0
    num = max(int(mask_prob * size / mask_length + 1.0), min_masks)
    num = min(num, size // mask_length)
    return max(min(num, size - mask_length + 1), 0)


def compute_span_mask(
    rng: jax.Array,
    lengths: jax.Array,
    size: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
) -> jax.Array:
    """Random span mask.

    Args:
      rng: PRNG key.
      lengths: int [batch], valid length of each row (frames for time masks, `size` for feature masks).
      size: static length of the masked axis.
    Returns:
      bool [batch, size], True where masked; always False at positions >= lengths.
    """
    batch = lengths.shape[0]
    spans = max_num_spans(size, mask_prob, mask_length, min_masks)
    if spans == 0:
        return jnp.zeros((batch, size), dtype=bool)
    eps_rng, start_rng = jax.random.split(rng)
    eps = jax.random.uniform(eps_rng, ())
    lengths = lengths.astype(jnp.int32)
    num = jnp.floor(mask_prob * lengths / mask_length + eps).astype(jnp.int32)
    num = jnp.maximum(num, min_masks)
    num = jnp.minimum(num, size // mask_length)
    num_starts = jnp.maximum(lengths - mask_length + 1, 0)
    num = jnp.minimum(num, num_starts)

    # Sampling without replacement: random scores, invalid starts pushed below every valid one, top-k.
    scores = jax.random.uniform(start_rng, (batch, size))
    positions = jnp.arange(size)
    scores = jnp.where(positions[None, :] < num_starts[:, None], scores, -1.0)
    _, starts = jax.lax.top_k(scores, spans)  # [batch, spans]
    used = jnp.arange(spans)[None, :] < num[:, None]  # [batch, spans]
    inside = (positions[None, None, :] >= starts[..., None]) & (
        positions[None, None, :] < starts[..., None] + mask_length
    )
    return jnp.any(inside & used[..., None], axis=1)
