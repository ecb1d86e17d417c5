"""CTC loss with Hugging Face's reductions, on optax.ctc_loss.

optax returns a large finite value (~1e5) instead of inf when labels cannot fit the frames; such
examples are masked out (torch's `zero_infinity=True`) and counted, so one bad clip cannot swamp a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from xlsr_jax.text import required_frames  # the one CTC feasibility rule, shared with data/prepare.py


def ctc_loss(
    logits: jax.Array,
    frame_mask: jax.Array,
    labels: jax.Array,
    *,
    blank_id: int,
    reduction: str = "mean",
    example_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CTC loss over a batch.

    Args:
      logits: float [batch, frames, vocab].
      frame_mask: bool [batch, frames], True on real frames.
      labels: int [batch, label_len], right-padded with -100 (or any negative id).
      blank_id: the CTC blank (the tokenizer's pad id, as in Hugging Face).
      reduction: "mean" (each example's loss over its label length, averaged over real examples) or
        "sum" (summed over examples).
      example_mask: float/bool [batch], 0 for filler rows of an incomplete batch.
    Returns:
      (scalar loss, aux) with aux["per_example"] float32 [batch] (0 where masked),
      aux["feasible"] bool [batch] and aux["num_infeasible"] int32 (real examples masked out).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'")
    batch = logits.shape[0]
    example_mask = jnp.ones((batch,), bool) if example_mask is None else example_mask.astype(bool)
    label_mask = (labels >= 0) & (labels != blank_id)
    safe_labels = jnp.where(label_mask, labels, 0).astype(jnp.int32)
    per_example = optax.ctc_loss(
        logits.astype(jnp.float32),
        1.0 - frame_mask.astype(jnp.float32),
        safe_labels,
        1.0 - label_mask.astype(jnp.float32),
        blank_id=blank_id,
    )
    feasible = required_frames(safe_labels, label_mask) <= frame_mask.sum(-1)
    keep = feasible & example_mask
    per_example = jnp.where(keep, per_example, 0.0)
    if reduction == "mean":
        label_lengths = jnp.maximum(label_mask.sum(-1), 1)
        loss = jnp.sum(per_example / label_lengths) / jnp.maximum(example_mask.sum(), 1)
    else:
        loss = jnp.sum(per_example)
    aux = {
        "per_example": per_example,
        "feasible": feasible,
        "num_infeasible": jnp.sum(example_mask & ~feasible).astype(jnp.int32),
    }
    return loss, aux
