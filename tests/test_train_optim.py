"""The optimizer on its own: learning-rate schedules, the weight-decay mask, clipping, freezing of the
feature encoder, skipping of non-finite updates, and the length of a run in steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from _models import tiny_config
from xlsr_jax.config import OptimConfig, from_dict
from xlsr_jax.errors import UserError
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.train.loop import total_steps
from xlsr_jax.train.optim import (build_optimizer, check_consecutive_skips, consecutive_skips, learning_rate,
                                  learning_rate_schedule, set_learning_rate, skipped)


@pytest.fixture(scope="module")
def params():
    """The tiny model's parameters, masked-spec embedding and weight-normed positional conv included."""
    return FlaxWav2Vec2ForCTC(tiny_config()).init_params(jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def _update(tx, opt_state, grads, params, lr: float):
    """(new params, new optimizer state) after one update at learning rate `lr`."""
    updates, opt_state = tx.update(grads, set_learning_rate(opt_state, lr), params)
    return optax.apply_updates(params, updates), opt_state


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("schedule, total, warmup, expected", [
    # warm-up 4 of 12 steps, then 8 steps of decay: half way at 8, zero after the last step (12)
    ("linear", 12, 4, {0: 0.0, 2: 0.5, 4: 1.0, 8: 0.5, 11: 0.125, 12: 0.0}),
    ("cosine", 12, 4, {0: 0.0, 2: 0.5, 4: 1.0, 6: 0.5 + 0.5 * np.cos(np.pi / 4), 8: 0.5, 12: 0.0}),
    ("constant", 12, 4, {0: 0.0, 1: 0.25, 4: 1.0, 11: 1.0}),
    ("linear", 10, 0, {0: 1.0, 5: 0.5, 9: 0.1, 10: 0.0}),
    ("linear", 10, 50, {0: 0.0, 3: 1 / 3, 9: 1.0, 10: 0.0}),  # warm-up longer than the run: peak at its last step
], ids=["linear", "cosine", "constant", "no-warmup", "warmup-too-long"])
def test_learning_rate_schedules(schedule, total, warmup, expected):
    lr = learning_rate_schedule(OptimConfig(learning_rate=1.0, warmup_steps=warmup, schedule=schedule), total)
    steps = sorted(expected)
    np.testing.assert_allclose([float(lr(s)) for s in steps], [expected[s] for s in steps], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("total, warmup, hold, expected", [
    # 20 steps: warm-up 0.1 -> 1 over 4, hold 1.0 through step 10 (4 + 6, the decay's k = 0 included), then
    # 1.0 * 0.05 ** (k / 9) down to 0.05 at the last step (19), and held there after it.
    (20, 4, 6, {0: 0.1, 2: 0.55, 4: 1.0, 9: 1.0, 10: 1.0, 13: 0.05 ** (3 / 9), 19: 0.05, 25: 0.05}),
    # hold null: 40 % of the run (8 steps); no warm-up: the hold starts at step 0
    (20, 0, None, {0: 1.0, 7: 1.0, 8: 1.0, 10: 0.05 ** (2 / 11), 19: 0.05}),
], ids=["warmup-hold-decay", "default-hold"])
def test_tri_stage_schedule(total, warmup, hold, expected):
    config = OptimConfig(learning_rate=1.0, warmup_steps=warmup, schedule="tri_stage", hold_steps=hold,
                         init_lr_scale=0.1, final_lr_scale=0.05)
    lr = learning_rate_schedule(config, total)
    steps = sorted(expected)
    np.testing.assert_allclose([float(lr(s)) for s in steps], [expected[s] for s in steps], rtol=1e-5)


@pytest.mark.slow  # optimizer steps in a loop
def test_freeze_transformer_steps_trains_the_head_alone_then_everything(params):
    """The first N updates move the CTC head only; update N + 1 moves the rest too, by AdamW's first step
    (|update| = lr, bias correction counted from there), never the frozen feature encoder."""
    n, lr = 3, 1e-2
    # adam_eps far below the clipped gradients' size, so that AdamW's first update is lr * sign(g).
    tx, _ = build_optimizer(OptimConfig(weight_decay=0.1, adam_eps=1e-12), 10, params, freeze_feature_encoder=True,
                            freeze_transformer_steps=n)
    opt_state, new = tx.init(params), params
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params) for _ in range(n + 1)]
    for g in grads[:n]:
        new, opt_state = _update(tx, opt_state, g, new, lr=lr)
    before, after = _flat(params), _flat(new)
    head = {p for p in before if p.startswith("lm_head/")}
    assert head == {"lm_head/kernel", "lm_head/bias"}
    assert {p for p in before if not np.array_equal(before[p], after[p])} == head
    frozen_phase = after
    new, opt_state = _update(tx, opt_state, grads[n], new, lr=lr)
    after = _flat(new)
    layer_kernel = next(p for p in before if p.startswith("wav2vec2/encoder/") and p.endswith("kernel")
                        and after[p].size > 16)
    # AdamW's first update is lr * sign(g) (clipped g has the same sign), plus decay lr * wd * param.
    step = frozen_phase[layer_kernel] - after[layer_kernel]
    g = _flat(grads[n])[layer_kernel]
    np.testing.assert_allclose(step, lr * np.sign(g) + lr * 0.1 * frozen_phase[layer_kernel], rtol=1e-5, atol=1e-9)
    for p in before:
        assert np.array_equal(before[p], after[p]) == p.startswith("wav2vec2/feature_extractor/"), p


