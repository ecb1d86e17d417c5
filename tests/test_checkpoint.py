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


def _damage(step_dir) -> str:
    """Truncate the largest array data file of a saved checkpoint to half its size; returns its name.
    (Orbax merges each process's ocdbt.process_N/ into the checkpoint's own d/ folder: what a restore reads.)"""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d" and "ocdbt.process" not in str(p)]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = largest.read_bytes()
    largest.write_bytes(data[: len(data) // 2])
    return largest.name


def test_a_damaged_newest_checkpoint_is_named_skipped_and_set_aside(tmp_path, caplog):
    checkpoints = _save_series(tmp_path / "ck", {1: None, 2: None, 3: None}, max_to_keep=3)
    _damage(tmp_path / "ck" / "3")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0.0))
    restored = checkpoints.restore(abstract)
    assert int(restored.step) == 2
    np.testing.assert_array_equal(np.asarray(restored.params["layer"]["kernel"]), np.full((8, 4), 2.0))
    assert f"{tmp_path / 'ck'}/3: cannot be restored" in caplog.text
    assert f"{tmp_path / 'ck' / '3'}: damaged, moved aside to {tmp_path / 'ck' / '3.damaged'}" in caplog.text
    assert (tmp_path / "ck" / "3.damaged").is_dir(), "kept for inspection, never deleted"
    assert checkpoints.all_steps() == [1, 2]
    checkpoints.save(3, _state(3.0))  # the step trains again and saves where the damaged one was
    checkpoints.wait()
    assert checkpoints.all_steps() == [1, 2, 3]
    assert int(checkpoints.restore(abstract).step) == 3


def test_a_tree_that_fits_no_checkpoint_moves_none_aside(tmp_path):
    checkpoints = _save_series(tmp_path / "ck", {1: None, 2: None}, max_to_keep=2)
    other = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, *x.shape), x.dtype), _state(0.0))
    with pytest.raises(UserError, match=r"no checkpoint restores \(steps \[1, 2\]\)"):
        checkpoints.restore(other)
    assert checkpoints.all_steps() == [1, 2] and not list((tmp_path / "ck").glob("*.damaged*"))


def test_leftovers_of_a_save_that_was_killed_are_not_steps_and_are_cleaned_up(tmp_path):
    from xlsr_jax.checkpoint import kept_steps

    _save_series(tmp_path / "ck", {1: None}).close()
    leftover = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1764000000"  # what orbax writes into before renaming
    leftover.mkdir()
    (leftover / "_CHECKPOINT_METADATA").write_text("{}")
    assert kept_steps(tmp_path / "ck") == [1] and kept_steps(tmp_path / "absent") == []
    rerun = Checkpointer(tmp_path / "ck", max_to_keep=2)  # orbax deletes the leftover before the rerun's first save
    rerun.save(2, _state(2.0))
    rerun.close()
    assert not leftover.exists() and kept_steps(tmp_path / "ck") == [1, 2]


def test_a_bucket_url_reaches_orbax_unchanged(monkeypatch):
    """gs://bucket/run/checkpoints must not become gs:/bucket/... (pathlib) or CWD/gs:/... (absolute())."""
    from xlsr_jax.rundir import RunDir

    seen = []

    class Manager:
        def __init__(self, directory, options):
            seen.append(directory)

    monkeypatch.setattr("xlsr_jax.checkpoint.ocp.CheckpointManager", Manager)
    run = RunDir("gs://bucket/runs/tr")
    Checkpointer(run.checkpoints, read_only=True)
    Checkpointer("s3://bucket/x/checkpoints")
    assert seen == ["gs://bucket/runs/tr/checkpoints", "s3://bucket/x/checkpoints"]
    assert str(run.vocab) == "gs://bucket/runs/tr/vocab.json"


@pytest.mark.parametrize("best_metric, kept", [(None, [4, 5]), ("eval/wer", [1, 4, 5])], ids=["newest", "and-best"])
def test_save_total_limit_prunes_older_checkpoints(tmp_path, best_metric, kept):
    # The Checkpointer as train/loop.py builds it from the config; step 1 has the best WER.
    from xlsr_jax.config import CheckpointConfig

    config = CheckpointConfig(save_total_limit=2, best_metric=best_metric)
    checkpoints = Checkpointer(tmp_path / "ck", config.save_total_limit, best_metric=config.best_metric,
                               best_mode=config.best_mode)
    for step in range(1, 6):
        checkpoints.save(step, _state(step), {"eval/wer": 0.1 * step, "eval/loss": 1.0})
        checkpoints.wait()
    checkpoints.close()
    assert Checkpointer(tmp_path / "ck", read_only=True).all_steps() == kept
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == kept


def test_select_steps_for_averaging(tmp_path):
    """The N newest kept, or the N best by the metric (returned by step); too few is an error naming the limit."""
    wers = {1: 0.50, 2: 0.30, 3: 0.40, 4: None, 5: 0.35}
    checkpoints = _save_series(tmp_path / "ck", wers, max_to_keep=5, best_metric="eval/wer", best_mode="min")
    assert checkpoints.select_steps(3) == [3, 4, 5]
    assert checkpoints.select_steps(2, best=True) == [2, 5] and checkpoints.select_steps(3, best=True) == [2, 3, 5]
    with pytest.raises(UserError, match=r"averaging 6 checkpoints needs 6 kept, it has 5 .*checkpoint.save_total_limit"):
        checkpoints.select_steps(6)
    with pytest.raises(UserError, match=r"needs 5 evaluated by eval/wer, it has 4"):
        checkpoints.select_steps(5, best=True)
    highest = _save_series(tmp_path / "max", wers, max_to_keep=5, best_metric="eval/wer", best_mode="max")
    assert highest.select_steps(2, best=True) == [1, 3]
