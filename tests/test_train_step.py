"""The pure train step under jit with shardings: 1 device, data parallel and FSDP give the same
losses; gradient accumulation equals the big batch; non-finite updates are skipped."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from _models import padded_batch, quiet_config, tiny_config
from xlsr_jax import parallel
from xlsr_jax.config import MeshConfig, OptimConfig
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.train.optim import build_optimizer
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


def _run(config, mesh_config, devices, batches, accum=1):
    """Losses and final params of len(batches) steps on a mesh of `devices`."""
    mesh = parallel.make_mesh(mesh_config, devices)
    model = FlaxWav2Vec2ForCTC(config)
    params = model.init_params(jax.random.key(0))
    tx, schedule = build_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=1), 10, params, True)
    abstract = jax.eval_shape(lambda p: create_state(p, tx, 0), params)
    shardings = parallel.tree_shardings(abstract, mesh)
    state = jax.jit(lambda p: create_state(p, tx, 0), out_shardings=shardings)(params)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, blank_id=BLANK,
                                     reduction="mean", accum=accum),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)), donate_argnums=0)
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def reference():
    config = tiny_config()  # dropout, layerdrop and masks on: the rng must not depend on the mesh
    batches = [_batch(8, seed) for seed in range(3)]
    return config, batches, _run(config, MeshConfig(data=1), jax.devices()[:1], batches)


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=4, fsdp=1), MeshConfig(data=1, fsdp=4),
                                         MeshConfig(data=2, fsdp=2)], ids=["dp4", "fsdp4", "dp2xfsdp2"])
def test_sharded_steps_equal_one_device(reference, mesh_config, report):
    config, batches, (losses, params, _) = reference
    sharded_losses, sharded_params, state = _run(config, mesh_config, jax.devices(), batches)
    report(f"train loss 1 device vs {mesh_config.data}x{mesh_config.fsdp}",
           f"{losses} vs {sharded_losses}")
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded_params, params)
    if mesh_config.fsdp == 4:  # parameters really are split: a device holds a quarter of a big kernel
        kernel = state.params["wav2vec2"]["encoder"]["layers"]["0"]["feed_forward"]["intermediate_dense"]["kernel"]
        assert {s.data.size for s in kernel.addressable_shards} == {kernel.size // 4}


def test_gradient_accumulation_equals_one_big_batch():
    config = quiet_config()
    batches = [_batch(8, seed) for seed in range(2)]
    one = _run(config, MeshConfig(data=2), jax.devices()[:2], batches)
    accumulated = _run(config, MeshConfig(data=2), jax.devices()[:2], batches, accum=4)
    np.testing.assert_allclose(accumulated[0], one[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), accumulated[1], one[1])


def test_non_finite_batch_is_skipped_and_counted():
    config = quiet_config()
    good, bad = _batch(4, 0), _batch(4, 1)
    bad["input_values"][1, 10] = np.nan
    losses, params, state = _run(config, MeshConfig(data=1), jax.devices()[:1], [bad])
    initial = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    assert not np.isfinite(losses[0])
    assert int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(initial))
    losses, _, state = _run(config, MeshConfig(data=1), jax.devices()[:1], [bad, good])
    assert np.isfinite(losses[1]) and int(state.skipped) == 1