def test_freeze_transformer_steps_clips_the_head_gradient_alone(params):
    """While the encoder waits, its gradient does not count in the global norm: the head's update is that
    of an optimizer holding the head alone (a large adam_eps makes the update depend on the clipped scale)."""
    config = OptimConfig(max_grad_norm=1.0, adam_eps=1.0)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    tx, _ = build_optimizer(config, 10, params, freeze_feature_encoder=True, freeze_transformer_steps=2)
    new, _ = _update(tx, tx.init(params), grads, params, lr=0.1)
    head_only = {"lm_head": params["lm_head"]}
    alone, _ = build_optimizer(config, 10, head_only, freeze_feature_encoder=True)
    expected, _ = _update(alone, alone.init(head_only), {"lm_head": grads["lm_head"]}, head_only, lr=0.1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new["lm_head"], expected["lm_head"])


def test_weight_decay_on_kernels_only(params):
    # Zero gradients: AdamW's update is then lr * weight_decay * param on decayed leaves, nothing elsewhere.
    tx, _ = build_optimizer(OptimConfig(weight_decay=0.5), 10, params, freeze_feature_encoder=False)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = _update(tx, tx.init(params), zeros, params, lr=0.1)
    before, after = _flat(params), _flat(new)
    decayed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert {path.rsplit("/", 1)[1] for path in decayed} == {"kernel", "weight_v"}
    for path in decayed:
        np.testing.assert_allclose(after[path], before[path] * (1 - 0.1 * 0.5), rtol=1e-6)
    kept = {path.rsplit("/", 1)[1] for path in set(before) - decayed}
    assert {"bias", "scale", "masked_spec_embed", "weight_g"} <= kept
    assert not any("kernel" in path for path in set(before) - decayed)


def test_clipping_scales_the_gradient_to_max_grad_norm():
    # A large adam_eps makes Adam's first update g / (|g| + eps) depend on the gradient's scale.
    config = OptimConfig(max_grad_norm=1.0, adam_eps=1.0, weight_decay=0.0)
    params = {"lm_head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    unit = jax.tree.map(lambda g: g / optax.tree.norm(direction), direction)
    big = jax.tree.map(lambda g: 10 * g, unit)
    assert float(optax.tree.norm(big)) == pytest.approx(10.0, rel=1e-6)
    tx, _ = build_optimizer(config, 10, params, freeze_feature_encoder=False)
    clipped, _ = _update(tx, tx.init(params), big, params, lr=0.3)
    prescaled, _ = _update(tx, tx.init(params), unit, params, lr=0.3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, prescaled)
    jax.tree.map(lambda a, g: np.testing.assert_allclose(a, -0.3 * g / (np.abs(g) + 1.0), rtol=1e-5),
                 clipped, unit)
    loose, _ = build_optimizer(OptimConfig(max_grad_norm=100.0, adam_eps=1.0), 10, params, False)
    unclipped, _ = _update(loose, loose.init(params), big, params, lr=0.3)
    assert not np.allclose(unclipped["lm_head"]["kernel"], clipped["lm_head"]["kernel"], rtol=0.1)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_freezing_the_feature_encoder_is_an_optimizer_mask(params, frozen):
    tx, _ = build_optimizer(OptimConfig(weight_decay=0.1), 10, params, freeze_feature_encoder=frozen)
    opt_state, new = tx.init(params), params
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
        new, opt_state = _update(tx, opt_state, grads, new, lr=1e-2)
    before, after = _flat(params), _flat(new)
    encoder = [p for p in before if p.startswith("wav2vec2/feature_extractor/")]
    assert len(encoder) >= 6  # conv kernels, biases, layer norms
    for path in before:
        moved = not np.array_equal(before[path], after[path])
        assert moved == (not frozen or path not in encoder), path


def test_non_finite_updates_are_skipped_and_never_applied():
    config = OptimConfig(weight_decay=0.1)
    params = {"lm_head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    tx, _ = build_optimizer(config, 10, params, freeze_feature_encoder=False)
    good = jax.tree.map(jnp.ones_like, params)
    bad = {"lm_head": {"kernel": jnp.ones((4, 3)).at[1, 2].set(jnp.nan), "bias": jnp.ones(3)}}
    after_good, state = _update(tx, tx.init(params), good, params, lr=0.1)
    skipped_params, skipped_state = after_good, state
    for k in range(5):  # optax's max_consecutive_errors would apply the NaN after a few; never here
        skipped_params, skipped_state = _update(tx, skipped_state, bad, skipped_params, lr=0.1)
        assert int(skipped(skipped_state)) == 1 and int(consecutive_skips(skipped_state)) == k + 1
    jax.tree.map(np.testing.assert_array_equal, skipped_params, after_good)
    # The AdamW moments and counts are those of the last finite update.
    jax.tree.map(np.testing.assert_array_equal, skipped_state.inner_state, state.inner_state)
    with pytest.raises(UserError, match=r"step 7: the last 5 updates were all skipped .*max_consecutive_skips=5"):
        check_consecutive_skips(skipped_state, limit=5, step=7)
    check_consecutive_skips(skipped_state, limit=6, step=7)
    _, recovered = _update(tx, skipped_state, good, skipped_params, lr=0.1)
    assert int(skipped(recovered)) == 0 and int(consecutive_skips(recovered)) == 0
    assert float(learning_rate(recovered)) == pytest.approx(0.1)


@pytest.mark.parametrize("train, batches_per_epoch, steps", [
    ({"num_train_epochs": 2.5}, 7, 18),  # partial epochs round up
    ({"num_train_epochs": 30}, 100, 3000),
    ({"num_train_epochs": 0.01}, 7, 1),  # at least one step
    ({"num_train_epochs": 30, "max_steps": 5}, 100, 5),  # max_steps wins
])
def test_total_steps_from_epochs(train, batches_per_epoch, steps):
    assert total_steps(from_dict({"train": train}), batches_per_epoch) == steps
