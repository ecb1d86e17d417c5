"""Orbax checkpoints: the newest K plus the best by an eval metric, step choice, and restoring only
the parameters of a train state saved FSDP-sharded onto one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xlsr_jax import parallel
from xlsr_jax.checkpoint import Checkpointer
from xlsr_jax.config import MeshConfig
from xlsr_jax.errors import UserError
from xlsr_jax.train.state import TrainState


def _state(value: float, mesh=None) -> TrainState:
    params = {"layer": {"kernel": jnp.full((8, 4), value), "bias": jnp.arange(4.0) + value}}
    if mesh is not None:
        params = jax.device_put(params, {"layer": {"kernel": NamedSharding(mesh, P("fsdp", None)),
                                                    "bias": NamedSharding(mesh, P())}})
    return TrainState(step=jnp.asarray(int(value), jnp.int32), params=params,
                      opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                      rng=jnp.zeros((2,), jnp.uint32), skipped=jnp.zeros((), jnp.int32))


def _save_series(directory, wers: dict[int, float | None], **kwargs) -> Checkpointer:
    checkpoints = Checkpointer(directory, **kwargs)
    for step, wer in wers.items():
        checkpoints.save(step, _state(step), None if wer is None else {"eval/wer": wer, "eval/loss": 1.0})
        checkpoints.wait()
    return checkpoints


def test_keeps_the_newest_and_the_best(tmp_path):
    # steps 1..5; the best WER (0.30) is at step 2; step 4 has no eval.
    wers = {1: 0.50, 2: 0.30, 3: 0.40, 4: None, 5: 0.35}
    checkpoints = _save_series(tmp_path / "ck", wers, max_to_keep=2, best_metric="eval/wer", best_mode="min")
    assert checkpoints.all_steps() == [2, 4, 5]
    assert checkpoints.best_step() == 2
    assert checkpoints.metrics(2) == {"eval/wer": 0.30, "eval/loss": 1.0}
    checkpoints.close()
    reader = Checkpointer(tmp_path / "ck", best_metric="eval/wer", best_mode="min", read_only=True)
    assert (reader.select_step(), reader.select_step(best=True), reader.select_step(step=4)) == (5, 2, 4)


def test_max_mode_and_no_metric(tmp_path):
    wers = {1: 0.5, 2: 0.3, 3: 0.4}
    checkpoints = _save_series(tmp_path / "max", wers, max_to_keep=1, best_metric="eval/wer", best_mode="max")
    assert checkpoints.all_steps() == [1, 3] and checkpoints.best_step() == 1
    plain = _save_series(tmp_path / "plain", wers, max_to_keep=1)
    assert plain.all_steps() == [3] and plain.best_step() is None
    with pytest.raises(UserError, match="no checkpoint was saved with an evaluation"):
        plain.select_step(best=True)
    with pytest.raises(UserError, match=r"no checkpoint for step 2; steps kept: \[3\]"):
        plain.select_step(step=2)


def test_restore_params_of_an_fsdp_checkpoint_onto_one_device(tmp_path):
    mesh = parallel.make_mesh(MeshConfig(fsdp=4))
    state = _state(7.0, mesh)
    assert {s.data.shape for s in state.params["layer"]["kernel"].addressable_shards} == {(2, 4)}
    checkpoints = Checkpointer(tmp_path / "ck")
    checkpoints.save(7, state)
    checkpoints.close()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state.params)
    restored = Checkpointer(tmp_path / "ck", read_only=True).restore_params(abstract, 7)
    assert restored["layer"]["kernel"].sharding == one
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
