"""The pure train step under jit with shardings: 1 device, data parallel and FSDP give the same
losses; gradient accumulation equals the big batch; non-finite updates are skipped."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from _models import padded_batch, quiet_config, tiny_config
from xlsr_jax import parallel
from xlsr_jax.config import MeshConfig, OptimConfig
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.text import Vocab
from xlsr_jax.train.optim import build_optimizer, learning_rate, set_learning_rate
from xlsr_jax.train.state import create_state
from xlsr_jax.train.step import train_step

BLANK = 11


def _batch(rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2000, 4000, rows)
    x, mask = padded_batch(lengths, 4000, seed)
    labels = np.full((rows, 8), -100, np.int32)
    for i in range(rows):
        n = int(rng.integers(3, 8))
        labels[i, :n] = rng.integers(0, BLANK, n)
    return {"input_values": x, "attention_mask": mask, "labels": labels,
            "example_mask": np.ones(rows, np.float32)}


def _run(config, mesh_config, devices, batches, accum=1, optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
         on_step=lambda state: None, blank_id=BLANK):
    """Metrics (host dicts) and final params of len(batches) steps on a mesh of `devices`, and the final
    state; `on_step(state)` sees the state after each step. The optimizer is `optim` over 10 steps; the
    params start from `model.init_params(key(0))`."""
    mesh = parallel.make_mesh(mesh_config, devices)
    model = FlaxWav2Vec2ForCTC(config)
    params = model.init_params(jax.random.key(0))
    tx, schedule = build_optimizer(optim, 10, params, True)
    abstract = jax.eval_shape(lambda p: create_state(p, tx, 0), params)
    shardings = parallel.tree_shardings(abstract, mesh)
    state = jax.jit(lambda p: create_state(p, tx, 0), out_shardings=shardings)(params)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, blank_id=blank_id,
                                     reduction="mean", accum=accum),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)), donate_argnums=0)
    metrics = []
    for batch in batches:
        state, step_metrics = step(state, parallel.global_batch(batch, mesh))
        metrics.append(jax.device_get(step_metrics))
        on_step(state)
    return metrics, jax.device_get(state.params), state


def _losses(metrics) -> list[float]:
    return [float(m["loss"]) for m in metrics]


@pytest.fixture(scope="module")
def reference():
    config = tiny_config()  # dropout, layerdrop and masks on: the rng must not depend on the mesh
    batches = [_batch(8, seed) for seed in range(3)]
    return config, batches, _run(config, MeshConfig(data=1), jax.devices()[:1], batches)


@pytest.mark.slow  # train steps on four meshes
@pytest.mark.parametrize("mesh_config", [MeshConfig(data=4, fsdp=1), MeshConfig(data=1, fsdp=4),
                                         MeshConfig(data=2, fsdp=2)], ids=["dp4", "fsdp4", "dp2xfsdp2"])
def test_sharded_steps_equal_one_device(reference, mesh_config, report):
    config, batches, (metrics, params, _) = reference
    sharded_metrics, sharded_params, state = _run(config, mesh_config, jax.devices(), batches)
    losses, sharded_losses = _losses(metrics), _losses(sharded_metrics)
    report(f"train loss 1 device vs {mesh_config.data}x{mesh_config.fsdp}",
           f"{losses} vs {sharded_losses}")
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded_params, params)
    if mesh_config.fsdp == 4:  # parameters really are split: a device holds a quarter of a big kernel
        kernel = state.params["wav2vec2"]["encoder"]["layers"]["0"]["feed_forward"]["intermediate_dense"]["kernel"]
        assert {s.data.size for s in kernel.addressable_shards} == {kernel.size // 4}


@pytest.mark.slow  # ~35 s on 2 cores: two compilations of the step
def test_gradient_accumulation_equals_one_big_batch():
    # No warm-up: both steps update at lr 1e-3 and 9e-4. Adam's update hardly depends on the gradient's
    # scale, so the gradient norm is compared too (a wrongly weighted micro-batch would show there). With
    # the default adam_eps 1e-8 the update of a gradient entry near 0 is a ratio of rounding errors
    # (one such entry was off by 0.7%); 1e-4 keeps every entry's update well conditioned.
    config, optim = quiet_config(), OptimConfig(learning_rate=1e-3, warmup_steps=0, adam_eps=1e-4)
    batches = [_batch(8, seed) for seed in range(2)]
    initial = jax.device_get(FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0)))
    one = _run(config, MeshConfig(data=2), jax.devices()[:2], batches, optim=optim)
    accumulated = _run(config, MeshConfig(data=2), jax.devices()[:2], batches, accum=2, optim=optim)
    for key in ("loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose([m[key] for m in accumulated[0]], [m[key] for m in one[0]], rtol=1e-5)
    assert [float(m["learning_rate"]) for m in one[0]] == pytest.approx([1e-3, 9e-4])
    update = lambda params: jax.tree.map(np.subtract, params, initial)  # noqa: E731
    moved = max(float(np.abs(u).max()) for u in jax.tree.leaves(update(one[1])))
    assert moved > 1e-3, "the updates are real (the tolerance below is far smaller)"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 update(accumulated[1]), update(one[1]))


@pytest.mark.slow  # three train steps
def test_non_finite_batch_is_skipped_and_counted():
    """A skipped step changes neither the parameters nor the AdamW moments, but uses up its batch and
    its learning rate: the next step runs at the schedule's next rate, as the loader's next batch."""
    config, optim = quiet_config(), OptimConfig(learning_rate=1e-3, warmup_steps=0)
    good, bad = _batch(4, 0), _batch(4, 1)
    bad["input_values"][1, 10] = np.nan
    initial = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    tx, schedule = build_optimizer(optim, 10, initial, True)
    states = []
    metrics, _, state = _run(config, MeshConfig(data=1), jax.devices()[:1], [bad, good, good], optim=optim,
                             on_step=lambda state: states.append(jax.device_get(state)))
    after_bad = states[0]
    assert not np.isfinite(metrics[0]["loss"]) and int(metrics[0]["skipped"]) == 1
    assert int(after_bad.skipped) == 1 and int(after_bad.step) == 1
    jax.tree.map(np.testing.assert_array_equal, after_bad.params, jax.device_get(initial))
    untouched = set_learning_rate(tx.init(initial), schedule(0))  # only the rate to apply was set
    jax.tree.map(np.testing.assert_array_equal, after_bad.opt_state.inner_state,
                 jax.device_get(untouched.inner_state))
    assert np.isfinite(_losses(metrics)[1:]).all() and int(state.skipped) == 1 and int(state.step) == 3
    assert [int(m["skipped"]) for m in metrics] == [1, 0, 0]
    assert [float(m["learning_rate"]) for m in metrics] == pytest.approx([1e-3, 9e-4, 8e-4])
    assert float(learning_rate(state.opt_state)) == pytest.approx(float(schedule(2)))
    counts = {int(count) for _, count in optax.tree.get_all_with_path(state.opt_state, "count")}
    assert counts == {2}, "AdamW's bias correction counts the two applied updates only"


@pytest.mark.slow  # 30 train steps
def test_loss_goes_down_on_a_batch_it_can_overfit(report):
    """The tiny XLSR-style model learns four clips' transcripts: 30 steps on the same batch halve its loss."""
    sentences = ["merhaba dünya", "nasılsın", "görüşürüz", "bu çok güzel"]
    vocab = Vocab.build(sentences)
    config = quiet_config(vocab_size=len(vocab), pad_token_id=vocab.pad_id)
    x, mask = padded_batch([4000, 3600, 3200, 3800], 4000)
    labels = np.full((4, 16), -100, np.int32)
    for row, sentence in enumerate(sentences):
        ids = vocab.encode(sentence)
        labels[row, :len(ids)] = ids
    batch = {"input_values": x, "attention_mask": mask, "labels": labels, "example_mask": np.ones(4, np.float32)}
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=3, schedule="constant")
    metrics, _, state = _run(config, MeshConfig(data=1), jax.devices()[:1], [batch] * 30, optim=optim,
                             blank_id=vocab.pad_id)
    losses = _losses(metrics)
    report("overfit loss, first -> last of 30 steps", f"{losses[0]:.2f} -> {losses[-1]:.2f}")
    assert int(state.skipped) == 0 and losses[-1] < 0.5 * losses[0]
