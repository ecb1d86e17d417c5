"""Device mesh, sharding rules and host-local -> global batches.

The mesh has two axes: "data" (pure data parallel: parameters replicated) and "fsdp" (data parallel
whose parameters and optimizer state are also sharded, ZeRO-3 style). Batches split over both axes.
Multi-host runs use JAX's own runtime (`jax.distributed.initialize`); every process runs the same
program on its own slice of each global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xlsr_jax.config import MeshConfig
from xlsr_jax.errors import UserError

logger = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def distributed_arguments(config: MeshConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """`jax.distributed.initialize` keyword arguments, or None for a single-process run.

    Config keys win over $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID; what neither gives is
    left to JAX's cluster auto-detection (TPU pods, SLURM, Open MPI), which `mesh.distributed` asks for."""
    explicit = {"coordinator_address": config.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS"),
                "num_processes": config.num_processes, "process_id": config.process_id}
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if explicit[key] is None and environ.get(name):
            try:
                explicit[key] = int(environ[name])
            except ValueError:
                raise UserError(f"${name}={environ[name]!r} is not an integer") from None
    if not config.distributed and explicit["coordinator_address"] is None:
        return None
    if explicit["coordinator_address"] is not None and None in explicit.values():
        missing = [f"mesh.{k} (or ${n})" for k, n in (("num_processes", "JAX_NUM_PROCESSES"),
                                                     ("process_id", "JAX_PROCESS_ID")) if explicit[k] is None]
        # Auto-detection would try cluster schedulers that are not there and wait minutes; say what is missing.
        if not config.distributed:
            raise UserError(f"mesh.coordinator_address is set, so this is a multi-process run: also set "
                            f"{' and '.join(missing)}")
    return {k: v for k, v in explicit.items() if v is not None}


def initialize(config: MeshConfig) -> None:
    """Start JAX's multi-process runtime when the config (or environment) asks for it.

    On CPU, processes exchange collectives through gloo (XLA:CPU has no cross-process collectives by default).
    The runtime also starts JAX's preemption service: a SIGTERM to any process reaches all of them (see
    `train.loop._StopSignal`)."""
    kwargs = distributed_arguments(config)
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    from xlsr_jax.atomic import runtime_owns_sigterm

    runtime_owns_sigterm()  # its preemption notifier's C handler, which a cache build must not replace
    logger.info("process %d of %d, %d local devices, %d in all", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    fsdp = config.fsdp
    data = config.data if config.data != -1 else len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh.data={config.data} x mesh.fsdp={fsdp} does not cover the "
                         f"{len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def _keys(path) -> tuple[str, ...]:
    """A JAX key path as strings: dict keys, attribute and field names, sequence indices."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


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
    """The partition spec of the parameter at `path` (`a/b/kernel`): the first rule whose regex matches
    the whole path, else `_auto_spec`."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(f"mesh.rules: {pattern!r} gives {len(spec)} axes to {path} of shape {shape}")
            return P(*spec)
    return _auto_spec(tuple(shape), mesh.shape["fsdp"])


def tree_shardings(tree: Any, mesh: Mesh, rules=()) -> Any:
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs): a parameter tree, or a
    train state holding its parameters as `.params` beside the optimizer state.

    `rules` (mesh.rules) match parameter paths (`wav2vec2/encoder/.../kernel`), the paths inside
    `tree.params` where `tree` has them, else inside `tree` itself. Every leaf whose path ends
    in a parameter's path and has its shape gets that parameter's sharding: the parameter itself and its
    copies in the optimizer state (Adam's mu and nu, at any depth of optax's nested states), so an
    update never moves data between layouts. Other leaves (step, counts, the rng) shard by shape alone.
    """
    params = getattr(tree, "params", tree)
    by_path = {}  # parameter path -> (shape, sharding)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys, shape = _keys(path), tuple(leaf.shape)
        by_path[keys] = shape, NamedSharding(mesh, spec_for("/".join(keys), shape, mesh, rules))
    for pattern, _ in rules:
        if by_path and not any(re.fullmatch(pattern, "/".join(keys)) for keys in by_path):
            example = "/".join(next(iter(by_path)))
            logger.warning("mesh.rules: %r matches no parameter path (they read like %s)", pattern, example)

    def one(path, leaf):
        keys, shape = _keys(path), tuple(leaf.shape)
        for start in range(len(keys)):  # the longest parameter path that ends this path
            found = by_path.get(keys[start:])
            if found is not None and found[0] == shape:
                return found[1]
        return NamedSharding(mesh, _auto_spec(shape, mesh.shape["fsdp"]))
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


def host_params(params: Any) -> Any:
    """Device params -> numpy on this host, also when FSDP shards them across processes (then every
    process must call this: it is a collective)."""
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(params)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(params)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def _digest(value: Any) -> int:
    """A 31-bit hash of a JSON-able value or a numpy array, equal across processes and Python runs (unlike
    `hash`)."""
    if isinstance(value, np.ndarray):
        text = f"{value.dtype.str}{value.shape}".encode() + np.ascontiguousarray(value).tobytes()
    else:
        text = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") >> 1


def assert_hosts_agree(fields: Mapping[str, Any]) -> None:
    """Stop every process with a UserError naming the fields whose values differ between processes.

    `fields`: what must be equal on every host (config, vocab, data plan, ...), as JSON-able values. Each
    host's hashes are gathered with `multihost_utils.process_allgather` (a collective every process must
    reach); a single-process run returns at once. Hosts that build different vocabularies or batch plans
    would otherwise hang in mismatched collectives or silently train on different batches.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(fields)
    local = np.asarray([_digest(names)] + [_digest(fields[n]) for n in names], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, 1 + fields]
    if (gathered == gathered[0]).all():
        return
    if (gathered[:, 0] != gathered[0, 0]).any():
        differ = ["the set of checked fields (different xlsr-jax versions?)"]
    else:
        differ = [f"{name} (process {jax.process_index()} has {_short(fields[name])}; processes "
                  f"{[int(p) for p in np.flatnonzero(gathered[:, 1 + k] != gathered[jax.process_index(), 1 + k])]}"
                  " differ)" for k, name in enumerate(names) if (gathered[:, 1 + k] != gathered[0, 1 + k]).any()]
    raise UserError("the processes of this run disagree on " + "; ".join(differ) + ". Every host must see the "
                    "same data (same files, same decode results), config and vocabulary; see data_report.tsv "
                    "and each host's log")


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
