"""Mesh construction and sharding rules on 4 fake CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xlsr_jax import parallel
from xlsr_jax.config import MeshConfig


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
