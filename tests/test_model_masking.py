"""SpecAugment span masks (masking.py) against Hugging Face's numpy `_compute_mask_indices`."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from xlsr_jax.model.masking import compute_span_mask, max_num_spans

SIZE = 500
# Mixed rows: full, padded, one exactly a span long, shorter than a span, empty.
LENGTHS = np.array([500, 431, 250, 97, 40, 12, 10, 9, 0])
VALID = np.arange(SIZE)[None, :] < LENGTHS[:, None]
DRAWS = 400
SETTINGS = {
    "prob0.05_len10_min2": (0.05, 10, 2),   # wav2vec2's mask_time_* defaults with XLSR's min_masks
    "prob0.65_len10": (0.65, 10, 0),         # wav2vec2 base's fine-tuning setting
}
STATIC = ("size", "mask_prob", "mask_length", "min_masks")


@functools.cache
def _ours(prob: float, length: int, min_masks: int, seed: int = 0) -> np.ndarray:
    """bool [DRAWS, batch, SIZE]: compute_span_mask jitted with static size/prob/length, over DRAWS keys."""
    masks = jax.jit(jax.vmap(
        functools.partial(compute_span_mask, size=SIZE, mask_prob=prob, mask_length=length, min_masks=min_masks),
        in_axes=(0, None),
    ))
    return np.asarray(masks(jax.random.split(jax.random.key(seed), DRAWS), LENGTHS))


@functools.cache
def _hugging_face(prob: float, length: int, min_masks: int, seed: int = 0) -> np.ndarray:
    """bool [DRAWS, batch, SIZE] from transformers' numpy sampler (global numpy rng, restored after)."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        attention_mask = torch.from_numpy(VALID.astype(np.int64))
        return np.stack([_compute_mask_indices((len(LENGTHS), SIZE), prob, length, attention_mask, min_masks)
                         for _ in range(DRAWS)])
    finally:
        np.random.set_state(saved)


@pytest.mark.parametrize("setting", SETTINGS)
def test_masks_stay_inside_rows(setting):
    prob, length, min_masks = SETTINGS[setting]
    masks = _ours(prob, length, min_masks)
    assert not (masks & ~VALID).any(), "a span reached into padding"
    assert not masks[:, LENGTHS < length].any(), "a row shorter than one span got a mask"
    assert masks[:, LENGTHS >= length].any(axis=-1).mean() > 0.5
    # A row exactly one span long has one possible start: masked whole or not at all.
    exact = masks[:, list(LENGTHS).index(length), :length]
    assert set(exact.sum(-1)) <= {0, length} and exact.any()
    if min_masks:
        assert exact.all()


@pytest.mark.parametrize("setting", SETTINGS)
def test_statistics_match_hugging_face(setting, report):
    prob, length, min_masks = SETTINGS[setting]
    ours, theirs = _ours(prob, length, min_masks) & VALID, _hugging_face(prob, length, min_masks) & VALID
    rows = LENGTHS >= length
    count_ours, count_theirs = ours.sum(-1)[:, rows], theirs.sum(-1)[:, rows]  # masked frames [DRAWS, rows]
    fraction_ours = count_ours.mean(0) / LENGTHS[rows]
    fraction_theirs = count_theirs.mean(0) / LENGTHS[rows]
    report(f"mask {setting}: masked fraction per row, ours", np.round(fraction_ours, 4).tolist())
    report(f"mask {setting}: masked fraction per row, HF  ", np.round(fraction_theirs, 4).tolist())
    total_ours, total_theirs = count_ours.sum(1).mean(), count_theirs.sum(1).mean()
    report(f"mask {setting}: masked frames per batch, ours / HF",
           f"{total_ours:.2f} / {total_theirs:.2f} ({total_ours / total_theirs - 1:+.2%})")
    # Each row's mean count agrees within 4 standard errors of the difference of two means of DRAWS draws,
    # and within 6 %; the batch total within 2 %.
    stderr = np.sqrt((count_ours.var(0) + count_theirs.var(0)) / DRAWS)
    difference = np.abs(count_ours.mean(0) - count_theirs.mean(0))
    assert (difference <= 4 * stderr + 1e-9).all(), (difference, stderr)
    np.testing.assert_allclose(fraction_ours, fraction_theirs, rtol=0.06)
    assert abs(total_ours / total_theirs - 1) < 0.02


def test_min_masks_with_tiny_prob_gives_full_spans():
    prob, length, min_masks = 1e-4, 10, 2
    masks = _ours(prob, length, min_masks)
    for row, n in enumerate(LENGTHS):
        counts = masks[:, row].sum(-1)
        if n < length:
            assert (counts == 0).all()
            continue
        # Two distinct starts (one when the row is exactly a span long): 10 masked frames, up to 20.
        low = length + 1 if n > length else length
        assert ((counts >= low) & (counts <= min_masks * length)).all(), (n, counts.min(), counts.max())
        for mask in masks[:, row]:  # every row holds a run of at least mask_length masked frames
            runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]]))))[::2]
            assert runs.max() >= length


def test_jit_with_static_arguments_equals_the_batched_draws():
    prob, length, min_masks = SETTINGS["prob0.65_len10"]
    masks = jax.jit(compute_span_mask, static_argnames=STATIC)
    key = jax.random.split(jax.random.key(0), DRAWS)[3]
    single = masks(key, LENGTHS, size=SIZE, mask_prob=prob, mask_length=length, min_masks=min_masks)
    assert single.shape == (len(LENGTHS), SIZE) and single.dtype == bool
    np.testing.assert_array_equal(single, _ours(prob, length, min_masks)[3])


def test_axis_shorter_than_a_span_is_never_masked():
    assert max_num_spans(5, 0.9, 10, 2) == 0
    mask = compute_span_mask(jax.random.key(0), np.array([5, 3, 0]), size=5, mask_prob=0.9, mask_length=10,
                             min_masks=2)
    assert mask.shape == (3, 5) and not np.asarray(mask).any()


def test_max_num_spans_bounds_hugging_face_rule():
    # int(prob * size / length + eps) with eps -> 1, at least min_masks, at most size // length.
    assert max_num_spans(500, 0.65, 10, 0) == 33
    assert max_num_spans(500, 0.05, 10, 2) == 3
    assert max_num_spans(500, 1e-4, 10, 2) == 2
    assert max_num_spans(500, 0.99, 10, 0) == 50
    assert max_num_spans(500, 0.0, 10, 2) == 0
