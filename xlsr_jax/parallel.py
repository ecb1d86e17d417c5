"""Device mesh, sharding rules and host-local -> global batches.

The mesh has two axes: "data" (pure data parallel: parameters replicated) and "fsdp" (data parallel
whose parameters and optimizer state are also sharded, ZeRO-3 style). Batches split over both axes.
Multi-host runs use JAX's own runtime (`jax.distributed.initialize`); every process runs the same
program on its own slice of each global batch.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xlsr_jax.config import MeshConfig

logger = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def initialize(config: MeshConfig) -> None:
    """Start JAX's multi-host runtime when asked (TPU pods and multi-node GPU find their peers)."""
    if config.distributed:
        jax.distributed.initialize()
        logger.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                    jax.local_device_count())


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    fsdp = config.fsdp
    data = config.data if config.data != -1 else len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh.data={config.data} x mesh.fsdp={fsdp} does not cover the "
                         f"{len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def _path_string(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _auto_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension that the fsdp axis divides; replicate what is too small."""
    if fsdp == 1 or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, Sequence[str | None]]] = ()) -> P:
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(f"mesh.rules: {pattern!r} gives {len(spec)} axes to {path} of shape {shape}")
            return P(*spec)
    return _auto_spec(tuple(shape), mesh.shape["fsdp"])


def tree_shardings(tree: Any, mesh: Mesh, rules=()) -> Any:
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs: params, optimizer state)."""
    def one(path, leaf):
        return NamedSharding(mesh, spec_for(_path_string(path), tuple(leaf.shape), mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def device_batches(local_batches: Iterator[dict[str, np.ndarray]], mesh: Mesh,
                   keys: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
    """(local batch, global arrays of its `keys`), one batch ahead: batch k+1's host-to-device copy
    is started before batch k is handed out, so it runs while step k runs instead of after it. The
    copy is asynchronous, so this costs the calling thread only the staging of the host arrays."""
    ahead = None
    for local in local_batches:
        current, ahead = ahead, (local, global_batch({k: local[k] for k in keys}, mesh))
        if current is not None:
            yield current
    if ahead is not None:
        yield ahead


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
