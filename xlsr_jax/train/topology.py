"""TPU slices compiled for without a TPU: Cloud's accelerator types as libtpu's topologies, the devices
libtpu gives them (`jax.experimental.topologies`, as MaxText's train_compile.py uses), and each chip's
published figures for a roofline estimate. Needs libtpu (`pip install 'xlsr-jax[tpu]'`) only to get devices."""

from __future__ import annotations

import dataclasses
import math

from xlsr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's published figures (per chip)."""
    name: str
    hbm_gib: float
    bf16_tflops: float  # peak dense bfloat16 matmul FLOP/s / 1e12
    hbm_gbps: float  # HBM bandwidth, GB/s
    source: str


# By the `device_kind` libtpu gives a topology's devices. From Google's Cloud TPU pages (2026-12).
CHIPS = {
    "TPU v4": Chip("v4", 32, 275, 1200, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16, 197, 819, "https://cloud.google.com/tpu/docs/v5e"),
    # v5p: the page says 95 GB of HBM; libtpu's compiler lets one program use 95.74 GiB of it (usable_hbm_bytes)
    "TPU v5": Chip("v5p", 96, 459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 32, 918, 1640, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice as libtpu compiles for it."""
    topology: str  # libtpu's name, e.g. "v5e:2x4"
    chip_config: str  # "megacore": one JAX device per chip, its two TensorCores together (v4, v5p)
    chips_per_host: tuple[int, int, int]

    @property
    def chips(self) -> int:
        """JAX devices of the slice: one per chip."""
        return math.prod(int(d) for d in self.topology.partition(":")[2].split("x"))


# Chips per slice -> the slice's shape, as Cloud TPU lays out its accelerator types
# (https://cloud.google.com/tpu/docs/v5e, .../v6e: 2D tori; .../v4, .../v5p: 3D).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}
_GENERATIONS = {"v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e", "v4": "v4", "v5p": "v5p"}


def tpu_slice(name: str) -> TpuSlice:
    """`name` as Cloud TPU sells it ("v5litepod-8", "v5e-8", "v6e-8", "v4-32", "v5p-8": v4 and v5p count
    TensorCores, two a chip) or as libtpu names it ("v5e:2x4", "v4:2x2x4"): the slice with Cloud's hosts.
    v5e and v6e slices of up to 8 chips are one host (a v5litepod-8 is one VM with 8 chips); larger ones,
    and every v4 and v5p slice, have 4 chips a host."""
    generation, sep, rest = name.partition(":")
    if not sep:
        generation, _, count = name.rpartition("-")
        generation = _GENERATIONS.get(generation.lower())
        chips = int(count) if count.isdigit() else 0
        if generation in ("v4", "v5p"):
            chips //= 2
        shape = (_SHAPES_3D if generation in ("v4", "v5p") else _SHAPES_2D).get(chips) if generation else None
    else:
        generation, shape = _GENERATIONS.get(generation.lower()), rest
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except (AttributeError, ValueError):
        dims = ()
    if generation is None or len(dims) != (3 if generation in ("v4", "v5p") else 2) or min(dims) < 1:
        raise UserError(f"plan --topology {name}: not a TPU slice this knows; give a Cloud accelerator type "
                        "(v5litepod-8, v6e-8, v4-32, v5p-8) or a libtpu topology (v5e:2x4, v4:2x2x4, v5p:2x2x1)")
    dims = (dims + (1,))[:3]
    if generation in ("v5e", "v6e") and math.prod(dims) <= 8:
        per_host = dims
    else:
        per_host = (min(dims[0], 2), min(dims[1], 2), 1)
    chip_config = "megacore" if generation in ("v4", "v5p") else "default"
    return TpuSlice(f"{generation}:{'x'.join(map(str, dims[:3 if generation in ('v4', 'v5p') else 2]))}",
                    chip_config, per_host)


def topology_devices(name: str) -> list:
    """The devices of TPU slice `name` (see `tpu_slice`), compiled for without a TPU (libtpu)."""
    spec = tpu_slice(name)
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(topology_name=spec.topology, platform="tpu",
                                                 chip_config_name=spec.chip_config,
                                                 chips_per_host_bounds=spec.chips_per_host).devices)
    except Exception as err:  # libtpu missing, or a slice it does not know
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "lockfile" in reason:  # libtpu's advice (rm the lock) would break a process that holds it
            raise UserError(f"plan --topology {name}: another process has libtpu loaded (another plan, or a TPU "
                            "program); wait for it, or, where neither drives a TPU, set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
                            ) from None
        raise UserError(f"plan --topology {name}: cannot compile for it ({reason}); it needs libtpu "
                        "(pip install 'xlsr-jax[tpu]')") from None


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, str]:
    """(a lower bound on a step's time on `chip`, "compute" or "memory": which bound it is): its FLOPs
    at the chip's peak bf16 rate, or its bytes accessed at the chip's HBM bandwidth."""
    compute, memory = flops / (chip.bf16_tflops * 1e12), bytes_accessed / (chip.hbm_gbps * 1e9)
    return (compute, "compute") if compute >= memory else (memory, "memory")
