"""ctc_loss (optax underneath, Hugging Face's reductions) against torch.nn.functional.ctc_loss."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from xlsr_jax.model.loss import ctc_loss, required_frames

VOCAB = 8
FRAMES = 40
PAD = -100


def _labels(rows, width):
    """Right-pad label rows with -100 into int32 [batch, width]."""
    out = np.full((len(rows), width), PAD, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _batch(blank, seed=0):
    """Logits float32 [5, 40, 8], frame_mask [5, 40], labels [5, 12]: mixed lengths, repeats, one empty row."""
    rng = np.random.default_rng(seed)
    tokens = [t for t in range(VOCAB) if t != blank]
    a, b, c = tokens[:3]
    rows = [
        list(rng.choice(tokens, 12)),
        [a, a, b, b, b, c, a],                   # repeated labels need blanks between them
        [c, b, a, c, c],
        [],                                       # empty transcript: the loss is all-blank
        [a, b, a, b, c, c, c, a, b, b],           # 10 labels + 3 repeats = 13 frames needed, 13 given
    ]
    lengths = [40, 33, 25, 12, 13]
    frame_mask = np.arange(FRAMES)[None, :] < np.array(lengths)[:, None]
    logits = (3.0 * rng.standard_normal((len(rows), FRAMES, VOCAB))).astype(np.float32)
    logits[~frame_mask] = 50.0 * rng.standard_normal((int((~frame_mask).sum()), VOCAB))  # junk on padding
    return logits, frame_mask, _labels(rows, 12)


def _torch_ctc(logits, frame_mask, labels, blank, reduction, dtype=torch.float64):
    """(loss, d loss / d logits) from torch, Hugging Face's way: log_softmax, zero_infinity=True."""
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    log_probs = x.log_softmax(-1).transpose(0, 1)  # [frames, batch, vocab]
    label_mask = labels >= 0
    loss = torch.nn.functional.ctc_loss(
        log_probs, torch.from_numpy(labels[label_mask]).long(),
        torch.from_numpy(frame_mask.sum(-1)), torch.from_numpy(label_mask.sum(-1)),
        blank=blank, reduction=reduction, zero_infinity=True,
    )
    loss.backward()
    return loss.item(), x.grad.numpy()


@partial(jax.jit, static_argnames="blank")
def _losses_and_grads(logits, frame_mask, labels, example_mask, blank):
    """Both reductions in one compilation (compiling optax's CTC scan dominates this file's runtime)."""
    out = {}
    for reduction in ("mean", "sum"):
        def f(x, reduction=reduction):
            return ctc_loss(x, frame_mask, labels, blank_id=blank, reduction=reduction, example_mask=example_mask)
        out[reduction] = jax.value_and_grad(f, has_aux=True)(logits)
    return out


def _jax_ctc(logits, frame_mask, labels, blank, reduction, example_mask=None):
    """(loss, aux, d loss / d logits) from ctc_loss."""
    example_mask = np.ones(len(labels), bool) if example_mask is None else example_mask
    (loss, aux), grad = _losses_and_grads(logits, frame_mask, labels, example_mask, blank=blank)[reduction]
    return float(loss), jax.tree.map(np.asarray, aux), np.asarray(grad)


