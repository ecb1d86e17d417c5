"""Mesh construction and sharding rules on 4 fake CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from _models import quiet_config
from xlsr_jax import parallel
from xlsr_jax.config import MeshConfig, from_dict
from xlsr_jax.model import FlaxWav2Vec2ForCTC
from xlsr_jax.train.setup import build_state


def test_fake_devices_are_there():
    assert jax.device_count() == 4, "tests/conftest.py sets --xla_force_host_platform_device_count=4"


@pytest.mark.parametrize("data, fsdp, shape", [(-1, 1, (4, 1)), (-1, 2, (2, 2)), (1, 4, (1, 4)), (2, 2, (2, 2))])
def test_mesh_shape(data, fsdp, shape):
    mesh = parallel.make_mesh(MeshConfig(data=data, fsdp=fsdp))
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape
    assert parallel.data_parallel_size(mesh) == 4


def test_mesh_that_does_not_cover_the_devices_is_an_error():
    with pytest.raises(ValueError, match="does not cover the 4 devices"):
        parallel.make_mesh(MeshConfig(data=3, fsdp=1))


def test_auto_fsdp_shards_the_largest_divisible_dimension_and_rules_win():
    mesh = parallel.make_mesh(MeshConfig(fsdp=4))
    assert parallel.spec_for("a/kernel", (32, 128), mesh) == P(None, "fsdp")
    assert parallel.spec_for("a/kernel", (128, 30), mesh) == P("fsdp", None)
    assert parallel.spec_for("a/bias", (30,), mesh) == P()  # not divisible: replicated
    assert parallel.spec_for("step", (), mesh) == P()
    rules = ((".*q_proj/kernel", ("fsdp", None)),)
    assert parallel.spec_for("x/q_proj/kernel", (32, 128), mesh, rules) == P("fsdp", None)
    data_only = parallel.make_mesh(MeshConfig(fsdp=1))
    assert parallel.spec_for("a/kernel", (32, 128), data_only) == P()


def test_rules_shard_optimizer_moments_like_their_parameters(caplog):
    """mesh.rules are written against parameter paths; Adam's mu and nu, deep inside optax's nested
    states (apply_if_finite / multi_transform / chain / inject_hyperparams), follow their parameter."""
    layer = r"wav2vec2/encoder/layers/\d+"
    rules = [[f"{layer}/attention/q_proj/kernel", [None, "fsdp"]],  # auto would pick ("fsdp", None)
             [f"{layer}/feed_forward/intermediate_dense/kernel", []],  # auto would shard it; replicated
             ["opt_state/.*/kernel", ["fsdp", None]]]  # not a parameter path: matches nothing, is named
    config = from_dict({"mesh": {"fsdp": 4, "rules": rules}})
    mesh = parallel.make_mesh(config.mesh)
    with caplog.at_level("WARNING", logger="xlsr_jax.parallel"):
        state, shardings, _, _ = build_state(config, FlaxWav2Vec2ForCTC(quiet_config()), None, mesh, 10)
    assert "'opt_state/.*/kernel' matches no parameter path" in caplog.text
    q_proj = state.params["wav2vec2"]["encoder"]["layers"]["0"]["attention"]["q_proj"]["kernel"]
    assert q_proj.sharding.spec == P(None, "fsdp") and {s.data.shape for s in q_proj.addressable_shards} == {(32, 8)}
    ffn = state.params["wav2vec2"]["encoder"]["layers"]["1"]["feed_forward"]["intermediate_dense"]["kernel"]
    assert ffn.sharding.spec == P()
    params = {parallel._keys(path): leaf.sharding for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    mirrors = {}  # "mu" / "nu" -> parameter paths found under it
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = parallel._keys(path)
        for start in range(len(keys)):
            if keys[start:] in params:
                assert leaf.sharding == params[keys[start:]], keys
                mirrors.setdefault(keys[start - 1], set()).add(keys[start:])
                break
    # freeze_feature_encoder (the default) leaves the conv feature encoder without moments
    trainable = {k for k in params if k[:2] != ("wav2vec2", "feature_extractor")}
    assert mirrors == {"mu": trainable, "nu": trainable}
    assert jax.tree.map(lambda leaf: leaf.sharding, state) == shardings


def test_global_batch_splits_rows_over_all_devices():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2))
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
    batch = parallel.global_batch(local, mesh)
    assert batch["x"].shape == (8, 3)
    assert {tuple(s.data.shape) for s in batch["x"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])


def test_device_batches_puts_the_next_batch_before_handing_out_this_one():
    mesh = parallel.make_mesh(MeshConfig())
    taken = []

    def host_batches():
        for k in range(3):
            taken.append(k)
            yield {"x": np.full((4, 2), k, np.float32), "index": np.arange(4) + 4 * k}

    batches = parallel.device_batches(host_batches(), mesh, keys=("x",))
    local, arrays = next(batches)
    assert taken == [0, 1], "batch 1 is read (and its copy started) before batch 0 is handed out"
    assert set(arrays) == {"x"} and arrays["x"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arrays["x"]), local["x"])
    rest = list(batches)
    assert [int(a["x"][0, 0]) for _, a in rest] == [1, 2] and [int(b["index"][0]) for b, _ in rest] == [4, 8]
    assert list(parallel.device_batches(iter([]), mesh, keys=("x",))) == []


def test_distributed_arguments_from_keys_then_environment():
    args = parallel.distributed_arguments
    assert args(MeshConfig(), environ={}) is None, "one process: no runtime to start"
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert args(MeshConfig(), environ=env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                               "process_id": 3}
    keys = MeshConfig(coordinator_address="host0:99", num_processes=2, process_id=1)
    assert args(keys, environ=env) == {"coordinator_address": "host0:99", "num_processes": 2, "process_id": 1}
    # mesh.distributed alone leaves everything to JAX's cluster detection (TPU pods, SLURM, Open MPI)
    assert args(MeshConfig(distributed=True), environ={}) == {}
    with pytest.raises(parallel.UserError, match=r"mesh.num_processes \(or \$JAX_NUM_PROCESSES\)"):
        args(MeshConfig(coordinator_address="host0:99", process_id=0), environ={})
    with pytest.raises(parallel.UserError, match="JAX_PROCESS_ID='one'"):
        args(MeshConfig(coordinator_address="host0:99", num_processes=2), environ={"JAX_PROCESS_ID": "one"})


def test_mesh_keys_checked():
    with pytest.raises(ValueError, match="mesh.process_id must be less than mesh.num_processes"):
        MeshConfig(num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="mesh.coordinator_address must be host:port"):
        MeshConfig(coordinator_address="host0")


def test_host_digest_is_stable_and_tells_values_apart():
    digest = parallel._digest
    assert digest({"a": [1, 2]}) == digest({"a": [1, 2]}) != digest({"a": [2, 1]})
    assert digest(np.arange(4)) == digest(np.arange(4)) != digest(np.arange(4).astype(np.int32))
    assert 0 <= digest("x") < 2**31, "fits the int32 array that process_allgather exchanges"
