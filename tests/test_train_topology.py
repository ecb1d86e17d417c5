"""TPU slices: Cloud's names as libtpu's topologies with Cloud's hosts, and the roofline of a step."""

from __future__ import annotations

import pytest

from xlsr_jax.errors import UserError
from xlsr_jax.train.topology import CHIPS, TpuSlice, roofline_seconds, topology_devices, tpu_slice

NEEDS_LIBTPU = "libtpu is not installed: pip install 'xlsr-jax[tpu]' to compile for TPUs"


def test_roofline_is_the_longer_of_compute_and_memory_time():
    v5e = CHIPS["TPU v5 lite"]
    assert (v5e.hbm_gib, v5e.bf16_tflops, v5e.hbm_gbps) == (16, 197, 819)
    assert roofline_seconds(197e12 * 0.5, 819e9 * 0.1, v5e) == (pytest.approx(0.5), "compute")
    assert roofline_seconds(197e12 * 0.1, 819e9 * 0.25, v5e) == (pytest.approx(0.25), "memory")


@pytest.mark.parametrize("name, topology, chip_config, per_host, chips, hosts", [
    ("v5litepod-8", "v5e:2x4", "default", (2, 4, 1), 8, 1),  # one VM with 8 chips, as Cloud sells it
    ("v5e:2x4", "v5e:2x4", "default", (2, 4, 1), 8, 1),
    ("v5e-16", "v5e:4x4", "default", (2, 2, 1), 16, 4),
    ("v6e-4", "v6e:2x2", "default", (2, 2, 1), 4, 1),
    ("v4-8", "v4:2x2x1", "megacore", (2, 2, 1), 4, 1),  # v4 counts TensorCores: 4 chips
    ("v4-32", "v4:2x2x4", "megacore", (2, 2, 1), 16, 4),
    ("v4:2x2x4", "v4:2x2x4", "megacore", (2, 2, 1), 16, 4),
    ("v5p-8", "v5p:2x2x1", "megacore", (2, 2, 1), 4, 1),
])
def test_tpu_slices_as_cloud_sells_them(name, topology, chip_config, per_host, chips, hosts):
    assert tpu_slice(name) == TpuSlice(topology, chip_config, per_host) and tpu_slice(name).chips == chips
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)
    devices = topology_devices(name)
    assert (len(devices), len({d.process_index for d in devices})) == (chips, hosts)
    assert devices[0].device_kind in CHIPS  # one device per chip: the chip table's figures apply


@pytest.mark.parametrize("name", ["v9z:2x2", "v5e-7", "v4:2x2", "v4-3", "tpu"])
def test_an_unknown_slice_is_named(name):
    with pytest.raises(UserError, match=f"plan --topology {name}: not a TPU slice this knows"):
        tpu_slice(name)


def test_a_topology_libtpu_cannot_compile_for_is_named(monkeypatch):
    pytest.importorskip("libtpu", reason=NEEDS_LIBTPU)
    from xlsr_jax.train import topology

    monkeypatch.setattr(topology, "tpu_slice", lambda name: TpuSlice("v5e:3x3x3", "default", (2, 2, 1)))
    with pytest.raises(UserError, match="plan --topology v5e-27: cannot compile for it"):
        topology.topology_devices("v5e-27")