@pytest.mark.parametrize("blank", [0, VOCAB - 1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_torch_ctc(blank, reduction, report):
    logits, frame_mask, labels = _batch(blank)
    loss, aux, grad = _jax_ctc(logits, frame_mask, labels, blank, reduction)
    expected, expected_grad = _torch_ctc(logits, frame_mask, labels, blank, reduction)
    _, torch32_grad = _torch_ctc(logits, frame_mask, labels, blank, reduction, dtype=torch.float32)
    assert aux["feasible"].all() and int(aux["num_infeasible"]) == 0
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    grad_error = float(np.abs(grad - expected_grad).max())
    torch32_error = float(np.abs(torch32_grad - expected_grad).max())
    report(f"ctc {reduction} blank={blank}: max|dgrad| jax fp32 vs torch fp64", grad_error)
    report(f"ctc {reduction} blank={blank}: max|dgrad| torch fp32 vs torch fp64", torch32_error)
    assert (grad[~frame_mask] == 0).all(), "padded frames got a gradient"
    # Float32 noise: jax fp32 sits as close to the fp64 gradient as torch's own fp32 does.
    assert grad_error <= 2 * torch32_error
    if reduction == "mean":  # Hugging Face: each loss over its label length (at least 1), averaged over the batch
        lengths = np.maximum((labels >= 0).sum(-1), 1)
        np.testing.assert_allclose(loss, np.mean(aux["per_example"] / lengths), rtol=1e-6)
    else:
        np.testing.assert_allclose(loss, aux["per_example"].sum(), rtol=1e-6)


def test_per_example_matches_torch_none_reduction():
    logits, frame_mask, labels = _batch(0, seed=1)
    _, aux, _ = _jax_ctc(logits, frame_mask, labels, 0, "sum")
    per_example = [_torch_ctc(logits[i:i + 1], frame_mask[i:i + 1], labels[i:i + 1], 0, "sum")[0]
                   for i in range(len(labels))]
    np.testing.assert_allclose(aux["per_example"], per_example, rtol=1e-5)


def test_required_frames_counts_repeats():
    labels = _labels([[1, 1, 2], [3, 3, 3, 3], [1, 2, 3], [], [2, 1, 2], [4]], 4)
    label_mask = labels >= 0
    np.testing.assert_array_equal(required_frames(jnp.asarray(labels), jnp.asarray(label_mask)),
                                  [4, 7, 3, 0, 3, 1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_infeasible_example_is_masked_like_zero_infinity(reduction):
    logits, frame_mask, labels = _batch(0, seed=2)
    # Row 4: [1, 1, 2] needs 4 frames; give it 3. Row 3: [1, 1, 2] with exactly 4 frames stays feasible.
    labels[3], labels[4] = _labels([[1, 1, 2]], 12)[0], _labels([[1, 1, 2]], 12)[0]
    frame_mask[3] = np.arange(FRAMES) < 4
    frame_mask[4] = np.arange(FRAMES) < 3
    loss, aux, grad = _jax_ctc(logits, frame_mask, labels, 0, reduction)
    expected, expected_grad = _torch_ctc(logits, frame_mask, labels, 0, reduction)
    np.testing.assert_array_equal(aux["feasible"], [True, True, True, True, False])
    assert int(aux["num_infeasible"]) == 1
    assert aux["per_example"][4] == 0 and aux["per_example"][3] > 0
    assert np.isfinite(grad).all()
    assert (grad[4] == 0).all() and (expected_grad[4] == 0).all()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    _, torch32_grad = _torch_ctc(logits, frame_mask, labels, 0, reduction, dtype=torch.float32)
    assert np.abs(grad - expected_grad).max() <= 2 * np.abs(torch32_grad - expected_grad).max()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_example_mask_equals_batch_without_filler_rows(reduction):
    logits, frame_mask, labels = _batch(0, seed=3)
    real = np.array([True, False, True, False, True])
    # Filler rows as an incomplete last batch may hold them: a real-looking clip, and an empty row with labels.
    frame_mask[3] = False
    labels[3] = _labels([[1, 2, 3, 4, 5]], 12)[0]
    loss, aux, grad = _jax_ctc(logits, frame_mask, labels, 0, reduction, example_mask=real)
    # The batch of the three real rows alone, through torch (which knows nothing of filler rows).
    expected, expected_grad = _torch_ctc(logits[real], frame_mask[real], labels[real], 0, reduction)
    _, torch32_grad = _torch_ctc(logits[real], frame_mask[real], labels[real], 0, reduction, dtype=torch.float32)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(aux["per_example"][~real], 0.0)
    assert int(aux["num_infeasible"]) == 0, "filler rows are not counted as infeasible"
    assert np.isfinite(grad).all() and (grad[~real] == 0).all()
    assert np.abs(grad[real] - expected_grad).max() <= 2 * np.abs(torch32_grad - expected_grad).max()
    # The same rows without example_mask: row 1 would count, row 3 would count as infeasible.
    unmasked, unmasked_aux, _ = _jax_ctc(logits, frame_mask, labels, 0, reduction)
    assert unmasked != pytest.approx(loss, rel=1e-3) and int(unmasked_aux["num_infeasible"]) == 1


def test_rejects_unknown_reduction():
    logits, frame_mask, labels = _batch(0)
    with pytest.raises(ValueError, match="reduction='batchmean'"):
        ctc_loss(logits, frame_mask, labels, blank_id=0, reduction="batchmean")
